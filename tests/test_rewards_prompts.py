"""Rewards (registry, JPEG (in)compressibility, output checks) and prompt loaders on the real data files."""
import io

import numpy as np
import pytest
import torch
from PIL import Image

from fastdag.config import ConfigError, PromptsConfig
from fastdag.prompts import PromptSampler, load_prompts
from fastdag.rewards import REWARDS, CheckedReward, RewardError, build_reward


def test_jpeg_compressibility_is_minus_size_in_kb_at_quality_95():
    images = torch.rand(3, 3, 32, 32)
    images[0] = 0.5  # flat: compresses well
    expected = []
    for img in images:
        arr = (img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=95)
        expected.append(buf.tell() / 1000)
    comp = build_reward("jpeg_compressibility", {})(images, ["x"] * 3)
    incomp = build_reward("jpeg_incompressibility", {})(images, ["x"] * 3)
    torch.testing.assert_close(comp, -torch.tensor(expected))
    torch.testing.assert_close(incomp, torch.tensor(expected))
    assert comp[0] > comp[1]


def test_unknown_reward_names_the_registered_ones():
    with pytest.raises(ConfigError, match="reward.name: unknown reward 'aesthetic'; registered: .*jpeg_compressibility"):
        build_reward("aesthetic", {})


@pytest.mark.parametrize(
    "fn, needle",
    [
        (lambda im, p: torch.zeros(im.shape[0], 1), "returned shape (4, 1) for 4 images"),
        (lambda im, p: torch.full((im.shape[0],), float("nan")), "non-finite values [nan"),
        (lambda im, p: torch.tensor([1.0, float("inf"), 0, 0]), "non-finite values [inf]"),
    ],
)
def test_bad_reward_output_is_named(fn, needle):
    with pytest.raises(RewardError) as err:
        CheckedReward("mine", fn, batch_size=8)(torch.rand(4, 3, 8, 8), ["p"] * 4)
    assert "reward 'mine'" in str(err.value) and needle in str(err.value)


def test_checked_reward_batches_and_accepts_lists():
    calls = []

    def fn(im, p):
        calls.append(len(p))
        return [float(x) for x in range(len(p))]

    out = CheckedReward("lst", fn, batch_size=3)(torch.rand(7, 3, 4, 4), [str(i) for i in range(7)])
    assert calls == [3, 3, 1] and out.dtype == torch.float32 and out.shape == (7,)


def test_registry_has_the_paper_rewards():
    assert {"jpeg_compressibility", "jpeg_incompressibility"} <= set(REWARDS)


def test_txt_prompt_sets(shared_data):
    animals = load_prompts(PromptsConfig(source=str(shared_data / "prompt-sets/simple_animals.txt")))
    classes = load_prompts(PromptsConfig(source=str(shared_data / "prompt-sets/imagenet_classes.txt")))
    assert len(animals) == 45 and len(classes) == 1000
    assert all(p == p.strip() and p for p in animals + classes)


def test_drawbench_csv_and_json_agree(shared_data):
    csv_cfg = PromptsConfig(source=str(shared_data / "prompt-sets/drawbench.csv"), column="Prompts")
    json_cfg = PromptsConfig(source=str(shared_data / "prompt-sets/drawbench.json"))
    from_csv, from_json = load_prompts(csv_cfg), load_prompts(json_cfg)
    assert len(from_csv) == 200 and set(from_json) <= set(from_csv) and len(from_json) > 150
    # The official split drops two categories.
    drop = ["Misspellings", "Rare Words"]
    kept_csv = load_prompts(PromptsConfig(source=csv_cfg.source, column="Prompts", exclude_categories=drop))
    kept_json = load_prompts(PromptsConfig(source=json_cfg.source, exclude_categories=drop))
    assert 0 < len(kept_csv) < 200 and set(kept_json) <= set(kept_csv)


def test_hpdv2_json_lists(shared_data):
    for name in ("photo", "paintings", "anime", "concept-art"):
        assert len(load_prompts(PromptsConfig(source=str(shared_data / f"prompt-sets/HPDv2/benchmark_{name}.json")))) == 800


def test_bad_prompt_sources(tmp_path):
    with pytest.raises(ConfigError, match="neither a named set"):
        load_prompts(PromptsConfig(source=str(tmp_path / "nope.txt")))
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ConfigError, match="holds no prompts"):
        load_prompts(PromptsConfig(source=str(tmp_path / "empty.txt")))
    (tmp_path / "p.csv").write_text("text,cat\nhello,a\n")
    with pytest.raises(ConfigError, match="has no column 'prompt'; its columns: text, cat"):
        load_prompts(PromptsConfig(source=str(tmp_path / "p.csv")))
    (tmp_path / "p.json").write_text("{bad json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_prompts(PromptsConfig(source=str(tmp_path / "p.json")))


def test_prompt_sampler_is_seeded():
    a, b = PromptSampler(["x", "y", "z"], seed=1), PromptSampler(["x", "y", "z"], seed=1)
    assert a.sample(10) == b.sample(10)


def test_trailing_mean_of_the_reward_curve() -> None:
    from fastdag.evaluation import trailing_mean

    assert trailing_mean([1.0, 2.0, 3.0, 4.0], 2) == [1.0, 1.5, 2.5, 3.5]
    assert trailing_mean([1.0, 3.0], 5) == [1.0, 2.0]
    assert trailing_mean([2.0, 4.0], 1) == [2.0, 4.0]
