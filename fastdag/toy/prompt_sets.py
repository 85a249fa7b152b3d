"""The named prompt sets of the shapes world's tasks, each with a train and a held-out split.

The paper's tasks in miniature: its prompts under-specify the image and the reward chooses among the images that
fit, so these sets state less than a full caption:

- aesthetic (the paper's 45 simple animal prompts): one shape, kind and colour only ("a red circle"); the 18
  kind × colour prompts split 12 / 6 so that each kind keeps 2 held-out colours and each colour 1 held-out
  kind: (kind index + colour index) mod 3 == 0 is held out. The reward's taste picks the rest.
- align (ImageReward on DrawBench): the full caption and one partial caption (attribute dropout 0.5, a fixed
  seed, redrawn until its text is new) of each scene of the world's fixed split, so train 1,024 and held-out
  128 prompts with no scene and no text shared.
- compress (JPEG compressibility on ImageNet class names): kinds only, one or two shapes ("a circle", "a square
  and a triangle"); the 12 prompts split 9 / 3, the held-out ones the three two-shape pairs in the order
  circle→square→triangle→circle, so every kind is held out as a first and as a second shape.

    shapes_task_prompts("aesthetic", "train") -> list[str]; registered in fastdag.prompts as
    "shapes-aesthetic", "shapes-aesthetic-heldout", "shapes-align", ... (`fastdag prompts` lists them).
"""
from __future__ import annotations

from functools import lru_cache
from typing import Literal

import numpy as np

from fastdag.toy.world import (
    COLOUR_NAMES,
    KINDS,
    Prompt,
    PromptShape,
    _prompt_split,
    describe,
    drop_attributes,
    prompt_of,
)

TASKS: tuple[str, ...] = ("aesthetic", "align", "compress")
SPLITS: tuple[str, ...] = ("train", "heldout")
_ALIGN_DROPOUT_SEED = 20261201
# Half the phrases dropped: the partial prompts of the align set cover short and long forms alike.
_ALIGN_DROPOUT = 0.5
_COMPRESS_HELDOUT = (("circle", "square"), ("square", "triangle"), ("triangle", "circle"))


def _aesthetic(split: str) -> list[str]:
    return [
        describe(Prompt((PromptShape(kind, colour=colour),)))
        for k, kind in enumerate(KINDS)
        for c, colour in enumerate(COLOUR_NAMES)
        if ((k + c) % 3 == 0) == (split == "heldout")
    ]


def _align(split: str) -> list[str]:
    rng = np.random.default_rng([_ALIGN_DROPOUT_SEED, SPLITS.index(split)])
    # Texts are kept disjoint as well as scenes: a partial caption ("a blue square") can describe scenes of
    # both splits, so the train split redraws any held-out text, and both redraw repeats.
    taken = set(_cached("align", "heldout")) if split == "train" else set()
    prompts = []
    for scene in _prompt_split()[split]:
        full = describe(prompt_of(scene))
        prompts.append(full)
        taken.add(full)
        for _ in range(1000):
            partial = describe(drop_attributes(scene, rng, _ALIGN_DROPOUT))
            if partial not in taken and partial != full:
                break
        else:
            raise RuntimeError(f"no unused partial caption of {full!r}")  # the fixed seed never gets here
        prompts.append(partial)
        taken.add(partial)
    return prompts


def _compress(split: str) -> list[str]:
    singles = [(kind,) for kind in KINDS]
    pairs = [(a, b) for a in KINDS for b in KINDS]
    chosen = list(_COMPRESS_HELDOUT) if split == "heldout" else singles + [p for p in pairs if p not in _COMPRESS_HELDOUT]
    return [describe(Prompt(tuple(PromptShape(kind) for kind in kinds))) for kinds in chosen]


@lru_cache(maxsize=None)
def _cached(task: str, split: str) -> tuple[str, ...]:
    return tuple({"aesthetic": _aesthetic, "align": _align, "compress": _compress}[task](split))


def shapes_task_prompts(task: Literal["aesthetic", "align", "compress"], split: Literal["train", "heldout"]) -> list[str]:
    """The prompts of one task's split (fixed: a pure function of the arguments); ValueError names bad arguments."""
    if task not in TASKS or split not in SPLITS:
        raise ValueError(f"task must be one of {TASKS} and split one of {SPLITS}, got {task!r}, {split!r}")
    return list(_cached(task, split))
