"""fastdag bench gpu-check on a CPU: the plan (also with the carried packages hidden), the rehearsal of its stages,
what a kill or a time limit leaves in --out, and the carried wheels. No test here needs a GPU."""
import csv
import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from fastdag.bench import gpu_check

REPO = Path(__file__).resolve().parents[1]
CARRIED = ("diffusers", "peft", "deepspeed", "bitsandbytes")
HIDE = '''import importlib.abc, os, sys
HIDDEN = set(os.environ["GPU_CHECK_TEST_HIDE"].split(","))
class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in HIDDEN:
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by the test)", name=name)
sys.meta_path.insert(0, Hide())
'''


def command(*args):
    return [sys.executable, "-m", "fastdag.bench", "gpu-check", *args]


def run(*args, env=None, timeout=300):
    return subprocess.run(command(*args), cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)


def hidden_env(tmp_path, modules=CARRIED):
    """An environment whose Python (and every child of it) cannot import ``modules``: the GPU image before install."""
    site = tmp_path / "hide"
    site.mkdir()
    (site / "sitecustomize.py").write_text(HIDE)
    return {**os.environ, "PYTHONPATH": str(site), "GPU_CHECK_TEST_HIDE": ",".join(modules)}


def rows(out):
    with open(out / gpu_check.CSV_NAME, newline="") as f:
        return list(csv.DictReader(f))


def live_members(pgid):
    """Processes of a process group that are not zombies (a container's PID 1 may never reap them)."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            alive.append(int(stat.parent.name))
    return alive


def stage_group(log_text, stage):
    line = next(ln for ln in log_text.splitlines() if ln.startswith(f"[gpu-check] stage {stage}: pid"))
    return int(line.rsplit(" ", 1)[1])


def wait_for(predicate, timeout=120.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def test_dry_run_prints_the_plan_with_sizes_and_limits(capsys):
    res = run("--dry-run", "--preset", "tiny")
    assert res.returncode == 0, res.stderr[-2000:]
    out = res.stdout
    assert "tiny-random" in out and "8 trajectories x 10 steps" in out and "80 trained transitions" in out
    for stage in gpu_check.STAGES:
        assert f"  {stage} " in out, stage
    limits = {line.split()[0]: int(line.split("<=")[1].split("s")[0]) for line in out.splitlines() if "<=" in line}
    assert limits == {name: s.limit for name, s in gpu_check.STAGES.items()}
    required = {k: v for k, v in limits.items() if not gpu_check.STAGES[k].optional}
    assert sum(required.values()) <= gpu_check.BUDGET_SECONDS == 8 * 60  # the limits fit the 8-minute budget
    assert [k for k in limits if k not in required] == ["sd35m"]  # last: only in what the others leave
    assert list(limits) == list(gpu_check.STAGES)[:len(limits)] and list(limits)[:4] == ["install", "throughput",
                                                                                         "bandwidth", "kernels"]
    assert "sd35m" in out and "if its whole limit is left" in out
    assert gpu_check.main(["--dry-run", "--limit", "throughput=99"]) == 0
    sd15 = capsys.readouterr().out
    assert "unet 860 M" in sd15 and "400 trained transitions" in sd15 and "throughput  <=  99 s" in sd15


def test_dry_run_with_the_carried_packages_hidden_exits_0(tmp_path):
    """The GPU image has no diffusers, peft or deepspeed until the carried wheels are installed: planning must not
    need them."""
    res = run("--dry-run", env=hidden_env(tmp_path))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Traceback" not in res.stderr and "model parameters: counted once diffusers imports" in res.stdout
    assert "sd15-random" in res.stdout and "throughput" in res.stdout


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a CUDA machine would run the check")
def test_without_cuda_it_exits_2_with_one_line():
    res = run("--stages", "nvml")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "no CUDA device" in res.stderr


def test_rehearsal_writes_every_stage_rows_as_it_goes(tmp_path):
    """The CPU rehearsal of the P2–P5 stages and two quick ones: each starts, writes its rows, keeps its limit;
    the revision passed in reaches every row; --out holds at most 8 small files, two folders deep at most."""
    out = tmp_path / "out"
    stages = ["install", "throughput", "bandwidth", "attention", "nvml"]
    res = run("--rehearse", "--out", str(out), "--git-revision", "rev-under-test", "--stages", *stages)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted([gpu_check.CSV_NAME, gpu_check.SUMMARY_NAME, gpu_check.LOG_NAME, gpu_check.KERNELS_NAME,
                            gpu_check.THROUGHPUT_NAME]), files  # no stage.log left, no run folders
    assert all(p.is_file() and p.stat().st_size < 200_000 for p in out.iterdir())
    table = rows(out)
    assert {r["git_revision"] for r in table} == {"rev-under-test"} and len({r["run_id"] for r in table}) == 1
    with open(out / gpu_check.THROUGHPUT_NAME, newline="") as f:
        assert {r["git_revision"] for r in csv.DictReader(f)} == {"rev-under-test"}
    by_stage = {}
    for r in table:
        by_stage.setdefault(r["stage"], {})[r["metric"]] = r
    for stage in stages:
        done = by_stage[stage]["stage_seconds"]
        assert float(done["value"]) <= gpu_check.STAGES[stage].limit and done["status"] in ("ok", "skipped"), done
    assert by_stage["nvml"]["stage_seconds"]["status"] == "skipped"  # no GPU here: skipped with its reason
    t = {k: v["value"] for k, v in by_stage["throughput"].items()}
    assert float(t["fastdag.mfu"]) > 0 and float(t["official.flops_per_epoch"]) > 0 and "fastdag.epoch0.seconds" in t
    assert float(t["fastdag.rollout_over_unet_only"]) > 0 and float(t["official.official_over_fastdag_epoch"]) > 0
    assert t["official.same_first_epoch_rewards"] == "1.0"  # both modes sample with the reference step on a CPU
    assert not any(k.startswith(("fastdag.phase_s", "cuda_graphs")) for k in t)  # no profiled epoch, no sweep here
    assert "reference.forward_backward.b2.gbps" in by_stage["bandwidth"] and "copy_gbps" in by_stage["bandwidth"]
    assert by_stage["install"]["have_diffusers"]["value"] == "True"
    summary = (out / gpu_check.SUMMARY_NAME).read_text()
    assert all(f"| {stage} |" in summary for stage in stages) and "rev-under-test" in summary
    log = (out / gpu_check.LOG_NAME).read_text()
    ran = [stage for stage in stages if by_stage[stage]["stage_seconds"]["note"].startswith("limit")]
    assert {"install", "throughput", "bandwidth", "attention"} <= set(ran)  # nvml skips without pynvml
    assert all(f"===== stage {stage} =====" in log for stage in ran) and "gpu-check plan, preset tiny" in log
    assert log.index("===== stage install") < log.index("gpu-check plan") < log.index("===== stage throughput")


def test_with_the_carried_packages_hidden_their_stages_skip_with_the_reason(tmp_path):
    out = tmp_path / "out"
    res = run("--rehearse", "--out", str(out), "--stages", "install", "graphs", "attention",
              env=hidden_env(tmp_path))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    done = {r["stage"]: r for r in rows(out) if r["metric"] == "stage_seconds"}
    assert done["graphs"]["status"] == "skipped" and "needs diffusers" in done["graphs"]["note"]
    assert done["attention"]["status"] == "ok"  # torch alone
    have = {r["metric"]: r for r in rows(out) if r["stage"] == "install"}
    assert have["have_diffusers"]["value"] == "False" and "hidden by the test" in have["have_diffusers"]["note"]


def test_a_kill_mid_run_leaves_every_finished_row_and_the_stage_group_dies(tmp_path):
    """SIGKILL to the parent (a command killed at the lease's limit) in the middle of a stage: the rows of the
    stages before it, the summary and the running stage's log are in --out, and the stage kills its own group."""
    out = tmp_path / "out"
    parent = subprocess.Popen(command("--rehearse", "--out", str(out), "--stages", "attention", "bandwidth", "kernels"),
                              cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    live = out / gpu_check.LIVE_NAME
    try:
        assert wait_for(lambda: live.exists() and "[gpu-check] stage kernels: pid" in live.read_text()), "no kernels"
        pgid = stage_group(live.read_text(), "kernels")
        assert wait_for(lambda: len(live_members(pgid)) >= 2), "pytest (the stage's child) never started"
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    assert wait_for(lambda: not live_members(pgid), timeout=15), "the stage outlived its parent"
    table = rows(out)
    finished = {r["stage"] for r in table if r["metric"] == "stage_seconds"}
    assert finished == {"bandwidth"}  # attention comes after kernels (stages run in order of value)
    assert any(r["stage"] == "bandwidth" and r["metric"] == "copy_gbps" and float(r["value"]) > 0 for r in table)
    summary = (out / gpu_check.SUMMARY_NAME).read_text()
    assert "| bandwidth | ok |" in summary and "running: kernels" in summary
    assert "===== stage bandwidth =====" in (out / gpu_check.LOG_NAME).read_text()
    assert "[gpu-check] stage kernels" in live.read_text()  # the running stage's log so far


def test_a_stage_past_its_limit_is_killed_with_its_whole_process_group(tmp_path):
    out = tmp_path / "out"
    res = run("--rehearse", "--out", str(out), "--stages", "kernels", "--limit", "kernels=6")
    assert res.returncode == 1
    done = next(r for r in rows(out) if r["metric"] == "stage_seconds")
    assert done["status"] == "timed out" and "killed (its process group) after 6 s" in done["note"]
    assert float(done["value"]) < 20
    log = (out / gpu_check.LOG_NAME).read_text()
    assert not live_members(stage_group(log, "kernels"))  # pytest, a grandchild, went with it
    assert not (out / gpu_check.LIVE_NAME).exists()


def test_the_budget_skips_a_stage_it_cannot_fit(tmp_path):
    out = tmp_path / "out"
    res = run("--rehearse", "--out", str(out), "--stages", "attention", "nvml", "--budget", "31", "--limit",
              "attention=30", "--limit", "nvml=60")
    assert res.returncode == 0, res.stdout[-2000:]
    done = {r["stage"]: r for r in rows(out) if r["metric"] == "stage_seconds"}
    assert done["nvml"]["status"] == "skipped" and "budget" in done["nvml"]["note"]


def test_epoch_stage_reports_seconds_memory_and_finite_losses(capsys):
    """The epoch stage's body in-process (the torch engine: DeepSpeed's first start on a CPU JIT-builds an op)."""
    gpu_check._epoch_stage("tiny", ["dag.algorithm=kl", "engine.backend=torch", *gpu_check.REHEARSAL], prefix="kl.")
    lines = [json.loads(line[len(gpu_check.MARK):]) for line in capsys.readouterr().out.splitlines()
             if line.startswith(gpu_check.MARK)]
    metrics = {r["metric"]: r["value"] for r in lines}
    assert metrics["kl.finite"] is True and metrics["kl.rollout_seconds"] > 0 and "kl.kl_loss" in metrics


def test_environment_survives_any_failure(monkeypatch):
    def broken():
        raise RuntimeError("no")

    monkeypatch.setattr(gpu_check.harness, "git_revision", broken)
    monkeypatch.setattr(gpu_check, "_hardware", lambda cuda_context: broken())
    monkeypatch.setattr(gpu_check, "_version", lambda module: broken())
    env = gpu_check._environment()
    assert env["git_revision"] == env["hardware"] == env["diffusers_version"] == "unknown (RuntimeError)"
    assert set(env) | {"timestamp", "run_id", "stage", "status", "metric", "value", "unit", "note"} == set(
        gpu_check.FIELDS)


def _wheel(path: Path, name: str, version: str, members: dict) -> Path:
    """A minimal wheel: the given files, METADATA, WHEEL and a RECORD naming them all."""
    info = f"{name}-{version}.dist-info"
    files = {**members, f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = "".join(f"{f},,\n" for f in files) + f"{info}/RECORD,,\n"
    wheel = path / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for f, text in {**files, f"{info}/RECORD": record}.items():
            z.writestr(f, text)
    return wheel


def test_prepare_wheels_strips_bitsandbytes_drops_stale_versions_and_states_the_size(tmp_path, capsys):
    libs = {f"bitsandbytes/libbitsandbytes_{v}.so": "x" * 1000 for v in ("cuda118", "cuda128", "cuda130", "cpu",
                                                                          "rocm64", "xpu2025")}
    stale = _wheel(tmp_path, "peft", "0.0.1", {"peft/__init__.py": ""})
    pins = dict(p.split("==") for p in gpu_check.carried_pins())

    def fetch(requirement, wheels_dir):
        name, version = requirement.split("==")
        members = libs if name == "bitsandbytes" else {}
        _wheel(wheels_dir, name.replace("-", "_"), version, {f"{name.replace('-', '_')}/__init__.py": "", **members})
        return True

    assert gpu_check.prepare_wheels(tmp_path, fetch=fetch) == 0
    printed = capsys.readouterr().out
    assert not stale.exists() and "removing peft-0.0.1" in printed
    with zipfile.ZipFile(tmp_path / f"bitsandbytes-{pins['bitsandbytes']}-py3-none-any.whl") as z:
        names = set(z.namelist())
        record = z.read(f"bitsandbytes-{pins['bitsandbytes']}.dist-info/RECORD").decode()
    assert {n for n in names if n.endswith(".so")} == {"bitsandbytes/libbitsandbytes_cuda130.so",
                                                       "bitsandbytes/libbitsandbytes_cpu.so"}
    assert "cuda118" not in record and "libbitsandbytes_cpu.so" in record
    assert len(list(tmp_path.glob("*.whl"))) == len(pins)
    assert "carried:" in printed and "of the device tool's 64 MiB" in printed
    assert "--out \"$OUT\" --git-revision" in printed and "carry=['.whl']" in printed


def test_install_carried_puts_the_wheels_first_on_the_path(tmp_path):
    wheels = tmp_path / "whl"
    wheels.mkdir()
    _wheel(wheels, "carried_probe", "1.0", {"carried_probe/__init__.py": "VALUE = 42\n"})
    site = tmp_path / "site"
    count, note = gpu_check.install_carried(wheels, site)
    try:
        assert count == 1 and "1 wheels" in note and (site / "carried_probe" / "__init__.py").exists()
        assert sys.path[0] == str(site)
    finally:
        sys.path.remove(str(site))
    assert gpu_check.install_carried(tmp_path / "none", site) == (0, "no wheels carried in none/: the installed "
                                                                     "packages are used")


def test_nvml_telemetry_under_load_on_a_fake_nvml(capsys):
    """The nvml stage's GPU-only body, against a stand-in for pynvml: what it reads and emits."""
    from types import SimpleNamespace

    calls = []
    fake = SimpleNamespace(
        NVML_CLOCK_SM=0, NVML_CLOCK_MEM=1, NVML_TEMPERATURE_GPU=0,
        nvmlDeviceGetHandleByIndex=lambda i: "h", nvmlSystemGetDriverVersion=lambda: "580.159.04",
        nvmlDeviceGetEnforcedPowerLimit=lambda h: 700_000, nvmlDeviceGetMemoryInfo=lambda h: SimpleNamespace(
            total=143_771 * 2**20), nvmlDeviceGetPowerUsage=lambda h: 650_000 if calls else 90_000,
        nvmlDeviceGetClockInfo=lambda h, kind: 1980 if kind == 0 else 3201,
        nvmlDeviceGetTemperature=lambda h, kind: 40, nvmlDeviceGetCurrentClocksEventReasons=lambda h: 0x4)
    gpu_check.nvml_telemetry_under_load(fake, lambda: (calls.append(1), time.sleep(0.05)), seconds=0.4)
    metrics = {r["metric"]: r for r in (json.loads(line[len(gpu_check.MARK):]) for line in
                                        capsys.readouterr().out.splitlines() if line.startswith(gpu_check.MARK))}
    assert metrics["driver"]["value"] == "580.159.04" and metrics["power_limit_w"]["value"] == 700
    assert metrics["idle.power_w"]["value"] == 90 and metrics["load.power_w.max"]["value"] == 650
    assert metrics["load.clock_event_reasons"]["value"] == "0x4" and len(calls) >= 4


def test_bandwidth_stage_reports_triton_against_eager_and_copy(monkeypatch, capsys, tmp_path):
    """The P5 stage's rows when the Triton provider ran (a GPU), from the kernel benchmark's rows (faked here)."""
    from fastdag.bench import bench_kernels

    def fake_main(argv):
        assert "--no-compile" in argv and "--backward" in argv and "8" in argv and "32" in argv
        return [{"provider": p, "mode": "forward", "x_value": 8, "median_ms": ms, "gbps": gbps, "frac_of_copy_bw": f,
                 "copy_gbps": "4300"} for p, ms, gbps, f in (("reference", "0.40", "500", "0.116"),
                                                            ("triton", "0.08", "2500", "0.581"))]

    monkeypatch.setattr(bench_kernels, "main", fake_main)
    gpu_check._bandwidth_stage(gpu_check.Context("sd15", rehearse=False, out=tmp_path))
    metrics = {r["metric"]: r for r in (json.loads(line[len(gpu_check.MARK):]) for line in
                                        capsys.readouterr().out.splitlines() if line.startswith(gpu_check.MARK))}
    assert metrics["copy_gbps"]["value"] == 4300 and metrics["triton.forward.b8.gbps"]["value"] == 2500
    assert metrics["triton_speedup_over_eager.forward.b8"]["value"] == 5.0 and "58.1% of copy" in metrics[
        "triton.forward.b8.gbps"]["note"]
    assert "triton" not in metrics  # no 'needs a GPU' row when it ran
