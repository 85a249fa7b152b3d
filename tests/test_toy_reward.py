"""The shapes world's rewards on partial prompts, the aesthetic taste, the realism term, and the task prompt sets."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fastdag.prompts import NAMED_SETS
from fastdag.rewards import build_reward
from fastdag.toy.classifier import realism_log_prob
from fastdag.toy.negatives import HACKED_TYPES, make_negatives
from fastdag.toy.prompt_sets import shapes_task_prompts
from fastdag.toy.reward import AESTHETIC_TASTE, ShapesAestheticReward, ShapesAlignmentReward, prompt_targets
from fastdag.toy.world import BACKGROUND_NAMES, Scene, Shape, parse_prompt, render, shapes_prompts

SEED = 31337


@pytest.fixture(scope="module")
def alignment() -> ShapesAlignmentReward:
    return ShapesAlignmentReward()


@pytest.fixture(scope="module")
def aesthetic() -> ShapesAestheticReward:
    return ShapesAestheticReward()


def _images(*scenes: Scene) -> torch.Tensor:
    return torch.stack([torch.from_numpy(render(s)).permute(2, 0, 1).float().div(255) for s in scenes])


def _circle(colour: str = "red", size: str = "large", position: str = "top left", background: str = "white") -> Scene:
    return Scene((Shape("circle", colour, size, position),), background)


def test_placements_of_partial_prompts() -> None:
    targets = prompt_targets(["a red circle", "a circle and a square", "a circle at the top left and a square",
                              "a large red circle at the top left on a white background"], torch.device("cpu"))
    assert torch.bincount(targets.owner).tolist() == [5, 12, 3, 1]
    assert (targets.stated.background[:-1] == -1).all() and targets.stated.background[-1] == 0


def test_partial_prompt_scores_at_the_best_placement(alignment: ShapesAlignmentReward) -> None:
    image = _images(_circle(position="bottom right"))
    r = alignment(image.expand(4, -1, -1, -1), ["a red circle", "a red circle at the bottom right", "a blue circle",
                                                "a red square"])
    # "a red circle" has the bottom-right placement among its five: the same targets, the same score.
    torch.testing.assert_close(r[0], r[1])
    assert r[0] > r[2] + 0.3 and r[0] > r[3] + 0.3


def test_realism_term_is_added(alignment: ShapesAlignmentReward) -> None:
    images = _images(_circle(), _circle(colour="blue", size="small", background="black"))
    prompts = ["a red circle", "a small blue circle on a black background"]
    without = ShapesAlignmentReward(realism_weight=0.0)(images, prompts)
    torch.testing.assert_close(alignment(images, prompts) - without, realism_log_prob(alignment.read(images)))


@pytest.mark.parametrize("kind", HACKED_TYPES)
def test_negatives_score_below_renders(alignment: ShapesAlignmentReward, aesthetic: ShapesAestheticReward,
                                       kind: str) -> None:
    fakes = make_negatives(kind, 16, np.random.default_rng(SEED), torch.Generator().manual_seed(SEED))
    prompts = ["a red circle"] * 16
    # Alignment: even a render that ignores the prompt's colour beats a non-render read at its best.
    worst_render = alignment(_images(_circle(colour="blue", size="small", background="black")), prompts[:1])
    assert (alignment(fakes, prompts) < worst_render).float().mean() >= 0.9
    # Aesthetic: a render that follows the prompt beats a non-render, on the taste's background or off it.
    off_taste = aesthetic(_images(_circle(size="small", background="black")), prompts[:1])
    assert (aesthetic(fakes, prompts) < off_taste).float().mean() >= 0.9


def test_aesthetic_prefers_the_taste_and_ranks_it_against_the_prompt(aesthetic: ShapesAestheticReward) -> None:
    liked = AESTHETIC_TASTE.background
    other = next(b for b in BACKGROUND_NAMES if b != liked)
    scenes = {
        "taste": _circle(background=liked),
        "taste, small": _circle(size="small", background=liked),
        "background missed": _circle(background=other),
        "wrong colour, taste": _circle(colour="blue", background=liked),
        "wrong kind, taste": Scene((Shape("square", "red", "large", "top left"),), liked),
    }
    images, prompts = _images(*scenes.values()), ["a red circle"] * len(scenes)
    r = dict(zip(scenes, aesthetic(images, prompts).tolist()))
    # The taste is worth about 0.5 x 4.7 nats.
    assert 1.5 < r["taste"] - r["background missed"] < 3.5
    assert r["taste"] > r["wrong colour, taste"] + 0.3 and r["taste"] > r["wrong kind, taste"] + 0.3
    # Size and position are not in the taste: changing them changes the reward little.
    moved = aesthetic(_images(_circle(position="bottom right", background=liked)), ["a red circle"]).item()
    assert abs(moved - r["taste"]) < 0.15 and abs(r["taste, small"] - r["taste"]) < 0.15
    # A stated background overrides the taste.
    stated = aesthetic(_images(_circle(background=other)), [f"a red circle on a {other} background"])
    assert stated.item() > r["background missed"] + 1.5
    # The task's averaged prompt terms (as the alignment reward's): the taste outweighs one stated attribute, so
    # a wrong colour or kind on white outscores the prompt followed on gray ...
    assert r["wrong colour, taste"] > r["background missed"] and r["wrong kind, taste"] > r["background missed"]
    # ... and stated="sum" (the prompt as a log-likelihood) puts the prompt first.
    s = dict(zip(scenes, ShapesAestheticReward(stated="sum")(images, prompts).tolist()))
    assert s["background missed"] > s["wrong colour, taste"] + 1 and s["background missed"] > s["wrong kind, taste"] + 1
    assert 1.5 < s["taste"] - s["background missed"] < 3.5


def test_rewards_are_registered_with_their_options() -> None:
    assert isinstance(build_reward("shapes_aesthetic", {"taste_weight": 0.3}), ShapesAestheticReward)
    with pytest.raises(ValueError, match="taste"):
        ShapesAestheticReward(size="huge")
    with pytest.raises(ValueError, match="stated"):
        ShapesAestheticReward(stated="max")
    with pytest.raises(ValueError, match="realism_weight"):
        ShapesAlignmentReward(realism_weight=-1)


def test_task_prompt_sets() -> None:
    for task in ("aesthetic", "align", "compress"):
        train, heldout = shapes_task_prompts(task, "train"), shapes_task_prompts(task, "heldout")
        assert NAMED_SETS[f"shapes-{task}"]() == train and NAMED_SETS[f"shapes-{task}-heldout"]() == heldout
        assert not set(train) & set(heldout)
        parsed = [parse_prompt(p) for p in train + heldout]  # every prompt is a (partial) world caption
        if task == "aesthetic":
            assert (len(train), len(heldout)) == (12, 6)
            assert all(len(p.shapes) == 1 and p.shapes[0].colour and not p.shapes[0].size and not p.background
                       and not p.shapes[0].position for p in parsed)
            held = [parse_prompt(p).shapes[0] for p in heldout]
            assert {s.kind for s in held} == {"circle", "square", "triangle"} and len({s.colour for s in held}) == 6
        if task == "compress":
            assert (len(train), len(heldout)) == (9, 3)
            assert all(s.colour is s.size is s.position is None and p.background is None
                       for p in parsed for s in p.shapes)
        if task == "align":
            assert (len(train), len(heldout)) == (1024, 128)
            assert train[0::2] == shapes_prompts("train") and heldout[0::2] == shapes_prompts("heldout")
            assert not any(parse_prompt(p).full for p in train[1::2] + heldout[1::2])
    with pytest.raises(ValueError, match="task"):
        shapes_task_prompts("imagenet", "train")  # type: ignore[arg-type]
