"""Rewards over HTTP: ``fastdag serve-reward NAME`` serves any registered reward; ``reward.name: remote`` scores
through it. For rewards that need another environment (an old transformers, a VLM) or another machine.

Wire format: ``POST /score`` with an ``.npz`` body (``images`` uint8 [B, H, W, 3], ``prompts`` a unicode array;
no pickles) -> ``{"scores": [B floats]}``; ``GET /health`` -> ``{"status": "ok", "reward": NAME}``. Errors come
back as ``{"error": message}`` with status 400 (a bad request) or 500 (the reward failed).
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any, Optional, Sequence

import numpy as np
import torch

from fastdag.config import ConfigError
from fastdag.rewards import CheckedReward, RewardError, RewardFn, build_reward, register_reward, to_uint8_hwc

log = logging.getLogger(__name__)


def encode_batch(images: np.ndarray, prompts: Sequence[str]) -> bytes:
    """uint8 [B, H, W, 3] and B prompts -> the request body."""
    buf = io.BytesIO()
    np.savez(buf, images=images, prompts=np.array(list(prompts), dtype=str))
    return buf.getvalue()


def decode_batch(body: bytes) -> tuple[torch.Tensor, list[str]]:
    """The request body -> images float [B, 3, H, W] in [0, 1] and B prompts; ValueError if malformed."""
    with np.load(io.BytesIO(body), allow_pickle=False) as data:
        images, prompts = data["images"], [str(p) for p in data["prompts"]]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or len(prompts) != images.shape[0]:
        raise ValueError(f"expected uint8 images [B, H, W, 3] and B prompts, got {images.dtype} {images.shape} "
                         f"and {len(prompts)} prompts")
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255, prompts


def make_server(name: str, reward: RewardFn, host: str = "127.0.0.1", port: int = 0) -> HTTPServer:
    """An HTTP server scoring with ``reward`` (one request at a time: a model reward is not thread-safe).
    ``port=0`` picks a free port (``server.server_address``)."""
    checked = CheckedReward(name, reward, batch_size=1 << 30)

    class Handler(BaseHTTPRequestHandler):
        def _reply(self, status: int, payload: dict[str, Any]) -> None:
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            if self.path.rstrip("/") == "/health":
                self._reply(200, {"status": "ok", "reward": name})
            else:
                self._reply(404, {"error": f"no such path {self.path}; use GET /health or POST /score"})

        def do_POST(self) -> None:
            if self.path.rstrip("/") != "/score":
                self._reply(404, {"error": f"no such path {self.path}; use POST /score"})
                return
            try:
                images, prompts = decode_batch(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            except Exception as e:  # anything unreadable is the client's problem
                self._reply(400, {"error": f"bad request: {e}"})
                return
            try:
                scores = checked(images, prompts)
            except Exception as e:
                log.exception("reward %s failed", name)
                self._reply(500, {"error": f"reward {name!r} failed on the server: {type(e).__name__}: {e}"})
                return
            self._reply(200, {"scores": scores.tolist()})

        def log_message(self, format: str, *args: Any) -> None:  # per-request lines only in debug logs
            log.debug("%s " + format, self.address_string(), *args)

    return HTTPServer((host, port), Handler)


@register_reward("remote")
class RemoteReward:
    """A reward served over HTTP by `fastdag serve-reward NAME` (reward.kwargs: url, timeout, retries, backoff)."""

    def __init__(self, url: str, timeout: float = 60.0, retries: int = 3, backoff: float = 1.0):
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"reward.kwargs.url: expected http://HOST:PORT, got {url!r}")
        self.url, self.timeout, self.retries, self.backoff = url.rstrip("/"), float(timeout), int(retries), float(backoff)
        try:  # a wrong URL fails now, before any model loads
            with urllib.request.urlopen(self.url + "/health", timeout=self.timeout) as resp:
                self.name = json.loads(resp.read())["reward"]
        except Exception as e:
            raise ConfigError(f"reward.kwargs.url: no reward server at {self.url} ({_reason(e)}); "
                              "start one with `fastdag serve-reward NAME`") from None

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        body = encode_batch(to_uint8_hwc(images), prompts)
        request = urllib.request.Request(self.url + "/score", data=body, headers={"Content-Type": "application/x-npz"})
        reason = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as resp:
                    return torch.tensor(json.loads(resp.read())["scores"], dtype=torch.float32)
            except urllib.error.HTTPError as e:
                reason = _reason(e)  # reads the error body, once
                if e.code < 500:  # the request itself is wrong: retrying cannot help
                    raise RewardError(f"reward 'remote': {self.url} refused the batch ({reason})") from None
            except Exception as e:  # refused, reset, timed out: the server may come back
                reason = _reason(e)
            log.warning("reward server %s: attempt %d of %d failed (%s)", self.url, attempt + 1, self.retries + 1, reason)
        raise RewardError(f"reward 'remote': {self.url} failed after {self.retries + 1} attempts ({reason}); "
                          "the run stops here, resume it from its last checkpoint with train.resume=latest")


def _reason(e: Optional[BaseException]) -> str:
    if isinstance(e, urllib.error.HTTPError):
        try:
            return f"HTTP {e.code}: {json.loads(e.read())['error']}"
        except Exception:
            return f"HTTP {e.code}"
    if isinstance(e, urllib.error.URLError):
        e = e.reason if isinstance(e.reason, BaseException) else e
    return f"{type(e).__name__}: {e}".splitlines()[0]


def main(argv: Optional[list[str]] = None) -> int:
    """``fastdag serve-reward NAME [--host H] [--port P] [key=value ...]``; returns when interrupted."""
    p = argparse.ArgumentParser(prog="fastdag serve-reward",
                                description="Serve a registered reward over HTTP for `reward.name: remote`.")
    p.add_argument("name", help="a registered reward (see `fastdag rewards`)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=int, default=8765, help="port (0: any free port)")
    p.add_argument("kwargs", nargs="*", metavar="key=value", help="the reward's kwargs (values parsed as YAML)")
    args = p.parse_args(argv)
    import yaml

    kwargs = {}
    for item in args.kwargs:
        if "=" not in item:
            raise ConfigError(f"{item}: reward kwargs look like key=value, e.g. device=cuda")
        key, raw = item.split("=", 1)
        kwargs[key] = yaml.safe_load(raw)
    if args.name == "remote":
        raise ConfigError("serve-reward: serving 'remote' would forward to another server; name the reward itself")
    reward = build_reward(args.name, kwargs)
    try:
        server = make_server(args.name, reward, args.host, args.port)
    except OSError as e:
        raise ConfigError(f"--port: cannot listen on {args.host}:{args.port} ({e.strerror or e})") from None
    host, port = server.server_address[:2]
    print(f"serving reward {args.name!r} on http://{host}:{port} (POST /score, GET /health); Ctrl-C stops", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
