"""The shipped shapes classifier, the alignment reward and the training recipe."""

from __future__ import annotations

import dataclasses
import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastdag.toy.classifier import (
    ASSETS_DIR,
    REPORT_NAME,
    WEIGHTS_NAME,
    evaluate_classifier,
    load_classifier,
    train_classifier,
)
from fastdag.toy.reward import ShapesAlignmentReward, shapes_accuracy, shapes_attribute_accuracy
from fastdag.toy.world import COLOUR_NAMES, Scene, Shape, caption, render, sample_batch

# Seeds the shipped classifier never trained or was evaluated on (it used SeedSequence(0) children).
SEED = 987654
ATTRIBUTES = ("position", "shape", "colour", "size", "count", "background")


@pytest.fixture(scope="module")
def reward() -> ShapesAlignmentReward:
    return ShapesAlignmentReward()


@pytest.fixture(scope="module")
def batch():
    return sample_batch(np.random.default_rng(SEED), 64)


def _recoloured(scene: Scene) -> Scene:
    """The scene with its first shape in the next colour: a prompt one attribute away."""
    first = scene.shapes[0]
    colour = COLOUR_NAMES[(COLOUR_NAMES.index(first.colour) + 1) % len(COLOUR_NAMES)]
    return dataclasses.replace(scene, shapes=(dataclasses.replace(first, colour=colour),) + scene.shapes[1:])


def test_shipped_files_are_small_and_report_accuracy() -> None:
    assert (ASSETS_DIR / WEIGHTS_NAME).stat().st_size < 5e6
    report = json.loads((ASSETS_DIR / REPORT_NAME).read_text())
    # The report predates the count attribute; the fresh-image test below checks every attribute.
    assert all(report["heldout_accuracy"][name] >= 0.95 for name in ATTRIBUTES if name != "count")


def test_shipped_classifier_reads_fresh_images() -> None:
    accuracy = evaluate_classifier(load_classifier(), np.random.default_rng(SEED + 1), n_images=512)
    for name in ATTRIBUTES:
        assert accuracy[name] >= 0.95, (name, accuracy)


def test_reward_prefers_the_matching_prompt(reward: ShapesAlignmentReward, batch) -> None:
    mismatched = [caption(_recoloured(s)) for s in batch.scenes]
    matched_reward = reward(batch.images, batch.captions)
    assert (matched_reward > reward(batch.images, mismatched)).all()
    # A wholly different scene's prompt scores lower too.
    assert (matched_reward > reward(batch.images, batch.captions[1:] + batch.captions[:1])).all()


def test_reward_and_accuracy_shapes_and_dtypes(reward: ShapesAlignmentReward, batch) -> None:
    images = batch.images[:5]
    prompts = batch.captions[:5]
    r = reward(images, prompts)
    assert r.shape == (5,) and r.dtype == torch.float32 and (r <= 0).all() and torch.isfinite(r).all()
    accuracy = shapes_accuracy(images, prompts)
    assert accuracy.shape == (5,) and accuracy.dtype == torch.float32
    assert ((accuracy >= 0) & (accuracy <= 1)).all()
    per_type = shapes_attribute_accuracy(images, prompts, reward)
    assert set(per_type) == {*ATTRIBUTES, "all"}
    for value in per_type.values():
        assert value.shape == (5,) and value.dtype == torch.float32
    torch.testing.assert_close(per_type["all"], accuracy)


def test_accuracy_counts_the_wrong_attribute(reward: ShapesAlignmentReward, batch) -> None:
    right = reward.attribute_accuracy(batch.images, batch.captions)
    assert right["all"].mean() > 0.98
    wrong = reward.attribute_accuracy(batch.images, [caption(_recoloured(s)) for s in batch.scenes])
    n_shapes = torch.tensor([len(s.shapes) for s in batch.scenes], dtype=torch.float32)
    # Exactly one colour is wrong per prompt; the other attribute types are untouched.
    torch.testing.assert_close(wrong["colour"], right["colour"] - 1 / n_shapes)
    torch.testing.assert_close(wrong["shape"], right["shape"])


def _image(scene: Scene) -> torch.Tensor:
    return torch.from_numpy(render(scene)).permute(2, 0, 1).float().div(255).unsqueeze(0)


def test_accuracy_judges_each_attribute_on_its_own(reward: ShapesAlignmentReward) -> None:
    red_circle = Shape("circle", "red", "large", "top left")
    blue_square = Shape("square", "blue", "small", "bottom right")
    moved = dataclasses.replace(red_circle, position="top right")
    # The prompt's shape drawn in another corner: kind, colour and size right, position wrong.
    acc = reward.attribute_accuracy(_image(Scene((moved,), "white")), [caption(Scene((red_circle,), "white"))])
    assert {k: v.item() for k, v in acc.items()} == pytest.approx(
        {"shape": 1, "colour": 1, "size": 1, "position": 0, "count": 1, "background": 1, "all": 5 / 6}
    )
    # Two shapes drawn in swapped corners: the matching pairs them by attributes, so only positions are wrong.
    swapped = Scene(
        (
            dataclasses.replace(red_circle, position="bottom right"),
            dataclasses.replace(blue_square, position="top left"),
        ),
        "gray",
    )
    acc = reward.attribute_accuracy(_image(swapped), [caption(Scene((red_circle, blue_square), "gray"))])
    assert acc["colour"].item() == 1 and acc["shape"].item() == 1 and acc["position"].item() == 0
    # A shape missing from the image: all four of its attributes wrong, and the count.
    acc = reward.attribute_accuracy(
        _image(Scene((red_circle,), "gray")), [caption(Scene((red_circle, blue_square), "gray"))]
    )
    assert acc["colour"].item() == 0.5 and acc["position"].item() == 0.5 and acc["count"].item() == 0
    assert acc["all"].item() == pytest.approx(5 / 10)


def test_reward_accepts_any_resolution(reward: ShapesAlignmentReward, batch) -> None:
    images = F.interpolate(batch.images, size=(64, 48), mode="nearest")
    assert reward.accuracy(images, batch.captions).mean() > 0.95
    r = reward(images.to(torch.bfloat16), batch.captions)
    assert r.dtype == torch.float32 and r.shape == (64,)


def test_bad_prompts_raise_naming_the_prompt(reward: ShapesAlignmentReward, batch) -> None:
    prompts = batch.captions[:3]
    prompts[1] = "a photo of a cat"
    with pytest.raises(ValueError, match=re.escape("'a photo of a cat'")):
        reward(batch.images[:3], prompts)
    with pytest.raises(ValueError, match=re.escape("'a photo of a cat'")):
        shapes_accuracy(batch.images[:3], prompts)
    with pytest.raises(ValueError, match="2 prompts"):
        reward(batch.images[:3], batch.captions[:2])


def test_short_training_run_writes_loadable_files(tmp_path) -> None:
    report = train_classifier(tmp_path / "a", seed=3, steps=3, batch_size=8, eval_images=16, progress=False)
    assert (tmp_path / "a" / WEIGHTS_NAME).is_file()
    assert json.loads((tmp_path / "a" / REPORT_NAME).read_text()) == json.loads(json.dumps(report))
    for key in ("heldout_accuracy", "heldout_accuracy_softened"):
        assert set(ATTRIBUTES) <= set(report[key])
    model = load_classifier(tmp_path / "a")
    # Seeded: the same run again gives the same weights.
    train_classifier(tmp_path / "b", seed=3, steps=3, batch_size=8, eval_images=16, progress=False)
    for name, value in load_classifier(tmp_path / "b").state_dict().items():
        torch.testing.assert_close(value, model.state_dict()[name], rtol=0, atol=0)
    batch = sample_batch(np.random.default_rng(SEED), 4)
    assert model(batch.images).kind.shape == (4, 5, 4)
    assert ShapesAlignmentReward(tmp_path / "a" / WEIGHTS_NAME)(batch.images, batch.captions).shape == (4,)
