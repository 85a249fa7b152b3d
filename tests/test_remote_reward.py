"""Remote rewards on loopback: the server's answers equal the in-process reward's, failures end in one line after
the retries, and a tiny run through `reward.name=remote` writes the same metrics rows as in-process."""
import json
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from fastdag.config import ConfigError, load_config
from fastdag.rewards import RewardError, build_reward
from fastdag.rewards.remote import RemoteReward, encode_batch, make_server
from fastdag.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
FAST = {"timeout": 5, "retries": 2, "backoff": 0.01}


class Serving:
    """A reward server on 127.0.0.1 in a thread; ``die_after`` requests, it stops listening (a killed server)."""

    def __init__(self, name="jpeg_compressibility", die_after=None):
        self.calls = 0
        inner = build_reward(name, {})

        def reward(images, prompts):
            self.calls += 1
            if die_after is not None and self.calls == die_after:
                threading.Thread(target=self.stop).start()  # after this answer, nobody listens
            return inner(images, prompts)

        self.server = make_server(name, reward, "127.0.0.1", 0)
        self.url = "http://127.0.0.1:%d" % self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.thread.is_alive():
            self.stop()


def uint8_images(n, size=16):
    # exactly representable in uint8, so the wire's quantisation is the identity
    return torch.randint(0, 256, (n, 3, size, size)).float() / 255


def test_health_and_scores_equal_in_process():
    images, prompts = uint8_images(5), [f"p{i}" for i in range(5)]
    with Serving("brightness") as s:
        with urllib.request.urlopen(s.url + "/health", timeout=5) as r:
            assert json.loads(r.read()) == {"status": "ok", "reward": "brightness"}
        remote = build_reward("remote", {"url": s.url, **FAST})
        torch.testing.assert_close(remote(images, prompts), build_reward("brightness", {})(images, prompts),
                                   rtol=0, atol=1e-7)
        with Serving("jpeg_compressibility") as j:
            got = RemoteReward(j.url, **FAST)(images, prompts)
        assert torch.equal(got, build_reward("jpeg_compressibility", {})(images, prompts))
        bad = urllib.request.Request(s.url + "/score", data=b"not npz")
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(bad, timeout=5)
        assert err.value.code == 400 and "bad request" in json.loads(err.value.read())["error"]


def test_mismatched_batch_is_refused_without_retries():
    with Serving("brightness") as s:
        remote = RemoteReward(s.url, **FAST)
        import numpy as np

        body = encode_batch(np.zeros((2, 4, 4, 3), np.uint8), ["only one"])
        req = urllib.request.Request(s.url + "/score", data=body)
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=5)
        assert err.value.code == 400
        assert remote(uint8_images(2), ["a", "b"]).shape == (2,)


def test_no_server_is_a_config_error():
    with Serving() as s:
        url = s.url
    with pytest.raises(ConfigError, match=r"reward.kwargs.url: no reward server at http://127.0.0.1:\d+"):
        RemoteReward(url, **FAST)


def test_server_gone_fails_after_the_retries_in_one_line():
    with Serving() as s:
        remote = RemoteReward(s.url, **FAST)
    t0 = time.monotonic()
    with pytest.raises(RewardError) as err:
        remote(uint8_images(2), ["a", "b"])
    msg = str(err.value)
    assert "\n" not in msg and "failed after 3 attempts" in msg and "train.resume=latest" in msg
    assert time.monotonic() - t0 < 30


def test_reward_failing_on_the_server_is_reported():
    class Broken:
        def __call__(self, images, prompts):
            return torch.zeros(len(prompts) + 1)

    server = make_server("broken", Broken(), "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        remote = RemoteReward("http://127.0.0.1:%d" % server.server_address[1], timeout=5, retries=1, backoff=0.01)
        with pytest.raises(RewardError, match="HTTP 500: reward 'broken' failed on the server.*returned shape"):
            remote(uint8_images(2), ["a", "b"])
    finally:
        server.shutdown()
        server.server_close()


def _cfg(tmp_path, run, *overrides):
    return load_config(REPO / "configs/tiny_random_compress.yaml", [
        "train.epochs=2", "sample.num_steps=3", "sample.batch_size=4", "train.batch_size=4", "reward.batch_size=4",
        "logging.progress=false", "logging.grid_size=0", "engine.backend=torch", "checkpoint.every_n_epochs=1",
        f"logging.output_dir={tmp_path}", f"logging.run_name={run}", *overrides])


def _reward_columns(rows):
    return [{k: v for k, v in r.items() if not k.endswith("_seconds")} for r in rows]


def test_remote_run_matches_in_process_and_a_killed_server_stops_it_resumably(tmp_path):
    local = Trainer(_cfg(tmp_path, "local")).fit()
    with Serving() as s:
        remote = Trainer(_cfg(tmp_path, "remote", "reward.name=remote", f"reward.kwargs={json.dumps({'url': s.url, **FAST})}")).fit()
        calls = s.calls
    assert _reward_columns(remote) == _reward_columns(local)  # rewards, losses and norms, exactly
    # the server is killed during epoch 2: the run stops with one line; epoch 1's checkpoint resumes it
    with Serving(die_after=calls // 2 + 1) as s:
        kwargs = json.dumps({"url": s.url, **FAST})
        with pytest.raises(RewardError, match="failed after 3 attempts") as err:
            Trainer(_cfg(tmp_path, "killed", "reward.name=remote", f"reward.kwargs={kwargs}")).fit()
    assert "\n" not in str(err.value)
    assert (tmp_path / "killed/checkpoints/epoch-0001").is_dir()
    assert not (tmp_path / "killed/checkpoints/epoch-0002").exists()
    with Serving() as s:
        kwargs = json.dumps({"url": s.url, **FAST})
        resumed = Trainer(_cfg(tmp_path, "killed", "reward.name=remote", f"reward.kwargs={kwargs}",
                               "train.resume=latest")).fit()
    assert _reward_columns(resumed) == _reward_columns(local)


def test_serve_reward_command_on_loopback(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "fastdag.cli", "serve-reward", "brightness", "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        line = proc.stdout.readline()  # "serving reward 'brightness' on http://127.0.0.1:PORT ..."
        assert "serving reward 'brightness' on http://127.0.0.1:" in line, proc.stderr.read() if proc.poll() else line
        url = line.split(" on ")[1].split()[0]
        images = uint8_images(3)
        torch.testing.assert_close(RemoteReward(url, **FAST)(images, ["a"] * 3), images.mean(dim=(1, 2, 3)))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
