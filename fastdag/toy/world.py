"""A procedural world of coloured shapes with captions: the training data of the embedded default model.

Each scene is one or two shapes on a plain background, with a caption that names every attribute:

    "a small red circle at the top left on a white background"
    "a large blue square at the top right and a small green triangle at the bottom left on a gray background"

Attributes (see the tuples below): 3 kinds, 6 shape colours, 2 sizes, 5 positions, 4 background colours. The
background colours are disjoint from the shape colours, so a shape is never drawn in its background's colour.

Resolution: 32 × 32 RGB. The miniature SD model must be pretrained on a 2-core CPU in under 45 minutes and then
run hundreds of thousands of VAE/UNet evaluations during alignment; cost grows with pixels, and 32 × 32 gives
4 × 8 × 8 latents behind a factor-4 VAE (the size measured in DESIGN.md §6). 32 pixels is also about the least
at which three kinds stay distinguishable at two sizes: a small shape spans 8 px (2 latent cells), a large one
13 px.

Positions: the four quadrant centres (8, 8), (24, 8), (8, 24), (24, 24) and the image centre (16, 16). A large
shape (13 px, jittered by at most 1 px) stays inside its 16 × 16 quadrant, so two corner shapes never overlap.
A large centre shape would overlap every quadrant, so the centre is used only by one-shape scenes; two-shape
scenes take two distinct corners. The ±1 px jitter keeps the data from being a lookup table of 5 exact
placements, so the reward classifier learns positions as regions rather than exact pixels.

Drawing is antialiased: PIL renders at 4× and the image is box-downsampled, so edges are area coverage.

Held-out prompts (`shapes_prompts("heldout")`) are excluded from `sample_batch` by default, so a model
pretrained on it has never seen those scenes, in either order of their two shapes.

Partial captions (attribute dropout). A caption that states every attribute leaves nothing for a reward to
prefer, so the model is pretrained on captions in which each attribute phrase but the kind (every shape's size,
colour and position, and the background) is dropped independently with probability ATTRIBUTE_DROPOUT:

    "a red circle"   "a large circle on a black background"   "a circle at the top left and a small square"

A `Prompt` holds what a caption states (None for an unstated attribute); `describe` writes it, `parse_prompt`
reads it back, and `caption(scene)` is the full caption. Every shape's kind stays, so a caption always tells how
many shapes there are, and the scene behind a partial caption is still uniform over what the caption leaves out:
that is what teaches the model to spread unstated attributes instead of collapsing on one value.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageDraw

RESOLUTION = 32
SUPERSAMPLE = 4

KINDS: tuple[str, ...] = ("circle", "square", "triangle")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 230),
    "yellow": (240, 210, 40),
    "purple": (150, 60, 200),
    "orange": (250, 140, 30),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "gray": (128, 128, 128),
    "black": (20, 20, 20),
    "brown": (110, 70, 40),
}
# Side of the shape's bounding box in output pixels.
SIZES: dict[str, int] = {"small": 8, "large": 13}
# Slot centre (x, y) in output pixels (continuous coordinates: the image spans [0, 32)).
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (8.0, 8.0),
    "top right": (24.0, 8.0),
    "bottom left": (8.0, 24.0),
    "bottom right": (24.0, 24.0),
    "center": (16.0, 16.0),
}
CORNERS: tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right")
MAX_JITTER = 1
# Attribute values in a fixed order: the classifier's class indices.
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
BACKGROUND_NAMES: tuple[str, ...] = tuple(BACKGROUNDS)
SIZE_NAMES: tuple[str, ...] = tuple(SIZES)
POSITION_NAMES: tuple[str, ...] = tuple(POSITIONS)

_PHRASES: dict[str, str] = {p: ("in the center" if p == "center" else f"at the {p}") for p in POSITIONS}

# Probability that each droppable attribute phrase of a training caption is left out, independently. Chosen so
# that (a) full captions stay frequent: (1 − 0.3)^4 = 24% of one-shape captions and 0.7^7 = 8% of two-shape ones
# are full, and every attribute is still stated in 70% of captions, so the stated-attribute signal that the base
# bars (kind, colour on full captions) rest on shrinks by 30%, not by half; (b) every partial form is in
# distribution: each of the 16 forms of a one-shape caption has probability ≥ 0.3^4 ≈ 0.8% (kind only), the
# kind-and-colour form of the aesthetic prompts 0.7 · 0.3^3 ≈ 1.9%, i.e. ~900 and ~2,000 of the ~48k one-shape
# captions of the 3,000 × 32 recipe, spread over their kinds and colours. 0.5 would make every form equally
# likely, but leave only 0.8% of two-shape captions full.
ATTRIBUTE_DROPOUT = 0.3


@dataclass(frozen=True)
class Shape:
    """One shape: its captioned attributes, plus the render-only pixel offset (ignored by ==/hash)."""

    kind: str
    colour: str
    size: str
    position: str
    offset: tuple[int, int] = field(default=(0, 0), compare=False)


@dataclass(frozen=True)
class Scene:
    """A scene: 1 or 2 shapes in caption order and the background colour name."""

    shapes: tuple[Shape, ...]
    background: str

    def __post_init__(self) -> None:
        positions = [s.position for s in self.shapes]
        if len(self.shapes) not in (1, 2):
            raise ValueError(f"a scene has 1 or 2 shapes, got {len(self.shapes)}")
        if len(self.shapes) == 2 and (positions[0] == positions[1] or "center" in positions):
            raise ValueError(f"two shapes need two distinct corners, got {positions}")
        for s in self.shapes:
            if s.kind not in KINDS or s.colour not in COLOURS or s.size not in SIZES or s.position not in POSITIONS:
                raise ValueError(f"unknown attribute in {s}")
            if max(abs(s.offset[0]), abs(s.offset[1])) > MAX_JITTER:
                raise ValueError(f"offset {s.offset} exceeds the ±{MAX_JITTER} px jitter")
        if self.background not in BACKGROUNDS:
            raise ValueError(f"unknown background {self.background!r}")

    def key(self) -> tuple:
        """Order-free identity of the scene's attributes: two captions of one scene share it."""
        return (self.background, tuple(sorted((s.position, s.kind, s.colour, s.size) for s in self.shapes)))


def sample_scene(rng: np.random.Generator) -> Scene:
    """Draws a scene: 1 or 2 shapes with probability 1/2 each, every attribute uniform, ±1 px jitter."""
    n = int(rng.integers(1, 3))
    if n == 1:
        slots = [POSITION_NAMES[rng.integers(len(POSITION_NAMES))]]
    else:
        slots = [CORNERS[i] for i in rng.permutation(len(CORNERS))[:2]]
    shapes = tuple(
        Shape(
            kind=KINDS[rng.integers(len(KINDS))],
            colour=COLOUR_NAMES[rng.integers(len(COLOUR_NAMES))],
            size=SIZE_NAMES[rng.integers(len(SIZE_NAMES))],
            position=slot,
            offset=(int(rng.integers(-MAX_JITTER, MAX_JITTER + 1)), int(rng.integers(-MAX_JITTER, MAX_JITTER + 1))),
        )
        for slot in slots
    )
    return Scene(shapes=shapes, background=BACKGROUND_NAMES[rng.integers(len(BACKGROUND_NAMES))])


def render(scene: Scene) -> np.ndarray:
    """Draws the scene antialiased. Returns uint8 [RESOLUTION, RESOLUTION, 3]."""
    big = RESOLUTION * SUPERSAMPLE
    image = Image.new("RGB", (big, big), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    for s in scene.shapes:
        cx, cy = POSITIONS[s.position]
        # Box corners in supersampled pixels; PIL's x1/y1 are inclusive, hence the -1.
        half = SIZES[s.size] * SUPERSAMPLE / 2
        x0 = round((cx + s.offset[0]) * SUPERSAMPLE - half)
        y0 = round((cy + s.offset[1]) * SUPERSAMPLE - half)
        x1 = x0 + SIZES[s.size] * SUPERSAMPLE - 1
        y1 = y0 + SIZES[s.size] * SUPERSAMPLE - 1
        fill = COLOURS[s.colour]
        if s.kind == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif s.kind == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        else:
            draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=fill)
    # BOX resampling averages each 4 × 4 block exactly: area-coverage antialiasing. np.array copies, so the
    # result is writable (np.asarray of a PIL image is read-only).
    return np.array(image.resize((RESOLUTION, RESOLUTION), Image.Resampling.BOX))


@dataclass(frozen=True)
class PromptShape:
    """What a caption states about one shape: the kind always, the rest None when the caption leaves it out."""

    kind: str
    colour: str | None = None
    size: str | None = None
    position: str | None = None


@dataclass(frozen=True)
class Prompt:
    """What a caption states about a scene: 1 or 2 shapes in caption order, the background or None."""

    shapes: tuple[PromptShape, ...]
    background: str | None = None

    def __post_init__(self) -> None:
        if len(self.shapes) not in (1, 2):
            raise ValueError(f"a prompt names 1 or 2 shapes, got {len(self.shapes)}")
        positions = [s.position for s in self.shapes if s.position is not None]
        if len(self.shapes) == 2 and (len(set(positions)) < len(positions) or "center" in positions):
            raise ValueError(f"two shapes need two distinct corners, got {positions}")
        for s in self.shapes:
            if (
                s.kind not in KINDS
                or s.colour not in (None, *COLOURS)
                or s.size not in (None, *SIZES)
                or s.position not in (None, *POSITIONS)
            ):
                raise ValueError(f"unknown attribute in {s}")
        if self.background not in (None, *BACKGROUNDS):
            raise ValueError(f"unknown background {self.background!r}")

    @property
    def full(self) -> bool:
        """Does the prompt state every attribute (a `caption`)?"""
        return self.background is not None and all(
            None not in (s.colour, s.size, s.position) for s in self.shapes
        )

    def scene(self) -> Scene:
        """The scene of a full prompt; ValueError if some attribute is unstated."""
        if not self.full:
            raise ValueError(f"prompt {describe(self)!r} does not state every attribute")
        shapes = tuple(Shape(s.kind, s.colour, s.size, s.position) for s in self.shapes)  # type: ignore[arg-type]
        return Scene(shapes=shapes, background=self.background)  # type: ignore[arg-type]

    def sample_scene(self, rng: np.random.Generator) -> Scene:
        """A scene the prompt describes, drawn as the world draws scenes: each unstated attribute uniform, a lone
        shape's unstated position one of the 5 slots, two shapes' unstated positions distinct free corners, ±1 px
        jitter. The true renders a sample of this prompt is compared with."""
        if len(self.shapes) == 1:
            free = list(POSITION_NAMES)
        else:
            free = [c for c in CORNERS if c not in {s.position for s in self.shapes}]
            free = [free[i] for i in rng.permutation(len(free))]
        shapes = []
        for s in self.shapes:
            position = s.position if s.position is not None else (
                free[int(rng.integers(len(free)))] if len(self.shapes) == 1 else free.pop()
            )
            shapes.append(Shape(
                kind=s.kind,
                colour=s.colour or COLOUR_NAMES[rng.integers(len(COLOUR_NAMES))],
                size=s.size or SIZE_NAMES[rng.integers(len(SIZE_NAMES))],
                position=position,
                offset=(int(rng.integers(-MAX_JITTER, MAX_JITTER + 1)), int(rng.integers(-MAX_JITTER, MAX_JITTER + 1))),
            ))
        background = self.background or BACKGROUND_NAMES[rng.integers(len(BACKGROUND_NAMES))]
        return Scene(shapes=tuple(shapes), background=background)


def prompt_of(scene: Scene) -> Prompt:
    """The full prompt of a scene (every attribute stated)."""
    return Prompt(tuple(PromptShape(s.kind, s.colour, s.size, s.position) for s in scene.shapes), scene.background)


def describe(prompt: Prompt) -> str:
    """The caption text of a prompt: "a [size] [colour] kind [position phrase]", joined by " and ", then
    " on a [background] background" when stated."""
    parts = []
    for s in prompt.shapes:
        words = ["a", s.size, s.colour, s.kind, _PHRASES[s.position] if s.position is not None else None]
        parts.append(" ".join(w for w in words if w is not None))
    text = " and ".join(parts)
    return text if prompt.background is None else f"{text} on a {prompt.background} background"


def caption(scene: Scene) -> str:
    """The scene's full caption, shapes in the scene's order."""
    return describe(prompt_of(scene))


def drop_attributes(scene: Scene, rng: np.random.Generator, p: float = ATTRIBUTE_DROPOUT) -> Prompt:
    """The scene's prompt with each attribute but the kinds dropped independently with probability p.

    Draws 3 · (number of shapes) + 1 uniforms from rng: per shape size, colour, position, then the background.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"attribute dropout must be in [0, 1], got {p}")
    keep = rng.random(3 * len(scene.shapes) + 1) >= p
    shapes = tuple(
        PromptShape(
            s.kind,
            colour=s.colour if keep[3 * i + 1] else None,
            size=s.size if keep[3 * i] else None,
            position=s.position if keep[3 * i + 2] else None,
        )
        for i, s in enumerate(scene.shapes)
    )
    return Prompt(shapes, scene.background if keep[-1] else None)


def _alternation(words: tuple[str, ...]) -> str:
    return "|".join(re.escape(w) for w in words)


_SHAPE_RE = (
    rf"a (?:({_alternation(SIZE_NAMES)}) )?(?:({_alternation(COLOUR_NAMES)}) )?({_alternation(KINDS)})"
    rf"(?: ({_alternation(tuple(_PHRASES.values()))}))?"
)
_PROMPT_RE = re.compile(rf"{_SHAPE_RE}(?: and {_SHAPE_RE})?(?: on a ({_alternation(BACKGROUND_NAMES)}) background)?")
_POSITION_OF_PHRASE = {phrase: position for position, phrase in _PHRASES.items()}


@lru_cache(maxsize=65536)
def parse_prompt(text: str) -> Prompt:
    """Inverts `describe` exactly: `parse_prompt(describe(p)) == p`, for full and partial captions alike.

    Raises ValueError naming the text if it is not a (possibly partial) caption of this world.
    """
    match = _PROMPT_RE.fullmatch(text)
    if match is None:
        raise ValueError(f"not a shapes-world caption: {text!r}")
    groups = match.groups()
    shapes = tuple(
        PromptShape(kind=kind, colour=colour, size=size, position=_POSITION_OF_PHRASE.get(phrase))
        for size, colour, kind, phrase in (groups[0:4], groups[4:8])
        if kind is not None
    )
    try:
        return Prompt(shapes=shapes, background=groups[8])
    except ValueError as err:
        raise ValueError(f"not a shapes-world caption: {text!r} ({err})") from err


@lru_cache(maxsize=65536)
def parse_caption(text: str) -> Scene:
    """Inverts `caption` exactly: `parse_caption(caption(s)) == s` (offsets are not captioned and come back 0).

    Raises ValueError naming the text if it is not a full caption of this world (partial ones: `parse_prompt`).
    """
    prompt = parse_prompt(text)
    if not prompt.full:
        raise ValueError(f"not a full shapes-world caption (some attribute unstated): {text!r}")
    try:
        return prompt.scene()
    except ValueError as err:
        raise ValueError(f"not a shapes-world caption: {text!r} ({err})") from err


def world_vocabulary() -> list[str]:
    """Every word any caption can use, sorted."""
    words = {"a", "and", "on", "background"}
    for group in (KINDS, COLOURS, BACKGROUNDS, SIZES, _PHRASES.values()):
        for entry in group:
            words.update(entry.split())
    return sorted(words)


@dataclass
class Batch:
    """A training batch from the world.

    images: float32 [B, 3, RESOLUTION, RESOLUTION] in [0, 1].
    captions: B strings (full captions, or partial ones under attribute dropout).
    scenes: B scenes (ground truth, offsets included).
    """

    images: torch.Tensor
    captions: list[str]
    scenes: list[Scene]


def sample_batch(
    rng: np.random.Generator, batch_size: int, exclude_heldout: bool = True, attribute_dropout: float = 0.0
) -> Batch:
    """Draws `batch_size` scenes and renders them (a few thousand images per second on one core).

    With `exclude_heldout`, scenes of the held-out prompts are redrawn, so that held-out prompts measure
    generalisation. The reward classifier is trained on the whole world (`exclude_heldout=False`).
    attribute_dropout: each caption's droppable phrases are left out with this probability (`drop_attributes`);
    the dropout draws come from rng after the scenes', so 0 gives the stream (and batches) of full captions.
    """
    heldout = _heldout_keys() if exclude_heldout else frozenset()
    scenes: list[Scene] = []
    while len(scenes) < batch_size:
        scene = sample_scene(rng)
        if scene.key() not in heldout:
            scenes.append(scene)
    pixels = np.stack([render(s) for s in scenes])  # [B, H, W, 3] uint8
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div_(255.0)
    if attribute_dropout > 0.0:
        captions = [describe(drop_attributes(s, rng, attribute_dropout)) for s in scenes]
    else:
        captions = [caption(s) for s in scenes]
    return Batch(images=images, captions=captions, scenes=scenes)


_SPLIT_SEED = 20240531
_SPLIT_SIZES = {"heldout": 64, "train": 512}


def _covers_every_value(scenes: list[Scene]) -> bool:
    shapes = [s for scene in scenes for s in scene.shapes]
    return (
        {s.kind for s in shapes} == set(KINDS)
        and {s.colour for s in shapes} == set(COLOURS)
        and {s.size for s in shapes} == set(SIZES)
        and {s.position for s in shapes} == set(POSITIONS)
        and {scene.background for scene in scenes} == set(BACKGROUNDS)
        and {len(scene.shapes) for scene in scenes} == {1, 2}
    )


@lru_cache(maxsize=1)
def _prompt_split() -> dict[str, tuple[Scene, ...]]:
    """Held-out scenes first, then train scenes with keys disjoint from them; each split covers every value."""
    rng = np.random.default_rng(_SPLIT_SEED)
    taken: set[tuple] = set()
    split: dict[str, tuple[Scene, ...]] = {}
    for name in ("heldout", "train"):
        while True:
            # Drawing until a sample covers every value keeps the split a pure function of the seed.
            scenes: list[Scene] = []
            keys: set[tuple] = set()
            while len(scenes) < _SPLIT_SIZES[name]:
                scene = sample_scene(rng)
                if scene.key() not in taken and scene.key() not in keys:
                    keys.add(scene.key())
                    scenes.append(scene)
            if _covers_every_value(scenes):
                break
        taken |= keys
        split[name] = tuple(scenes)
    return split


@lru_cache(maxsize=1)
def _heldout_keys() -> frozenset[tuple]:
    return frozenset(scene.key() for scene in _prompt_split()["heldout"])


def shapes_prompts(split: Literal["train", "heldout"]) -> list[str]:
    """The fixed prompt split: 512 train and 64 held-out captions, no scene shared between them.

    Both splits contain one- and two-shape prompts and every kind, colour, size, position and background.
    """
    if split not in _SPLIT_SIZES:
        raise ValueError(f"split must be one of {sorted(_SPLIT_SIZES)}, got {split!r}")
    return [caption(scene) for scene in _prompt_split()[split]]
