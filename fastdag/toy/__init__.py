"""The shapes world of the embedded default: captioned procedural images, an attribute classifier, rewards, a judge.

`world` draws and captions scenes (full captions, and partial ones under attribute dropout) and holds the fixed
train / held-out scene split; `prompt_sets` the tasks' prompt sets; `negatives` the non-renders the realism
outputs learn to refuse; `classifier` trains and loads the attribute-and-realism classifier shipped in
fastdag/assets/; `reward` turns it into `ShapesAlignmentReward`, `ShapesAestheticReward` and the accuracy
metrics ("colour right X%, shape right Y%"); `judge` is the independent judge that evaluation alone reads.
"""
from fastdag.toy.reward import (
    ShapesAestheticReward,
    ShapesAlignmentReward,
    shapes_accuracy,
    shapes_attribute_accuracy,
)
from fastdag.toy.world import (
    caption,
    describe,
    parse_caption,
    parse_prompt,
    render,
    sample_batch,
    sample_scene,
    shapes_prompts,
)

__all__ = [
    "ShapesAestheticReward",
    "ShapesAlignmentReward",
    "caption",
    "describe",
    "parse_caption",
    "parse_prompt",
    "render",
    "sample_batch",
    "sample_scene",
    "shapes_accuracy",
    "shapes_attribute_accuracy",
    "shapes_prompts",
]
