"""The shapes world: determinism, captions, prompt split, rendering."""
from __future__ import annotations

import re
import time

import numpy as np
import pytest
import torch

from fastdag.toy.world import (
    ATTRIBUTE_DROPOUT,
    BACKGROUNDS,
    COLOURS,
    KINDS,
    POSITIONS,
    RESOLUTION,
    SIZES,
    Prompt,
    PromptShape,
    Scene,
    Shape,
    caption,
    describe,
    drop_attributes,
    parse_caption,
    parse_prompt,
    prompt_of,
    render,
    sample_batch,
    sample_scene,
    shapes_prompts,
    world_vocabulary,
)

SEED = 1234


def test_sample_and_render_are_deterministic_per_seed() -> None:
    a, b = np.random.default_rng(SEED), np.random.default_rng(SEED)
    for _ in range(50):
        sa, sb = sample_scene(a), sample_scene(b)
        assert sa == sb and [s.offset for s in sa.shapes] == [s.offset for s in sb.shapes]
        np.testing.assert_array_equal(render(sa), render(sb))
    ba, bb = sample_batch(np.random.default_rng(SEED), 16), sample_batch(np.random.default_rng(SEED), 16)
    assert ba.captions == bb.captions
    torch.testing.assert_close(ba.images, bb.images, rtol=0, atol=0)
    assert sample_batch(np.random.default_rng(SEED + 1), 16).captions != ba.captions


def test_caption_parse_round_trip() -> None:
    rng = np.random.default_rng(SEED)
    counts = {1: 0, 2: 0}
    for _ in range(3000):
        scene = sample_scene(rng)
        text = caption(scene)
        assert parse_caption(text) == scene
        assert caption(parse_caption(text)) == text
        counts[len(scene.shapes)] += 1
    assert min(counts.values()) > 1000


def test_caption_examples() -> None:
    one = Scene((Shape("circle", "red", "small", "top left"),), "white")
    assert caption(one) == "a small red circle at the top left on a white background"
    two = Scene(
        (Shape("square", "blue", "large", "top right"), Shape("triangle", "green", "small", "bottom left")), "gray"
    )
    assert caption(two) == (
        "a large blue square at the top right and a small green triangle at the bottom left on a gray background"
    )
    assert caption(Scene((Shape("circle", "red", "small", "center"),), "black")).endswith(
        "in the center on a black background"
    )


@pytest.mark.parametrize(
    "text",
    [
        "a cat",
        "",
        "a small red circle at the top left on a white background.",
        "A small red circle at the top left on a white background",
        "a small pink circle at the top left on a white background",
        "a small red circle at the top left on a red background",
        "a small red circle at the top left and a large blue square at the top left on a white background",
        "a small red circle in the center and a large blue square at the top left on a white background",
    ],
)
def test_parse_rejects_non_captions_naming_them(text: str) -> None:
    with pytest.raises(ValueError, match=re.escape(repr(text))):
        parse_caption(text)


def test_vocabulary_covers_every_caption_word() -> None:
    vocabulary = set(world_vocabulary())
    rng = np.random.default_rng(SEED)
    used = {word for _ in range(2000) for word in caption(sample_scene(rng)).split()}
    used |= {word for split in ("train", "heldout") for p in shapes_prompts(split) for word in p.split()}
    assert used == vocabulary
    assert world_vocabulary() == sorted(vocabulary)


def test_prompt_split_is_fixed_disjoint_and_covering() -> None:
    train, heldout = shapes_prompts("train"), shapes_prompts("heldout")
    assert (len(train), len(heldout)) == (512, 64)
    assert shapes_prompts("train") == train
    train_keys = {parse_caption(p).key() for p in train}
    heldout_keys = {parse_caption(p).key() for p in heldout}
    # Disjoint as scenes, so a held-out prompt with its two shapes swapped is not in train either.
    assert len(train_keys) == len(train) and len(heldout_keys) == len(heldout)
    assert not train_keys & heldout_keys
    for prompts in (train, heldout):
        scenes = [parse_caption(p) for p in prompts]
        shapes = [s for scene in scenes for s in scene.shapes]
        assert {s.kind for s in shapes} == set(KINDS)
        assert {s.colour for s in shapes} == set(COLOURS)
        assert {s.size for s in shapes} == set(SIZES)
        assert {s.position for s in shapes} == set(POSITIONS)
        assert {scene.background for scene in scenes} == set(BACKGROUNDS)
        assert {len(scene.shapes) for scene in scenes} == {1, 2}
    with pytest.raises(ValueError, match="split"):
        shapes_prompts("test")  # type: ignore[arg-type]


def test_training_batches_exclude_heldout_scenes() -> None:
    heldout_keys = {parse_caption(p).key() for p in shapes_prompts("heldout")}
    # Held-out one-shape scenes are ~2% of draws, so 2000 unfiltered draws hit dozens of them.
    unfiltered = sample_batch(np.random.default_rng(SEED), 2000, exclude_heldout=False)
    assert sum(s.key() in heldout_keys for s in unfiltered.scenes) > 10
    filtered = sample_batch(np.random.default_rng(SEED), 2000)
    assert not any(s.key() in heldout_keys for s in filtered.scenes)


def test_images_in_range_and_shapes_visible() -> None:
    batch = sample_batch(np.random.default_rng(SEED), 200)
    assert batch.images.shape == (200, 3, RESOLUTION, RESOLUTION) and batch.images.dtype == torch.float32
    assert batch.images.min() >= 0 and batch.images.max() <= 1
    for image, scene in zip(batch.images, batch.scenes):
        pixels = render(scene)
        assert pixels.dtype == np.uint8 and pixels.shape == (RESOLUTION, RESOLUTION, 3)
        torch.testing.assert_close(image, torch.from_numpy(pixels).permute(2, 0, 1).float() / 255)
        for shape in scene.shapes:
            cx, cy = POSITIONS[shape.position]
            # One pixel below the box centre lies inside every kind (the triangle is widest at the bottom).
            inside = pixels[int(cy) + shape.offset[1] + 1, int(cx) + shape.offset[0]]
            np.testing.assert_allclose(inside, COLOURS[shape.colour], atol=2)
        # Antialiasing: curved and slanted edges hold intermediate values, not only the scene's colours
        # (a pixel-aligned square has none).
        if any(s.kind != "square" for s in scene.shapes):
            assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > len(scene.shapes) + 1
        if all(s.position != "top left" for s in scene.shapes):
            np.testing.assert_array_equal(pixels[0, 0], BACKGROUNDS[scene.background])


def test_batch_generation_is_fast() -> None:
    rng = np.random.default_rng(SEED)
    start = time.perf_counter()
    sample_batch(rng, 512)
    # Measured ~4,000 images/s on one core; the bound leaves room for a loaded CI machine.
    assert 512 / (time.perf_counter() - start) > 300


def test_partial_captions_round_trip_and_keep_kinds() -> None:
    rng = np.random.default_rng(SEED)
    batch = sample_batch(rng, 3000, attribute_dropout=ATTRIBUTE_DROPOUT)
    forms = set()
    for text, scene in zip(batch.captions, batch.scenes):
        prompt = parse_prompt(text)
        assert describe(prompt) == text
        assert [s.kind for s in prompt.shapes] == [s.kind for s in scene.shapes]
        # Whatever is stated is the scene's own value.
        for stated, true in zip(prompt.shapes, scene.shapes):
            for name in ("colour", "size", "position"):
                assert getattr(stated, name) in (None, getattr(true, name))
        assert prompt.background in (None, scene.background)
        if len(scene.shapes) == 1:
            s = prompt.shapes[0]
            forms.add((s.colour is None, s.size is None, s.position is None, prompt.background is None))
    assert len(forms) == 16  # every partial form of a one-shape caption occurs
    full = [parse_prompt(t).full for t in batch.captions]
    # One-shape captions are full with probability 0.7^4 = 0.24, two-shape ones 0.7^7 = 0.08.
    assert 0.12 < np.mean(full) < 0.20


def test_partial_caption_examples_and_full_parse() -> None:
    prompt = Prompt((PromptShape("circle", colour="red"),))
    assert describe(prompt) == "a red circle" and not prompt.full
    assert parse_prompt("a large circle on a black background") == Prompt(
        (PromptShape("circle", size="large"),), "black"
    )
    assert parse_prompt("a circle at the top left and a small square") == Prompt(
        (PromptShape("circle", position="top left"), PromptShape("square", size="small"))
    )
    scene = Scene((Shape("circle", "red", "small", "top left"),), "white")
    assert parse_prompt(caption(scene)) == prompt_of(scene) and prompt_of(scene).full
    with pytest.raises(ValueError, match="full"):
        parse_caption("a red circle")
    with pytest.raises(ValueError, match="a pink circle"):
        parse_prompt("a pink circle")


def test_dropout_zero_gives_the_stream_of_full_captions() -> None:
    a = sample_batch(np.random.default_rng(SEED), 64)
    b = sample_batch(np.random.default_rng(SEED), 64, attribute_dropout=0.0)
    assert a.captions == b.captions == [caption(s) for s in a.scenes]
    with pytest.raises(ValueError, match="dropout"):
        drop_attributes(a.scenes[0], np.random.default_rng(0), 1.5)


def test_prompt_sample_scene_fills_what_the_prompt_leaves_out() -> None:
    rng = np.random.default_rng(SEED)
    one, two = parse_prompt("a red circle"), parse_prompt("a square at the top left and a small triangle")
    ones = [one.sample_scene(rng) for _ in range(600)]
    assert all(parse_prompt(caption(s)) == prompt_of(s) for s in ones)  # valid scenes of the world
    assert all(s.shapes[0].kind == "circle" and s.shapes[0].colour == "red" for s in ones)
    # Unstated attributes drawn over every value, as the world draws them.
    assert {s.background for s in ones} == set(BACKGROUNDS)
    assert {s.shapes[0].position for s in ones} == set(POSITIONS)
    assert {s.shapes[0].size for s in ones} == set(SIZES)
    twos = [two.sample_scene(rng) for _ in range(300)]
    assert all(s.shapes[0].position == "top left" and s.shapes[1].size == "small" for s in twos)
    assert {s.shapes[1].position for s in twos} == {"top right", "bottom left", "bottom right"}

