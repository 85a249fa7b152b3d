"""A fresh install stays working: no import name of ours shadows a dependency's, and the lock agrees with setup.py.

Hugging Face's ``kernels`` (a dependency of transformers >= 5.25, imported when a model loads) once lost to the
repository's own top-level ``kernels/`` whenever the repository root headed ``sys.path`` (pytest, ``python -m``,
``fastdag/train.py``), and a non-editable install would have written over it.
"""
import ast
import re
import shutil
import subprocess
import sys
import sysconfig
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
LOCK = REPO / "requirements.lock"
GPU_LOCK = REPO / "requirements-gpu.lock"
SITE = Path(sysconfig.get_paths()["purelib"]).resolve()
# A transformers model load imports Hugging Face's kernels (transformers/integrations/hub_kernels.py).
LOAD_A_MODEL = ("from transformers import CLIPTextConfig, CLIPTextModel; "
                "CLIPTextModel(CLIPTextConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1, "
                "num_attention_heads=2, vocab_size=50))")
WHERE_IS_KERNELS = "import kernels, transformers; print(kernels.__file__)"


def _python(code: str, cwd: Path, exe: str = sys.executable) -> str:
    res = subprocess.run([exe, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout.strip()


def _setup_call() -> dict:
    """setup.py's keyword arguments, read without running it."""
    tree = ast.parse((REPO / "setup.py").read_text())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    return {k.arg: k.value for k in call.keywords}


def our_top_level_names() -> set[str]:
    """Every top-level module or package name of ours that can be imported: what setup.py installs, and what the
    repository root (``python -m``, ``fastdag/train.py``) and ``tests/`` (pytest's rootdir insertion) put on the
    path."""
    names = {p.stem for p in REPO.glob("*.py")} | {p.name for p in REPO.iterdir() if (p / "__init__.py").is_file()}
    names |= {p.stem for p in (REPO / "tests").glob("*.py") if not p.stem.startswith("test_")}
    return names - {"setup"}  # setup.py is never imported


def test_kernels_from_the_repository_root_is_hugging_faces():
    where = Path(_python(WHERE_IS_KERNELS, REPO))
    assert SITE in where.parents, f"`import kernels` from the repository root gives {where}"
    _python(LOAD_A_MODEL, REPO)


def test_kernels_under_pytest_is_hugging_faces():
    import kernels

    assert SITE in Path(kernels.__file__).resolve().parents, kernels.__file__
    from fastdag import kernels as ours

    assert callable(ours.ddim_step)


def test_no_top_level_name_of_ours_is_a_dependencys():
    """Against every installed distribution's top-level names (the dependency closure, and then some)."""
    theirs: dict[str, str] = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if not name or name.lower() == "fastdag":
            continue
        top = (dist.read_text("top_level.txt") or "").split()
        top += [f.parts[0].removesuffix(".py") for f in (dist.files or []) if len(f.parts) >= 1
                and not f.parts[0].endswith((".dist-info", ".egg-info", ".data", ".pth")) and f.parts[0] != ".."]
        theirs.update({t: name for t in top})
    ours = our_top_level_names()
    assert "fastdag" in ours
    clashes = {n: theirs[n] for n in ours if n in theirs}
    assert not clashes, f"names of ours that a dependency owns: {clashes}"


def test_setup_installs_only_the_fastdag_package():
    packages = ast.literal_eval(_setup_call()["packages"].keywords[0].value)
    assert packages == ["fastdag", "fastdag.*"]


def test_train_py_launcher_sees_hugging_faces_kernels():
    """The launcher shim puts the repository root first on sys.path, as `deepspeed fastdag/train.py` runs it."""
    code = ("import runpy, sys; sys.argv = ['fastdag/train.py', '--help']\n"
            "try:\n    runpy.run_path('fastdag/train.py', run_name='__main__')\n"
            "except SystemExit:\n    pass\n"
            f"{WHERE_IS_KERNELS}\n{LOAD_A_MODEL}")
    where = Path(_python(code, REPO).splitlines()[-1])
    assert SITE in where.parents, where


def test_a_non_editable_install_leaves_hugging_faces_kernels_intact(tmp_path):
    """pip install . (not -e) into a new venv that sees this one's packages: fastdag lands there and theirs stays."""
    src = tmp_path / "src"  # a copy: pip builds a local project in its own tree (build/, *.egg-info)
    shutil.copytree(REPO / "fastdag", src / "fastdag", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("setup.py", "README.md"):
        shutil.copy(REPO / name, src / name)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    exe = venv / "bin" / "python"
    new_site = Path(_python("import sysconfig; print(sysconfig.get_paths()['purelib'])", tmp_path, str(exe)))
    (new_site / "deps.pth").write_text(f"{SITE}\n")  # the dependencies, from this venv, behind the new site
    res = subprocess.run([sys.executable, "-m", "pip", "--python", str(exe), "install", "-q", "--no-deps",
                          "--no-build-isolation", "--no-index", str(src)], capture_output=True, text=True,
                         timeout=600, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert sorted(p.name for p in new_site.iterdir() if not p.name.endswith((".dist-info", ".pth"))) == ["fastdag"]
    where = Path(_python(WHERE_IS_KERNELS, tmp_path, str(exe)))
    assert SITE in where.parents, where
    _python(LOAD_A_MODEL + "; from fastdag import kernels as k; assert callable(k.ddim_step)", tmp_path, str(exe))


def _lock() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def test_every_locked_version_lies_in_setup_pys_ranges():
    kw = _setup_call()
    requirements = ast.literal_eval(kw["install_requires"]) + ast.literal_eval(kw["extras_require"])["test"]
    pins = _lock()
    for text in requirements:
        req = Requirement(text)
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        assert name in pins, f"{req.name} is required by setup.py but not in {LOCK.name}"
        assert req.specifier.contains(pins[name], prereleases=True), \
            f"{LOCK.name} pins {req.name}=={pins[name]}, outside setup.py's {req.specifier}"


def test_the_lock_check_names_a_drifted_package(tmp_path):
    lock = tmp_path / "drifted.lock"
    text = LOCK.read_text()
    version = metadata.version("transformers")
    lock.write_text(re.sub(r"(?m)^transformers==.*$", "transformers==0.0.1", text) + "not-installed-pkg==1.0\n")
    res = subprocess.run([sys.executable, str(REPO / ".ci/deps.py"), "check", str(lock)], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 1 and res.stdout == ""
    assert len(res.stderr.strip().splitlines()) == 1
    assert f"transformers {version} (lock 0.0.1)" in res.stderr and "not-installed-pkg missing" in res.stderr


def test_the_gpu_lock_carries_the_versions_the_cpu_suite_tested():
    """requirements-gpu.lock: exact pins; where requirements.lock has the package, the same version; inside setup.py's
    ranges (install_requires and the gpu extra) where those name it."""
    from fastdag.bench.gpu_check import STRIP, carried_pins

    pins = {re.sub(r"[-_.]+", "-", p.split("==")[0]).lower(): p.split("==")[1] for p in carried_pins()}
    assert {"diffusers", "peft", "deepspeed", "bitsandbytes"} <= set(pins)
    stripped = {line.split("==")[0] for line in GPU_LOCK.read_text().splitlines()
                if "# stripped" in line and not line.startswith("#")}
    assert stripped == set(STRIP) == {"bitsandbytes"}  # what the lock says is stripped is what the code strips
    cpu = _lock()
    for name, version in pins.items():
        assert re.fullmatch(r"[0-9][0-9A-Za-z.]*", version), f"{name}: {version} is not an exact version"
        if name in cpu:
            assert version == cpu[name], f"requirements-gpu.lock pins {name}=={version}, requirements.lock {cpu[name]}"
    kw = _setup_call()
    ranges = ast.literal_eval(kw["install_requires"]) + ast.literal_eval(kw["extras_require"])["gpu"]
    for text in ranges:
        req = Requirement(text)
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        if name in pins:
            assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} outside {req.specifier}"
