"""Negatives, the realism output and the independent judge of the shapes world."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fastdag.toy.classifier import ASSETS_DIR, evaluate_classifier, evaluate_realism, load_classifier, soften
from fastdag.toy.judge import (
    JUDGE_CONFIG,
    JUDGE_REPORT,
    JUDGE_WEIGHTS,
    Judge,
    SeenShape,
    Sighting,
    judge_augment,
    frechet_distance,
    judge_metric,
    normalised_entropy,
    reference_renders,
    stated_accuracy,
    train_judge,
    unstated_counts,
)
from fastdag.toy.negatives import (
    HACKED_TYPES,
    NEGATIVE_TYPES,
    gaussian_blur,
    hacked_bank,
    make_negatives,
    negative_batch,
)
from fastdag.toy.reward import AESTHETIC_TASTE, Taste
from fastdag.toy.world import RESOLUTION, Scene, Shape, render, sample_batch

# Seeds the shipped networks never trained or were evaluated on (they used SeedSequence(0) and (1) children).
SEED = 424242
ATTRIBUTES = ("position", "shape", "colour", "size", "count", "background")
shipped = pytest.mark.skipif(not (ASSETS_DIR / JUDGE_WEIGHTS).is_file(), reason="the judge is not shipped")


def _image(scene: Scene) -> torch.Tensor:
    return torch.from_numpy(render(scene)).permute(2, 0, 1).float().div(255).unsqueeze(0)


@pytest.mark.parametrize("kind", NEGATIVE_TYPES)
def test_negatives_are_seeded_images(kind: str) -> None:
    def draw() -> torch.Tensor:
        return make_negatives(kind, 6, np.random.default_rng(SEED), torch.Generator().manual_seed(SEED))

    a = draw()
    assert a.shape == (6, 3, RESOLUTION, RESOLUTION) and a.dtype == torch.float32
    assert a.min() >= 0 and a.max() <= 1
    torch.testing.assert_close(a, draw(), rtol=0, atol=0)
    with pytest.raises(ValueError, match="negative type"):
        make_negatives("bogus", 1, np.random.default_rng(0), torch.Generator())


def test_blur_negatives_are_blurrier_than_the_clean_augmentation() -> None:
    renders = sample_batch(np.random.default_rng(SEED), 32).images
    soft = (soften(renders) - renders).abs().mean()
    judge_soft = (gaussian_blur(renders, torch.full((32,), 1.0)) - renders).abs().mean()
    heavy = (gaussian_blur(renders, torch.full((32,), 1.8)) - renders).abs().mean()
    assert heavy > 1.3 * max(soft, judge_soft)
    # σ → 0 leaves the image alone; the kernel sums to 1 (a flat image stays flat).
    torch.testing.assert_close(gaussian_blur(renders, torch.full((32,), 1e-3)), renders)
    flat = torch.full((2, 3, 8, 8), 0.3)
    torch.testing.assert_close(gaussian_blur(flat, torch.tensor([1.0, 3.0])), flat)
    assert negative_batch(2, np.random.default_rng(0), torch.Generator().manual_seed(0)).shape[0] == 2 * len(NEGATIVE_TYPES)


def test_judge_augment_is_seeded_and_in_range() -> None:
    images = sample_batch(np.random.default_rng(SEED), 8).images
    a = judge_augment(images, torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, judge_augment(images, torch.Generator().manual_seed(1)), rtol=0, atol=0)
    assert a.shape == images.shape and a.min() >= 0 and a.max() <= 1 and not torch.equal(a, images)


def _sighting(*shapes: tuple[str, str, str, str], background: str = "white") -> Sighting:
    return Sighting(tuple(SeenShape(*s) for s in shapes), background, 0.99)


def test_stated_accuracy_scores_only_what_the_prompt_states() -> None:
    seen = [
        _sighting(("circle", "red", "large", "top right")),
        _sighting(("circle", "blue", "small", "center"), background="black"),
        _sighting(("square", "red", "large", "top left"), ("circle", "green", "small", "bottom right")),
        _sighting(),
    ]
    prompts = ["a red circle", "a red circle on a white background", "a circle and a red square at the top left",
               "a large circle"]
    acc = stated_accuracy(seen, prompts)
    assert acc["kind"] == [1.0, 1.0, 1.0, 0.0]
    assert acc["colour"] == [1.0, 0.0, 1.0, None]
    assert acc["size"] == [None, None, None, 0.0]
    assert acc["position"] == [None, None, 1.0, None]
    assert acc["background"] == [None, 0.0, None, None]
    assert acc["count"] == [1.0, 1.0, 1.0, 0.0]
    # Image 2: kind, colour, count right, background wrong; image 4: kind, size, count wrong.
    assert acc["all"] == [1.0, 0.5, 1.0, 0.0]
    with pytest.raises(ValueError, match="2 sightings"):
        stated_accuracy(seen[:2], prompts)


def test_taste_needs_every_shape_and_the_background() -> None:
    # The aesthetic task's taste is a white background, whatever the sizes; a taste naming a size needs it on all.
    assert AESTHETIC_TASTE.met(["large"], "white") and AESTHETIC_TASTE.met(["small", "large"], "white")
    assert not AESTHETIC_TASTE.met(["large"], "gray") and not AESTHETIC_TASTE.met([], "white")
    large_on_white = Taste(size="large", background="white")
    assert large_on_white.met(["large", "large"], "white") and not large_on_white.met(["large", "small"], "white")


def test_frechet_distance_matches_the_closed_form() -> None:
    gen = torch.Generator().manual_seed(SEED)
    a = torch.randn(400, 6, generator=gen, dtype=torch.float64) @ torch.randn(6, 6, generator=gen, dtype=torch.float64)
    b = torch.randn(300, 6, generator=gen, dtype=torch.float64) * 2 + 1
    # Independently: Tr (Σa Σb)^½ = Σ √λ over the (real, non-negative) eigenvalues of Σa Σb.
    ca, cb = np.cov(a.numpy().T), np.cov(b.numpy().T)
    cross = np.sqrt(np.clip(np.linalg.eigvals(ca @ cb).real, 0, None)).sum()
    expected = ((a.mean(0) - b.mean(0)) ** 2).sum().item() + np.trace(ca) + np.trace(cb) - 2 * cross
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)
    assert abs(frechet_distance(a, a)) < 1e-9 and frechet_distance(a, b) == pytest.approx(frechet_distance(b, a))
    with pytest.raises(ValueError, match="feature sets"):
        frechet_distance(a, b[:, :5])


@shipped
def test_frechet_distance_of_judge_features_orders_renders_and_noise() -> None:
    judge = Judge()
    prompts = ["a red circle", "a blue square", "a large triangle on a white background"] * 32
    refs = judge.features(reference_renders(prompts))
    assert refs.shape == (96, JUDGE_CONFIG.hidden)
    torch.testing.assert_close(reference_renders(prompts), reference_renders(prompts), rtol=0, atol=0)
    other_renders = frechet_distance(refs, judge.features(reference_renders(prompts, seed=SEED)))
    noise = frechet_distance(refs, judge.features(torch.rand(96, 3, RESOLUTION, RESOLUTION, generator=torch.Generator().manual_seed(0))))
    one_background = [p.replace(" on a white background", "") + " on a black background" for p in prompts]
    collapsed = frechet_distance(refs, judge.features(reference_renders(one_background, seed=SEED)))
    # True renders of the same prompts are near; a collapse onto one background farther; noise farthest.
    assert other_renders < collapsed < noise and noise > 5 * other_renders


def test_short_judge_run_writes_a_loadable_judge(tmp_path: Path) -> None:
    report = train_judge(tmp_path, seed=5, steps=2, batch_size=4, negatives_per_type=1, eval_images=8,
                         progress=False)
    assert json.loads((tmp_path / JUDGE_REPORT).read_text()) == json.loads(json.dumps(report))
    # The judge trains on the synthetic negatives only; its realism is measured on the hacked bank too.
    assert report["config"]["arch"] == "residual" and report["training"]["negative_types"] == list(NEGATIVE_TYPES)
    assert set(report["heldout_realism"]) == {"render", "render_softened", *HACKED_TYPES}
    judge = Judge(tmp_path)
    batch = sample_batch(np.random.default_rng(SEED), 3)
    sightings = judge.see(batch.images)
    assert len(sightings) == 3 and all(0 <= s.realism <= 1 for s in sightings)
    scores = judge_metric(batch.images, ["a red circle", "a circle", batch.captions[2]], judge=judge)
    assert all(v.shape == (3,) for v in scores.values())
    assert math.isnan(scores["judge_colour_accuracy"][1]) and not math.isnan(scores["judge_colour_accuracy"][0])


def test_no_training_reward_loads_the_judge() -> None:
    # The judge is evaluation's: a training reward that read it would train against the referee.
    code = (
        "import sys; from fastdag.rewards import REWARDS, build_reward\n"
        "for name in ('shapes_alignment', 'shapes_aesthetic'): build_reward(name, {})\n"
        "print(sorted(m for m in sys.modules if 'judge' in m))"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "[]"


@shipped
def test_shipped_judge_is_small_independent_and_accurate() -> None:
    assert (ASSETS_DIR / JUDGE_WEIGHTS).stat().st_size < 5e6
    report = json.loads((ASSETS_DIR / JUDGE_REPORT).read_text())
    reward_report = json.loads((ASSETS_DIR / "shapes_classifier.json").read_text())
    assert report["config"]["arch"] != reward_report["config"]["arch"]
    assert report["training"]["seed"] != reward_report["training"]["seed"]
    assert report["training"]["augmentation"] != reward_report["training"]["augmentation"]
    model = Judge().model
    accuracy = evaluate_classifier(model, np.random.default_rng(SEED), n_images=256)
    for name in ATTRIBUTES:
        assert accuracy[name] >= 0.95, (name, accuracy)
    realism = evaluate_realism(model, np.random.default_rng(SEED + 1), torch.Generator().manual_seed(SEED), 64)
    assert min(realism.values()) >= 0.95, realism


@shipped
def test_shipped_judge_sees_a_rendered_scene() -> None:
    scene = Scene((Shape("circle", "red", "large", "top left"), Shape("square", "blue", "small", "bottom right")),
                  "white")
    (sighting,) = Judge().see(_image(scene))
    assert sighting.shapes == (SeenShape("circle", "red", "large", "top left"),
                               SeenShape("square", "blue", "small", "bottom right"))
    assert sighting.background == "white" and sighting.realism > 0.9
    noise = make_negatives("noise", 4, np.random.default_rng(SEED), torch.Generator().manual_seed(SEED))
    assert all(s.realism < 0.5 for s in Judge().see(noise))


def test_shipped_reward_classifier_realism() -> None:
    model = load_classifier()
    realism = evaluate_realism(model, np.random.default_rng(SEED + 2), torch.Generator().manual_seed(SEED + 2), 64)
    assert min(realism.values()) >= 0.95 and "hacked" in realism, realism
    report = json.loads((ASSETS_DIR / "shapes_classifier.json").read_text())
    assert report["training"]["negative_types"] == list(HACKED_TYPES)


def test_hacked_bank_splits_by_prompt_and_draws_seeded() -> None:
    train, heldout = hacked_bank("train"), hacked_bank("heldout")
    assert train.shape[1:] == heldout.shape[1:] == (3, RESOLUTION, RESOLUTION) and len(train) >= 3 * len(heldout) > 0
    provenance = json.loads((ASSETS_DIR / "hacked_samples.json").read_text())
    assert provenance["prompts"]["train"] != provenance["prompts"]["heldout"]
    a = make_negatives("hacked", 8, np.random.default_rng(0), torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, make_negatives("hacked", 8, np.random.default_rng(0), torch.Generator().manual_seed(3)))
    # Every draw is a bank image of the split, maybe mirrored.
    flat = torch.cat([train, train.flip(-1)]).flatten(1)
    assert all((flat == x.flatten()).all(1).any() for x in a)


def test_unstated_distributions_and_their_entropy() -> None:
    seen = [
        _sighting(("circle", "red", "large", "top left")),
        _sighting(("circle", "red", "small", "center"), background="black"),
        _sighting(("circle", "red", "large", "top right"), background="gray"),
        _sighting(("circle", "red", "small", "bottom left"), background="brown"),
    ]
    counts = unstated_counts(seen, ["a red circle"] * 3 + ["a small red circle on a brown background"])
    assert set(counts) == {"size", "position", "background"}  # colour is stated by every prompt
    assert counts["size"] == {"small": 1, "large": 2}  # the last prompt states the size
    assert counts["background"] == {"white": 1, "gray": 1, "black": 1, "brown": 0}
    assert normalised_entropy({"a": 5, "b": 5}) == pytest.approx(1.0)
    assert normalised_entropy({"a": 5, "b": 0}) == 0.0 and math.isnan(normalised_entropy({"a": 0, "b": 0}))
    assert normalised_entropy(counts["background"]) == pytest.approx(math.log(3) / math.log(4))


@shipped
def test_base_figures_measure_a_pipeline(monkeypatch) -> None:
    from diffusers import StableDiffusionPipeline

    from fastdag.toy import base_figures
    from fastdag.toy.pretrain import SHIPPED_DIR

    monkeypatch.setattr(base_figures, "prompt_sets", lambda: {
        "heldout_full": (["a large orange triangle at the top right on a gray background"], 2),
        "aesthetic_all": (["a red circle", "a blue square"], 2),
    })
    pipe = StableDiffusionPipeline.from_pretrained(str(SHIPPED_DIR))
    pipe.set_progress_bar_config(disable=True)
    figures = base_figures.measure(pipe, num_steps=2)
    assert figures["heldout_full"]["images"] == 2 and figures["aesthetic_all"]["prompts"] == 2
    assert set(figures["aesthetic_all"]["unstated"]) == {"size", "position", "background"}
    entropy = figures["bars"]["unstated_entropy"]
    assert set(entropy["values"]) == {f"aesthetic_all.{a}.{k}" for a in ("size", "position", "background")
                                      for k in ("pooled", "per_prompt_mean")}
    assert entropy["met"] == all(v >= 0.8 for v in entropy["values"].values())
    assert figures["bars"]["kind"]["met"] == (figures["heldout_full"]["stated_accuracy"]["kind"] >= 0.85)
