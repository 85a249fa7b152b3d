"""The shapes world of the embedded default: captioned procedural images, an attribute classifier, a reward.

`world` draws and captions scenes and holds the fixed train / held-out prompt split; `classifier` trains and
loads the attribute classifier shipped in fastdag/assets/; `reward` turns it into `ShapesAlignmentReward` and
the accuracy metrics ("colour right X%, shape right Y%").
"""
from fastdag.toy.reward import ShapesAlignmentReward, shapes_accuracy, shapes_attribute_accuracy
from fastdag.toy.world import caption, parse_caption, render, sample_batch, sample_scene, shapes_prompts

__all__ = [
    "ShapesAlignmentReward",
    "caption",
    "parse_caption",
    "render",
    "sample_batch",
    "sample_scene",
    "shapes_accuracy",
    "shapes_attribute_accuracy",
    "shapes_prompts",
]
