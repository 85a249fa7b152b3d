"""Rewards over HTTP: ``fastdag serve-reward NAME`` serves any registered reward; ``reward.name: remote`` scores
through it. For rewards that need another environment (an old transformers, a VLM) or another machine.

Wire format: ``POST /score`` with an ``.npz`` body (``images`` uint8 [B, H, W, 3], ``prompts`` a unicode array;
no pickles) -> ``{"scores": [B floats]}``; ``GET /health`` -> ``{"status": "ok", "reward": NAME}``. Errors come
back as ``{"error": message}``: 400 a malformed request, 401 a missing or wrong token, 408 a body that did not
arrive in time, 411 no ``Content-Length``, 413 a body or decoded array over the limit (retrying cannot help any
of these), 500 the reward failed on the server. A server with a token (required off loopback) wants
``Authorization: Bearer TOKEN`` on every request.

The server is threaded: reading, decoding and ``/health`` run concurrently, scoring one batch at a time (a model
reward is not thread-safe, and one batch at a time is what the accelerator does anyway). A client that stops
sending holds only its own connection, for at most the read timeout.
"""
from __future__ import annotations

import argparse
import hmac
import io
import ipaddress
import json
import logging
import math
import os
import sys
import threading
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Optional, Sequence

import numpy as np
import torch

from fastdag.config import ConfigError
from fastdag.errors import clip
from fastdag.rewards import CheckedReward, RewardError, RewardFn, build_reward, register_reward, to_uint8_hwc

log = logging.getLogger(__name__)

TOKEN_ENV = "FASTDAG_REWARD_TOKEN"
# A request body (and any array it decodes to) is at most this big by default: 32 RGB images of 1024² (32 is
# reward.batch_size's default) are 96 MiB, plus room for the prompts.
DEFAULT_MAX_BODY_MB = 128
DEFAULT_READ_TIMEOUT = 30.0
# Requests read, decoded or scored at once; the others wait for a slot. Bounds the server's memory to about
# this many times two bodies, whatever the number of clients.
PENDING = 8
STOP_GRACE_S = 60.0  # how long a stopping server waits for the batch on the model
# A body must arrive at least this fast on average (beyond the read timeout): a client that trickles bytes is
# cut off instead of holding a slot.
MIN_BODY_RATE = 1 << 20  # bytes per second


class OverLimit(ValueError):
    """A request whose body or decoded arrays exceed the server's limit (413)."""


def encode_batch(images: np.ndarray, prompts: Sequence[str]) -> bytes:
    """uint8 [B, H, W, 3] and B prompts -> the request body."""
    buf = io.BytesIO()
    np.savez(buf, images=images, prompts=np.array(list(prompts), dtype=str))
    return buf.getvalue()


def decode_batch(body: bytes, max_bytes: int = DEFAULT_MAX_BODY_MB << 20) -> tuple[np.ndarray, list[str]]:
    """The request body -> images uint8 [B, H, W, 3] (B, H, W >= 1) and B prompts; ValueError (one line) when it is
    malformed or an array would decode to more than ``max_bytes``. Sizes are checked from each member's .npy
    header before its data is read: a compressed member is decompressed only up to the size the header
    states, and never past ``max_bytes``."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(body))
    except (zipfile.BadZipFile, ValueError, OSError):
        raise ValueError("the body is not an .npz archive (numpy.savez)") from None
    with archive:
        images = _read_npy(archive, "images", max_bytes)
        prompts = _read_npy(archive, "prompts", max_bytes)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or prompts.dtype.kind != "U" \
            or prompts.ndim != 1 or len(prompts) != images.shape[0]:
        raise ValueError(f"expected uint8 images [B, H, W, 3] and B prompts, got {images.dtype} {images.shape} and "
                         f"{prompts.dtype} {prompts.shape} prompts")
    if min(images.shape[:3]) < 1:
        raise ValueError(f"expected at least one image of at least 1x1 pixels, got images {images.shape}")
    return images, [str(p) for p in prompts]


def _read_npy(archive: zipfile.ZipFile, key: str, max_bytes: int) -> np.ndarray:
    """Member ``key`` of an .npz: its header (shape, dtype) checked first, then exactly its data, read."""
    try:
        info = archive.getinfo(f"{key}.npy")
    except KeyError:
        raise ValueError(f"the archive has no {key!r} array") from None
    try:
        with archive.open(info) as fh:
            version = np.lib.format.read_magic(fh)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
            else:
                raise ValueError(f".npy format version {version} (numpy.savez writes 1.0 or 2.0)")
            if dtype.hasobject or dtype.kind not in "uU" or dtype.itemsize == 0:
                raise ValueError(f"dtype {dtype} (images are uint8, prompts unicode strings)")
            nbytes = math.prod(shape) * dtype.itemsize  # Python ints: no overflow, whatever the header says
            if nbytes > max_bytes:
                raise OverLimit(f"shape {shape} of {dtype} would decode to {nbytes:,} bytes, over the server's limit "
                                f"of {max_bytes:,} (serve-reward --max-body-mb)")
            data = bytearray(nbytes)  # writable, so torch.from_numpy takes it as it is
            view, got = memoryview(data), 0
            while got < nbytes:
                n = fh.readinto(view[got:])
                if not n:
                    raise ValueError(f"its data ends after {got:,} of {nbytes:,} bytes")
                got += n
    except ValueError as e:  # OverLimit stays OverLimit (413, not 400)
        raise type(e)(f"{key}: {str(e).splitlines()[0] if str(e) else 'malformed'}") from None
    except (zipfile.BadZipFile, OSError, EOFError, RuntimeError, zlib.error) as e:  # damaged compressed data
        first = str(e).splitlines()[0] if str(e) else ""
        raise ValueError(f"{key}: damaged archive member ({type(e).__name__}: {first})") from None
    return np.frombuffer(data, dtype=dtype).reshape(shape, order="F" if fortran else "C")


def is_loopback(host: str) -> bool:
    """Whether ``host`` reaches this machine only: a loopback address or ``localhost`` (a name that resolves
    elsewhere, an empty host and 0.0.0.0 do not)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class RewardServer(ThreadingHTTPServer):
    """One thread per connection; daemon threads, so a stop does not wait for a client that stopped sending."""

    daemon_threads = True
    # The listen backlog: every process of a data-parallel run may connect at once (the default, 5, reset 6 of 20
    # concurrent clients). The kernel caps it at net.core.somaxconn.
    request_queue_size = 256

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)):  # a client that left: not the server's problem
            log.debug("client %s: %s", client_address[0], type(exc).__name__)
        else:
            log.exception("serving %s failed", client_address[0])


def _score_batch(checked: CheckedReward, name: str, images: np.ndarray, prompts: list[str]
                 ) -> tuple[int, dict[str, Any]]:
    """Score one decoded batch; every tensor is created and freed in this frame (the caller holds the scoring lock
    around the call, so a stopping server knows when none is left)."""
    try:
        scores = checked(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255, prompts)
        return 200, {"scores": scores.tolist()}
    except Exception as e:  # noqa: BLE001 - the reward's fault, reported to the client as a 500
        log.exception("reward %s failed", name)
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return 500, {"error": f"reward {name!r} failed on the server: {type(e).__name__}: {clip(first)}"}


def make_server(name: str, reward: RewardFn, host: str = "127.0.0.1", port: int = 0, *, token: Optional[str] = None,
                read_timeout: float = DEFAULT_READ_TIMEOUT,
                max_body: int = DEFAULT_MAX_BODY_MB << 20) -> RewardServer:
    """An HTTP server scoring with ``reward``. ``port=0`` picks a free port (``server.server_address``); with a
    ``token`` every request must carry ``Authorization: Bearer TOKEN``; each read from a client waits at most
    ``read_timeout`` seconds; bodies and decoded arrays are at most ``max_body`` bytes."""
    checked = CheckedReward(name, reward, batch_size=1 << 30)
    scoring = threading.Lock()  # one batch on the model at a time
    slots = threading.BoundedSemaphore(PENDING)
    expected = f"Bearer {token}".encode() if token is not None else None

    class Handler(BaseHTTPRequestHandler):
        timeout = read_timeout  # the socket's timeout: every read of the request line, headers and body

        def _reply(self, status: int, payload: dict[str, Any]) -> None:
            body = json.dumps(payload).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            except (ConnectionError, TimeoutError):  # the client gave up waiting: nobody to tell
                log.debug("client %s left before its answer", self.client_address[0])
                self.close_connection = True

        def _refuse(self, status: int, message: str) -> None:
            self.close_connection = True  # a body may be left unread
            self._reply(status, {"error": message})

        def _authorised(self) -> bool:
            if expected is None:
                return True
            sent = self.headers.get("Authorization", "").encode("latin-1", "replace")
            if hmac.compare_digest(sent, expected):  # constant time: the comparison does not leak the token
                return True
            self._refuse(401, "missing or wrong token: send Authorization: Bearer TOKEN (reward.kwargs.token or "
                              f"{TOKEN_ENV})")
            return False

        def do_GET(self) -> None:
            if not self._authorised():
                return
            if self.path.rstrip("/") == "/health":
                self._reply(200, {"status": "ok", "reward": name})
            else:
                self._refuse(404, f"no such path {self.path[:100]}; use GET /health or POST /score")

        def do_POST(self) -> None:
            if not self._authorised():
                return
            if self.path.rstrip("/") != "/score":
                self._refuse(404, f"no such path {self.path[:100]}; use POST /score")
                return
            raw = self.headers.get("Content-Length")
            if raw is None:
                self._refuse(411, "bad request: Content-Length required")
                return
            try:
                length = int(raw)
            except ValueError:
                length = -1
            if length < 0:
                self._refuse(400, f"bad request: Content-Length {raw[:40]!r} is not a byte count")
                return
            if length > max_body:
                self._refuse(413, f"bad request: a body of {length:,} bytes is over the server's limit of "
                                  f"{max_body:,} (serve-reward --max-body-mb)")
                return
            with slots:
                status, payload = self._score(length)
            if status != 200:
                self.close_connection = True
            self._reply(status, payload)  # outside the locks: a slow reader of its answer holds up nobody

        def _score(self, length: int) -> tuple[int, dict[str, Any]]:
            body = self._read_body(length)
            if isinstance(body, str):
                return 408, {"error": f"bad request: {body}"}
            try:
                images, prompts = decode_batch(body, max_body)
            except ValueError as e:
                return 413 if isinstance(e, OverLimit) else 400, {"error": f"bad request: {e}"}
            except Exception as e:  # noqa: BLE001 - any other failure to parse a client's bytes (struct.error, ...)
                return 400, {"error": f"bad request: unreadable body ({type(e).__name__}: {clip(str(e))})"}
            del body
            with scoring:  # the tensors live and die inside: see main()'s stop
                return _score_batch(checked, name, images, prompts)

        def _read_body(self, length: int) -> bytes | str:
            """The body, or why it did not come in time (a client that stops sending, or trickles)."""
            deadline = time.monotonic() + read_timeout + length / MIN_BODY_RATE
            body = bytearray()
            try:
                while len(body) < length:
                    chunk = self.rfile.read1(min(length - len(body), 1 << 20))
                    if not chunk:
                        raise ConnectionError("the connection closed")
                    body += chunk
                    if time.monotonic() > deadline:
                        raise TimeoutError("too slow")
            except (TimeoutError, ConnectionError) as e:
                return f"the body did not arrive ({len(body):,} of {length:,} bytes: {e})"
            return bytes(body)

        def log_message(self, format: str, *args: Any) -> None:  # per-request lines only in debug logs
            log.debug("%s " + format, self.address_string(), *args)

    server = RewardServer((host, port), Handler)
    server.scoring = scoring  # main() takes it when stopping
    return server


@register_reward("remote")
class RemoteReward:
    """A reward served over HTTP by `fastdag serve-reward NAME` (reward.kwargs: url, timeout, retries, backoff,
    token; the token may come from $FASTDAG_REWARD_TOKEN instead, which keeps it out of the run's config.yaml)."""

    def __init__(self, url: str, timeout: float = 60.0, retries: int = 3, backoff: float = 1.0,
                 token: Optional[str] = None):
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"reward.kwargs.url: expected http://HOST:PORT, got {url!r}")
        self.url, self.timeout, self.retries, self.backoff = url.rstrip("/"), float(timeout), int(retries), float(backoff)
        token = check_token(token if token is not None else os.environ.get(TOKEN_ENV), "reward.kwargs.token")
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        try:  # a wrong URL or token fails now, before any model loads
            request = urllib.request.Request(self.url + "/health", headers=self.headers)
            with urllib.request.urlopen(request, timeout=self.timeout) as resp:
                self.name = json.loads(resp.read())["reward"]
        except urllib.error.HTTPError as e:
            if e.code == 401:
                sent = "refused the token" if token else f"wants a token (reward.kwargs.token or {TOKEN_ENV})"
                raise ConfigError(f"reward.kwargs.token: the reward server at {self.url} {sent}") from None
            raise ConfigError(f"reward.kwargs.url: no reward server at {self.url} ({_reason(e)}); "
                              "start one with `fastdag serve-reward NAME`") from None
        except Exception as e:
            raise ConfigError(f"reward.kwargs.url: no reward server at {self.url} ({_reason(e)}); "
                              "start one with `fastdag serve-reward NAME`") from None

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        body = encode_batch(to_uint8_hwc(images), prompts)
        request = urllib.request.Request(self.url + "/score", data=body,
                                         headers={"Content-Type": "application/x-npz", **self.headers})
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


def check_token(token: Any, key: str) -> Optional[str]:
    """A token travels in an HTTP header: printable ASCII, no spaces. None or "" means none."""
    if token is None or token == "":
        return None
    token = str(token)
    if not (token.isascii() and token.isprintable()) or " " in token:
        raise ConfigError(f"{key}: a token is printable ASCII without spaces")
    return token


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
    """``fastdag serve-reward NAME [--host H] [--port P] [--token T] [key=value ...]``; returns when interrupted
    (Ctrl-C or SIGTERM)."""
    from fastdag.config import parse_yaml_value

    p = argparse.ArgumentParser(prog="fastdag serve-reward",
                                description="Serve a registered reward over HTTP for `reward.name: remote`.")
    p.add_argument("name", help="a registered reward (see `fastdag rewards`)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only; any other "
                   "address needs a token)")
    p.add_argument("--port", type=int, default=8765, help="port (0: any free port)")
    p.add_argument("--token", default=None, help=f"a secret every request must carry (default: ${TOKEN_ENV}); "
                   "clients give it as reward.kwargs.token or in their own environment")
    p.add_argument("--read-timeout", type=float, default=DEFAULT_READ_TIMEOUT,
                   help="seconds a client may leave the server waiting for the rest of its request")
    p.add_argument("--max-body-mb", type=float, default=DEFAULT_MAX_BODY_MB,
                   help="largest request body, and largest array one may decode to, in MiB (default: 32 images of "
                        "1024x1024)")
    p.add_argument("kwargs", nargs="*", metavar="key=value", help="the reward's kwargs (values parsed as YAML)")
    args = p.parse_args(argv)
    if not (args.read_timeout > 0 and math.isfinite(args.read_timeout)):
        raise ConfigError(f"--read-timeout: must be a positive number of seconds, got {args.read_timeout}")
    if not (args.max_body_mb > 0 and math.isfinite(args.max_body_mb)):
        raise ConfigError(f"--max-body-mb: must be a positive number, got {args.max_body_mb}")
    token = check_token(args.token if args.token is not None else os.environ.get(TOKEN_ENV), "--token")
    if token is None and not is_loopback(args.host):
        raise ConfigError(f"--host: {args.host or '(all interfaces)'} is reachable from other machines; give --token "
                          f"SECRET (or set {TOKEN_ENV}), and the same secret to the clients as reward.kwargs.token")
    kwargs = {}
    for item in args.kwargs:
        if "=" not in item:
            raise ConfigError(f"{item[:200]}: reward kwargs look like key=value, e.g. device=cuda")
        key, raw = item.split("=", 1)
        kwargs[key] = parse_yaml_value(raw, key)
    if args.name == "remote":
        raise ConfigError("serve-reward: serving 'remote' would forward to another server; name the reward itself")
    reward = build_reward(args.name, kwargs)
    try:
        server = make_server(args.name, reward, args.host, args.port, token=token, read_timeout=args.read_timeout,
                             max_body=int(args.max_body_mb * (1 << 20)))
    except OSError as e:
        raise ConfigError(f"--port: cannot listen on {args.host}:{args.port} ({e.strerror or e})") from None
    host, port = server.server_address[:2]
    print(f"serving reward {args.name!r} on http://{host}:{port} (POST /score, GET /health"
          f"{', token required' if token else ''}); Ctrl-C stops", flush=True)
    if not is_loopback(args.host):
        log.warning("serve-reward: the token and the images travel unencrypted over HTTP; use a trusted network or "
                    "put a TLS proxy in front")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        # Handler threads are daemons. One that frees a tensor while the interpreter finalises is made to exit
        # inside torch's noexcept deallocator, and the whole process aborts ("terminate called without an active
        # exception", SIGABRT; seen 1 run in ~20 with clients that hang up). Tensors exist only inside the
        # scoring lock: holding it waits for the batch on the model to be scored and freed, and starts no other.
        server.scoring.acquire(timeout=STOP_GRACE_S)
    return 0
