"""Prompt sets: named sets shipped with the package, or a file (.txt, .csv, .json)."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from fastdag.config import ConfigError, PromptsConfig

# Small built-in sets, written for this project (the paper's sets are files the user provides).
NAMED_SETS: dict[str, Callable[[], list[str]]] = {
    "tiny": lambda: [
        f"a {c} {a} in the {p}"
        for c in ("red", "blue", "green", "yellow")
        for a in ("cat", "dog", "bird", "fish")
        for p in ("field", "city")
    ],
    "empty": lambda: [""],  # unconditional models
}


def _shapes(split: str) -> Callable[[], list[str]]:
    def load() -> list[str]:
        from fastdag.toy.world import shapes_prompts

        return shapes_prompts(split)

    return load


# The shapes world's fixed split: the model is pretrained and aligned on "shapes", evaluated on "shapes-heldout".
NAMED_SETS["shapes"] = _shapes("train")
NAMED_SETS["shapes-heldout"] = _shapes("heldout")


# The paper's prompt sets, shipped in fastdag/assets/prompts from their public files. DrawBench and HPDv2 keep the
# official code's split: DrawBench without Misspellings and Rare Words, the first two prompts of each remaining
# category held out; HPDv2 photo + paintings, the first ten of each held out.
PROMPTS_DIR = Path(__file__).parent / "assets" / "prompts"
DRAWBENCH_DROPPED = ("Misspellings", "Rare Words")


def _drawbench(heldout: bool) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    with (PROMPTS_DIR / "drawbench.csv").open(newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            if row["Category"] in DRAWBENCH_DROPPED:
                continue
            seen[row["Category"]] = seen.get(row["Category"], 0) + 1
            if (seen[row["Category"]] <= 2) == heldout:
                out.append(row["Prompts"].strip())
    return out


def _hpdv2(heldout: bool) -> list[str]:
    out = []
    for style in ("photo", "paintings"):
        prompts = json.loads((PROMPTS_DIR / f"hpdv2_benchmark_{style}.json").read_text(encoding="utf-8"))
        out += [p.strip() for p in (prompts[:10] if heldout else prompts[10:])]
    return out


NAMED_SETS["simple_animals"] = lambda: _read_txt(PROMPTS_DIR / "simple_animals.txt")
NAMED_SETS["imagenet_classes"] = lambda: _read_txt(PROMPTS_DIR / "imagenet_classes.txt")
NAMED_SETS["drawbench"] = lambda: _drawbench(heldout=False)
NAMED_SETS["drawbench-heldout"] = lambda: _drawbench(heldout=True)
NAMED_SETS["hpdv2"] = lambda: _hpdv2(heldout=False)
NAMED_SETS["hpdv2-heldout"] = lambda: _hpdv2(heldout=True)


def _shapes_task(task: str, split: str) -> Callable[[], list[str]]:
    def load() -> list[str]:
        from fastdag.toy.prompt_sets import shapes_task_prompts

        return shapes_task_prompts(task, split)  # type: ignore[arg-type]

    return load


# The shapes world's tasks (fastdag.toy.prompt_sets): prompts that leave attributes for the reward to choose.
for _task in ("aesthetic", "align", "compress"):
    NAMED_SETS[f"shapes-{_task}"] = _shapes_task(_task, "train")
    NAMED_SETS[f"shapes-{_task}-heldout"] = _shapes_task(_task, "heldout")


def register_prompt_set(name: str, loader: Callable[[], list[str]]) -> None:
    NAMED_SETS[name] = loader


def _read_txt(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _read_csv(path: Path, column: str, exclude: set[str]) -> list[str]:
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        fields = reader.fieldnames or []
        if column not in fields:
            raise ConfigError(f"prompts.column: {path.name} has no column {column!r}; its columns: {', '.join(fields)}")
        category = next((f for f in fields if f.lower() == "category"), None)
        return [
            row[column].strip()
            for row in reader
            if row[column] and row[column].strip() and not (category and row[category] in exclude)
        ]


def _read_json(path: Path, exclude: set[str]) -> list[str]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"prompts.source: {path} is not valid JSON ({e})") from None
    if isinstance(data, list):
        if not all(isinstance(p, str) for p in data):
            raise ConfigError(f"prompts.source: {path} must be a list of strings or an object {{prompt: metadata}}")
        return [p.strip() for p in data if p.strip()]
    if isinstance(data, dict):
        def category(meta) -> Optional[str]:
            return meta.get("category") if isinstance(meta, dict) else None

        return [p.strip() for p, meta in data.items() if p.strip() and category(meta) not in exclude]
    raise ConfigError(f"prompts.source: {path} must be a list of strings or an object {{prompt: metadata}}")


def _check_text(path: Path, source: str) -> None:
    """A prompt file is UTF-8 text without NUL bytes: anything else is one line, not a UnicodeDecodeError
    traceback (and not a prompt that C code, a tokenizer or a terminal would cut short)."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"prompts.source: {source!r} is not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise ConfigError(f"prompts.source: cannot read {source!r} ({e.strerror or e})") from None
    nul = text.find("\0")
    if nul >= 0:
        raise ConfigError(f"prompts.source: {source!r} holds a NUL byte on line {text.count(chr(10), 0, nul) + 1}; "
                          "a prompt file is text")


def load_prompts(cfg: PromptsConfig) -> list[str]:
    """The prompts of ``prompts.source``; an unknown name, a missing file or no prompts is a ConfigError."""
    source = cfg.source
    if source in NAMED_SETS:
        prompts = NAMED_SETS[source]()
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise ConfigError(
                f"prompts.source: {source!r} is neither a named set ({', '.join(sorted(NAMED_SETS))}) nor a file"
            )
        exclude = set(cfg.exclude_categories)
        _check_text(path, source)
        suffix = path.suffix.lower()
        if suffix == ".csv":
            prompts = _read_csv(path, cfg.column, exclude)
        elif suffix == ".json":
            prompts = _read_json(path, exclude)
        else:
            prompts = _read_txt(path)
        if not prompts:
            raise ConfigError(f"prompts.source: {source!r} holds no prompts")
    for i, prompt in enumerate(prompts):  # a JSON file's "\u0000", a registered set's strings
        if "\0" in prompt:
            raise ConfigError(f"prompts.source: prompt {i + 1} of {source!r} holds a NUL character")
    return prompts


class PromptSampler:
    """Draws prompts uniformly with replacement from its own seeded generator (so a resume can restore it)."""

    def __init__(self, prompts: list[str], seed: int):
        self.prompts = prompts
        self.rng = np.random.default_rng(seed)

    def sample(self, n: int) -> list[str]:
        return [self.prompts[i] for i in self.rng.integers(0, len(self.prompts), size=n)]

    def state_dict(self) -> dict:
        return {"bit_generator": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["bit_generator"]
