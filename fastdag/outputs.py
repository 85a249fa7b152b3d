"""What a run leaves behind: its directory, ``config.yaml``, ``metrics.jsonl``, sample grids, checkpoints."""
from __future__ import annotations

import json
import math
import textwrap
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from fastdag.config import Config, save_config


def make_run_dir(cfg: Config, write_config: bool = True) -> Path:
    name = cfg.logging.run_name or f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.dag.algorithm}"
    run_dir = Path(cfg.logging.output_dir).expanduser() / name
    if not cfg.logging.run_name:  # never into an earlier run's directory, even one started the same second
        k = 1
        while run_dir.exists():
            k += 1
            run_dir = run_dir.with_name(f"{name}-{k}")
    run_dir.mkdir(parents=True, exist_ok=True)
    if write_config:
        save_config(cfg, run_dir / "config.yaml")
    return run_dir


class MetricsLog:
    """Appends one JSON object per epoch to ``metrics.jsonl`` (rank 0 only)."""

    def __init__(self, path: Path):
        self.path = path

    def write(self, row: dict[str, Any]) -> None:
        with self.path.open("a") as fh:
            fh.write(json.dumps(finite_or_null(row), allow_nan=False) + "\n")

    def rewrite(self, rows: list[dict[str, Any]]) -> None:
        """Replace the file with ``rows`` (a resumed run: the checkpoint's rows), atomically by a rename."""
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(finite_or_null(row), allow_nan=False) + "\n" for row in rows))
        tmp.replace(self.path)

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]


def finite_or_null(row: dict[str, Any]) -> dict[str, Any]:
    """NaN and ±inf as null: JSON has no such numbers, and a file with them is not JSON any more."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}


def sample_grid(images: torch.Tensor, captions: list[str], cell: int = 128, columns: Optional[int] = None) -> Image.Image:
    """images float [N, 3, H, W] in [0, 1] -> one PNG-ready picture, each image upscaled to ``cell`` pixels with
    its caption (prompt and reward) written under it."""
    n = images.shape[0]
    columns = columns or min(n, 4)
    rows = math.ceil(n / columns)
    text_h = 40
    font = ImageFont.load_default()
    grid = Image.new("RGB", (columns * cell, rows * (cell + text_h)), "white")
    draw = ImageDraw.Draw(grid)
    arr = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    for k in range(n):
        r, c = divmod(k, columns)
        tile = Image.fromarray(np.ascontiguousarray(arr[k])).resize((cell, cell), Image.NEAREST)
        grid.paste(tile, (c * cell, r * (cell + text_h)))
        lines = textwrap.wrap(captions[k], width=cell // 6)[:3]
        draw.multiline_text((c * cell + 2, r * (cell + text_h) + cell + 1), "\n".join(lines), fill="black", font=font)
    return grid


def save_sample_grid(path: Path, images: torch.Tensor, prompts: list[str], rewards: torch.Tensor) -> None:
    captions = [f"{p} | r={r:.3g}" for p, r in zip(prompts, rewards.tolist())]
    sample_grid(images, captions).save(path)
