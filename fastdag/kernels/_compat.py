"""Optional Triton import shared by the kernel files.

The PyTorch references must import on machines without Triton, so the kernel files import ``triton`` and
``tl`` from here. Without Triton they get a stand-in whose ``jit`` leaves the function undecorated (never
launched: the public Triton functions call :func:`require_triton` first). The kernel files use
``from __future__ import annotations``, so ``tl.constexpr`` parameter annotations are never evaluated.

``INTERPRETED`` records whether the kernels were decorated in interpreter mode. Triton decides that when
``@triton.jit`` runs (at import), so setting ``TRITON_INTERPRET=1`` after ``import kernels`` has no effect.
"""
from __future__ import annotations

from typing import Any, Callable, Optional


class _TritonMissing:
    """Stands in for ``triton`` and ``triton.language`` when Triton is not installed."""

    def jit(self, fn: Optional[Callable] = None, **kwargs: Any) -> Any:
        return fn if fn is not None else (lambda f: f)

    def constexpr(self, value: Any) -> Any:
        return value

    def __getattr__(self, name: str) -> Any:
        raise ImportError(f"triton.{name} is unavailable: Triton is not installed (use the reference backend)")


try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # the references below each kernel must stay usable without Triton
    triton = tl = _TritonMissing()  # type: ignore[assignment]
    HAS_TRITON = False


def _decorated_in_interpreter() -> bool:
    if not HAS_TRITON:
        return False

    @triton.jit
    def _probe() -> None:
        pass

    return type(_probe).__name__ == "InterpretedFunction"


INTERPRETED: bool = _decorated_in_interpreter()


def require_triton() -> None:
    """Raise a clear error before a Triton launch on a machine without Triton."""
    if not HAS_TRITON:
        raise ImportError("Triton is not installed; use backend='reference' (or 'auto')")
