"""fastdag.kernels.dispatch: backend resolution, routing, and a kernels package that imports without Triton."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from kernel_testing import DEVICE, requires_triton  # noqa: E402

from fastdag import kernels  # noqa: E402
from fastdag.kernels._compat import HAS_TRITON, INTERPRETED  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_resolve_backend():
    assert kernels.resolve_backend("reference", "cuda") == "reference"
    assert kernels.resolve_backend("auto", "cpu") == "reference"
    assert kernels.resolve_backend("auto", torch.device("cuda", 0)) == ("triton" if HAS_TRITON else "reference")
    if HAS_TRITON:
        assert kernels.resolve_backend("triton", "cuda") == "triton"
    if INTERPRETED:
        assert kernels.resolve_backend("triton", "cpu") == "triton"
    with pytest.raises(ValueError, match="auto"):
        kernels.resolve_backend("cuda", "cpu")


@requires_triton
def test_dispatch_routes_to_both_backends(monkeypatch):
    calls = []
    monkeypatch.setattr(kernels.dispatch, "ddim_step_triton", lambda *a, **k: calls.append("triton"))
    monkeypatch.setattr(kernels.dispatch, "ddim_step_reference", lambda *a, **k: calls.append("reference"))
    x = torch.randn(2, 3, device=DEVICE)
    alphas = torch.full((2,), 0.5, device=DEVICE)
    for backend in ("triton", "reference", "auto"):
        kernels.ddim_step(x, x, alphas, alphas, 1.0, backend=backend)
    assert calls == ["triton", "reference", "triton" if DEVICE == "cuda" else "reference"]


@requires_triton
def test_dispatch_results_agree():
    flows = [torch.randn(5, device=DEVICE) for _ in range(4)]
    for fn in (kernels.db_residual, kernels.db_loss):
        torch.testing.assert_close(fn(*flows, backend="triton"), fn(*flows, backend="reference"))
    torch.testing.assert_close(
        kernels.rloo_advantages(flows[0], 5.0, backend="triton"), kernels.rloo_advantages(flows[0], 5.0, "reference")
    )


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | env
    return subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, env=environ, capture_output=True, text=True, timeout=120
    )


def test_kernels_import_without_triton():
    """With Triton unimportable, `import kernels` works, auto/reference run, and triton is a clear error."""
    code = """
import sys
sys.modules["triton"] = None  # makes `import triton` raise ImportError
import torch
from fastdag import kernels
assert not kernels.HAS_TRITON
x = torch.randn(2, 4)
alphas = torch.tensor([0.3, 0.4]), torch.tensor([0.5, 0.6])
out = kernels.ddim_step(x, x, *alphas, 1.0, x_prev=x, backend="auto")
assert torch.isfinite(out.log_pf).all()
kernels.db_loss(*[torch.randn(3) for _ in range(4)])
try:
    kernels.resolve_backend("triton", "cuda")
except ValueError as e:
    print("ValueError:", e)
"""
    result = _run(code, OMP_NUM_THREADS="1")
    assert result.returncode == 0, result.stderr
    assert "needs Triton installed" in result.stdout


@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton")
def test_triton_on_cpu_needs_interpreter():
    code = """
from fastdag import kernels
try:
    kernels.resolve_backend("triton", "cpu")
except ValueError as e:
    print("ValueError:", e)
"""
    result = _run(code, OMP_NUM_THREADS="1")
    assert result.returncode == 0, result.stderr
    assert "TRITON_INTERPRET=1" in result.stdout
