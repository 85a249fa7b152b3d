"""The paper's prompt sets, shipped in the package: sizes, the official splits, and equality with the public
files (when the reference data is beside the checkout)."""
import json

from fastdag.cli import main
from fastdag.config import PromptsConfig
from fastdag.prompts import NAMED_SETS, load_prompts


def named(name):
    return load_prompts(PromptsConfig(source=name))


def test_sizes_and_splits():
    assert len(named("simple_animals")) == 45 and len(named("imagenet_classes")) == 1000
    train, held = named("drawbench"), named("drawbench-heldout")
    assert (len(train), len(held)) == (165, 18) and not set(train) & set(held)
    train, held = named("hpdv2"), named("hpdv2-heldout")
    assert (len(train), len(held)) == (1580, 20) and not set(train) & set(held)
    for name in ("simple_animals", "imagenet_classes", "drawbench", "hpdv2"):
        assert all(p and p == p.strip() for p in named(name))


def test_shipped_sets_equal_the_public_files(shared_data):
    d = shared_data / "prompt-sets"
    assert named("simple_animals") == d.joinpath("simple_animals.txt").read_text().split("\n")[:45]
    assert named("imagenet_classes") == [s.strip() for s in d.joinpath("imagenet_classes.txt").read_text().splitlines()]
    official = json.loads(d.joinpath("drawbench.json").read_text())  # Misspellings and Rare Words already dropped
    assert sorted(named("drawbench") + named("drawbench-heldout")) == sorted(official)
    hpd = [p.strip() for s in ("photo", "paintings") for p in json.loads(d.joinpath(f"HPDv2/benchmark_{s}.json").read_text())]
    assert sorted(named("hpdv2") + named("hpdv2-heldout")) == sorted(hpd)


def test_fastdag_prompts_lists_the_sets_with_sizes(capsys):
    assert main(["prompts"]) == 0
    out = capsys.readouterr().out
    for name, n in [("simple_animals", 45), ("imagenet_classes", 1000), ("drawbench", 165), ("hpdv2", 1580)]:
        assert any(line.split()[:2] == [name, str(n)] for line in out.splitlines()), name
    assert set(NAMED_SETS) >= {"simple_animals", "imagenet_classes", "drawbench", "hpdv2"}
