"""Helpers shared by the kernel tests: where they run, poisoned outputs, and the reference-relative error bound."""
from __future__ import annotations

import zlib
from typing import Iterator

import pytest
import torch
import torch.utils.deterministic

from fastdag.kernels._compat import HAS_TRITON, INTERPRETED

# In the interpreter the kernels run on CPU tensors; compiled kernels need CUDA tensors.
DEVICE = "cpu" if INTERPRETED else "cuda"
requires_triton = pytest.mark.skipif(
    not HAS_TRITON or (not INTERPRETED and not torch.cuda.is_available()),
    reason="needs Triton with a GPU, or TRITON_INTERPRET=1 set before kernels were imported",
)


@pytest.fixture(autouse=True)
def poisoned_outputs_and_seed(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every torch.empty* is NaN-filled (so an element a kernel never writes fails the finiteness check), and each
    test gets its own reproducible seed (fresh inputs per test, not shared module-level tensors)."""
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
        torch.utils.deterministic.fill_uninitialized_memory = fill


def assert_within_reference_error(
    actual: torch.Tensor,
    ref_fp32: torch.Tensor,
    ref_lowp: torch.Tensor,
    name: str,
    atol: float = 1e-6,
    rtol: float = 1e-5,
) -> None:
    """flash-attention's bound: err(kernel, ref_fp32) <= 2·err(ref_lowp, ref_fp32) + atol + rtol·max|ref_fp32|.

    ``ref_fp32`` is the reference on the inputs upcast to fp32, ``ref_lowp`` the reference on the inputs as given
    (its outputs rounded to the input dtype). The rtol term allows for fp32 summation order in reductions over
    many elements (e.g. a sum-reduced log-density of ~1e5). Triton's interpreter casts fp32 → bf16 by truncation
    where GPUs (and torch) round to nearest, an error of up to one ulp anywhere; so in the interpreter a
    low-precision output also gets one unit of its dtype's epsilon relative to max|ref_fp32|.
    """
    assert actual.shape == ref_fp32.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(ref_fp32.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values (an unwritten, NaN-poisoned element?)"
    err = (actual.double() - ref_fp32.double()).abs().max().item()
    ref_err = (ref_lowp.double() - ref_fp32.double()).abs().max().item()
    scale = ref_fp32.double().abs().max().item()
    bound = 2 * ref_err + atol + rtol * scale
    if INTERPRETED and actual.dtype in (torch.bfloat16, torch.float16):
        bound += torch.finfo(actual.dtype).eps * scale
    assert err <= bound, f"{name}: max error {err:.3e} > bound {bound:.3e} (ref_lowp error {ref_err:.3e})"
