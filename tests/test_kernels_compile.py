"""Every Triton kernel compiles for a GPU (sm_90, through PTX and cubin) on a CPU-only machine.

The interpreter does not specialise arguments, so GPU-only compile errors pass unseen there: e.g. an int argument
equal to 1 (B = 1, D = 1, a single block) becomes a constexpr, and ``n.to(tl.float32)`` on it fails to compile.
This compiles the kernels ahead of time, in a subprocess without TRITON_INTERPRET, with such specialisations.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton.backends.nvidia.compiler", reason="needs Triton's NVIDIA backend")

REPO_ROOT = Path(__file__).resolve().parents[1]

COMPILE_ALL = r'''
import importlib
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler.compiler import ASTSource

FP32_POINTERS = {"alpha_t_ptr", "alpha_prev_ptr", "target_ptr", "sq_pf_ptr", "sq_pb_ptr", "log_pf_ptr", "log_pb_ptr",
                 "grad_log_pf_ptr", "residual_ptr", "loss_ptr", "grad_loss_ptr", "advantages_ptr"}
FLOAT_SCALARS = {"eta", "adv_clip", "eps", "clip_range"}

def compile_for_sm90(module, kernel, constexprs, ones=()):
    """Other pointers are bf16; ints named in `ones` are 1, which Triton turns into constexprs."""
    fn = getattr(importlib.import_module(module), kernel)
    signature, constants = {}, dict(constexprs)
    for name in fn.arg_names:
        if name in constexprs or name in ones:
            signature[name] = "constexpr"
            constants.setdefault(name, 1)
        elif name.endswith("_ptr"):
            signature[name] = "*fp32" if name in FP32_POINTERS else "*bf16"
        else:
            signature[name] = "fp32" if name in FLOAT_SCALARS else "i32"
    triton.compile(ASTSource(fn, signature, constants), target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    print("compiled", kernel, constants)

D, R = "fastdag.kernels.ddim_step", "fastdag.kernels.db_residual"
# PREDICTION: 0 epsilon, 1 v_prediction, 2 sample; each with and without the clip of x̂_0
for prediction, clip in ((0, False), (1, True), (2, True)):
    step = {"PREDICTION": prediction, "CLIP": clip, "BLOCK_SIZE": 1024}
    compile_for_sm90(D, "_ddim_step_forward_kernel", {"SAMPLING": True, **step})
    compile_for_sm90(D, "_ddim_step_forward_kernel", {"SAMPLING": False, **step}, ones=("n_elements",))
    flags = ("SAMPLING", "MEAN", "HAS_GRAD_X0", "HAS_GRAD_LOG_PF")
    compile_for_sm90(D, "_ddim_step_backward_kernel", {**dict.fromkeys(flags, True), **step}, ("n_elements",))
    compile_for_sm90(D, "_ddim_step_backward_kernel", {**dict.fromkeys(flags, False), **step, "HAS_GRAD_X0": True})
compile_for_sm90(D, "_ddim_step_reduce_kernel", {"MEAN": True, "BLOCK_SIZE": 16}, ones=("n_elements", "n_blocks"))
compile_for_sm90(R, "_db_residual_kernel", {"BLOCK_SIZE": 1024}, ones=("n_transitions",))
compile_for_sm90(R, "_db_loss_kernel", {"BLOCK_SIZE": 1024}, ones=("n_transitions",))
compile_for_sm90(R, "_db_residual_backward_kernel", {"HAS_GRAD_RESIDUAL": True, "HAS_GRAD_LOSS": True, "BLOCK_SIZE": 1024},
                 ones=("n_transitions",))
compile_for_sm90(R, "_rloo_advantages_kernel", {"OFFICIAL": True, "BLOCK_SIZE": 1024})
compile_for_sm90(R, "_rloo_advantages_kernel", {"OFFICIAL": False, "BLOCK_SIZE": 1024})
'''


def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    result = subprocess.run(
        [sys.executable, "-c", COMPILE_ALL], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert result.stdout.count("compiled") == 18
