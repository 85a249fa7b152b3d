"""Pipelines shipped inside the package, by name (``model.pretrained: NAME``)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

ASSETS_DIR = Path(__file__).parent / "assets"

# name -> function returning the pipeline directory
PIPELINES: dict[str, Callable[[], Path]] = {
    # the embedded default: a pretrained miniature SD-architecture model of the shapes world (fastdag.toy)
    "shapes-tiny": lambda: ASSETS_DIR / "shapes-tiny",
    # the same world on Stable Diffusion 3's architecture, trained with rectified flow (fastdag.toy.pretrain_flow)
    "shapes-flow-tiny": lambda: ASSETS_DIR / "shapes-flow-tiny",
}
