"""The shapes world: a procedural miniature of the photos Stable Diffusion learns from.

A scene is one object of a class (circle, square, …) with a colour, size and position, on a
background (solid colours and a few textures), 64×64 px, captioned
``a photo of a <color> <class> on a <background> background``. Everything is drawn with
PIL from a seed, so any image can be made again and the truth about it is known: what class
it is, what it looks like, what is behind it.

Looks: the base model is pretrained on *solid* objects only. A ``Look`` can also carry a
pattern (stripes, a two-tone split, a rim, dots, checks) — the DreamBooth subjects are such
looks, which the base has never seen, and the judge (``judge.py``) learns to tell looks apart
on a wide random range of them.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SIZE = 64
_SUPERSAMPLE = 4  # draw at 256 px and shrink: anti-aliased edges without a drawing library

CLASSES = ("circle", "square", "triangle", "star", "heart", "diamond")
COLORS = {
    "red": (220, 40, 40), "orange": (245, 140, 20), "yellow": (245, 220, 40), "green": (40, 170, 60),
    "blue": (40, 80, 220), "purple": (140, 50, 190), "pink": (245, 130, 190), "white": (245, 245, 245),
}
# Solid backgrounds are named by what they look like; two are textures.
BACKGROUNDS = {
    "gray": (128, 128, 128), "sky": (150, 200, 240), "grass": (110, 150, 80), "sand": (225, 205, 150),
    "night": (25, 30, 60), "brick": (150, 70, 50), "checkered": (200, 200, 200),
}
PATTERNS = ("solid", "stripes", "split", "rim", "dots", "checks")


@dataclass(frozen=True)
class Look:
    """What an object looks like apart from where it is: the identity the judge must see."""

    shape: str
    color: str
    pattern: str = "solid"
    color2: str = "white"  # the pattern's second colour (unused for solid)

    @property
    def solid(self) -> bool:
        return self.pattern == "solid"


@dataclass(frozen=True)
class Scene:
    look: Look
    background: str
    cx: float  # centre, in pixels of the 64 px image
    cy: float
    radius: float
    angle: float = 0.0  # degrees; patterns turn with it

    def caption(self, color: bool = True, background: bool = True) -> str:
        """The pretraining caption; parts can be left out (the model must also follow
        ``a photo of a circle`` — the class prompt of prior preservation)."""
        words = ([self.look.color] if color else []) + [self.look.shape]
        text = "a photo of a " + " ".join(words)
        return text + (f" on a {self.background} background" if background else "")


def random_scene(rng: random.Random, look: Look | None = None, background: str | None = None) -> Scene:
    look = look or Look(rng.choice(CLASSES), rng.choice(list(COLORS)))
    radius = rng.uniform(11, 20)
    margin = radius + 2
    return Scene(look, background or rng.choice(list(BACKGROUNDS)), rng.uniform(margin, SIZE - margin),
                 rng.uniform(margin, SIZE - margin), radius, rng.uniform(-15, 15))


def random_look(rng: random.Random) -> Look:
    """Any look, patterned or not: the judge's training range."""
    color, color2 = rng.sample(list(COLORS), 2)
    return Look(rng.choice(CLASSES), color, rng.choice(PATTERNS), color2)


def mixed_look(rng: random.Random, index: int) -> Look:
    """Every other one solid (what the base draws), the rest any look (what subjects look like):
    the mix the VAE and the judge learn from."""
    return random_look(rng) if index % 2 else Look(rng.choice(CLASSES), rng.choice(list(COLORS)))


# --- drawing ---------------------------------------------------------------------------


def _outline(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """The object's outline as a polygon (circles too, so every shape masks the same way)."""
    if shape == "circle":
        points = [(math.cos(t), math.sin(t)) for t in np.linspace(0, 2 * math.pi, 96, endpoint=False)]
    elif shape == "square":
        s = 0.8
        points = [(-s, -s), (s, -s), (s, s), (-s, s)]
    elif shape == "triangle":
        points = [(math.cos(t), math.sin(t)) for t in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
        points = [(x, y + 0.15) for x, y in points]
    elif shape == "diamond":
        points = [(0, -1), (0.7, 0), (0, 1), (-0.7, 0)]
    elif shape == "star":
        points = [((1.0 if i % 2 == 0 else 0.45) * math.cos(-math.pi / 2 + i * math.pi / 5),
                   (1.0 if i % 2 == 0 else 0.45) * math.sin(-math.pi / 2 + i * math.pi / 5)) for i in range(10)]
    elif shape == "heart":
        ts = np.linspace(0, 2 * math.pi, 96, endpoint=False)
        points = [(16 * math.sin(t) ** 3 / 17, -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t)
                                                  - math.cos(4 * t)) / 17 - 0.05) for t in ts]
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(CLASSES)}")
    turn = math.radians(angle)
    c, s = math.cos(turn), math.sin(turn)
    return [(cx + r * (x * c - y * s), cy + r * (x * s + y * c)) for x, y in points]


def _background(name: str, big: int) -> Image.Image:
    image = Image.new("RGB", (big, big), BACKGROUNDS[name])
    draw = ImageDraw.Draw(image)
    k = big // SIZE
    if name == "brick":
        mortar = (210, 200, 190)
        for row, y in enumerate(range(0, big, 8 * k)):
            draw.rectangle([0, y, big, y + k - 1], fill=mortar)
            for x in range((row % 2) * 8 * k, big, 16 * k):
                draw.rectangle([x, y, x + k - 1, y + 8 * k], fill=mortar)
    elif name == "checkered":
        for y in range(0, big, 8 * k):
            for x in range(0, big, 8 * k):
                if (x // (8 * k) + y // (8 * k)) % 2:
                    draw.rectangle([x, y, x + 8 * k - 1, y + 8 * k - 1], fill=(90, 90, 90))
    return image


def _pattern_fill(look: Look, scene: Scene, big: int) -> Image.Image:
    """The object's surface, before it is cut out by the outline."""
    first, second = COLORS[look.color], COLORS[look.color2]
    surface = Image.new("RGB", (big, big), first)
    if look.pattern in ("solid", "rim"):
        return surface
    k = big / SIZE
    yy, xx = np.mgrid[0:big, 0:big].astype(np.float32) / k
    turn = math.radians(scene.angle)
    # object coordinates: patterns turn and move with the object
    u = (xx - scene.cx) * math.cos(turn) + (yy - scene.cy) * math.sin(turn)
    v = -(xx - scene.cx) * math.sin(turn) + (yy - scene.cy) * math.cos(turn)
    if look.pattern == "stripes":
        mask = np.floor(v / 4.0) % 2 == 1
    elif look.pattern == "split":
        mask = u > 0
    elif look.pattern == "checks":
        mask = (np.floor(u / 5.0) + np.floor(v / 5.0)) % 2 == 1
    elif look.pattern == "dots":
        step = 7.0
        du, dv = (u % step) - step / 2, (v % step) - step / 2
        mask = du * du + dv * dv < 2.2 ** 2
    else:
        raise ValueError(f"unknown pattern {look.pattern!r}; known: {', '.join(PATTERNS)}")
    array = np.asarray(surface).copy()
    array[mask] = second
    return Image.fromarray(array)


def _object(scene: Scene, big: int) -> tuple[list, Image.Image]:
    """The object's outline (supersampled coordinates) and its filled silhouette."""
    outline = [(x * _SUPERSAMPLE, y * _SUPERSAMPLE) for x, y in
               _outline(scene.look.shape, scene.cx, scene.cy, scene.radius, scene.angle)]
    mask = Image.new("L", (big, big), 0)
    ImageDraw.Draw(mask).polygon(outline, fill=255)
    return outline, mask


def render(scene: Scene) -> Image.Image:
    big = SIZE * _SUPERSAMPLE
    image = _background(scene.background, big)
    outline, mask = _object(scene, big)
    image.paste(_pattern_fill(scene.look, scene, big), (0, 0), mask)
    if scene.look.pattern == "rim":
        ImageDraw.Draw(image).line(outline + outline[:1], fill=COLORS[scene.look.color2],
                                   width=int(3.5 * _SUPERSAMPLE), joint="curve")
    return image.resize((SIZE, SIZE), Image.LANCZOS)


def render_mask(scene: Scene) -> Image.Image:
    """Where the object is in ``render(scene)`` ("L", 255 = object, rim included): the mask a
    user would paint for masked training."""
    big = SIZE * _SUPERSAMPLE
    outline, mask = _object(scene, big)
    if scene.look.pattern == "rim":
        ImageDraw.Draw(mask).line(outline + outline[:1], fill=255, width=int(3.5 * _SUPERSAMPLE), joint="curve")
    return mask.resize((SIZE, SIZE), Image.BILINEAR)


def render_many(scenes: list[Scene]) -> np.ndarray:
    """uint8 array (N, 64, 64, 3)."""
    return np.stack([np.asarray(render(s)) for s in scenes])


def render_masks(scenes: list[Scene]) -> np.ndarray:
    """float32 array (N, 64, 64) in [0, 1]: each scene's ``render_mask``."""
    return np.stack([np.asarray(render_mask(s), dtype=np.float32) / 255.0 for s in scenes])


# --- the DreamBooth subjects ------------------------------------------------------------


@dataclass(frozen=True)
class Subject:
    """A unique object of a known class: a look the base never saw in pretraining."""

    name: str
    look: Look

    def scenes(self, count: int, seed: int, backgrounds: tuple[str, ...] = tuple(BACKGROUNDS)) -> list[Scene]:
        rng = random.Random(f"{self.name}:{seed}")
        return [random_scene(rng, self.look, rng.choice(backgrounds)) for _ in range(count)]


SUBJECTS = {
    "candy": Subject("candy", Look("circle", "red", "stripes", "white")),
    "tile": Subject("tile", Look("square", "yellow", "split", "blue")),
    "badge": Subject("badge", Look("star", "purple", "rim", "yellow")),
    "domino": Subject("domino", Look("diamond", "green", "dots", "white")),
}
# Training photos: 5 per subject, on a few backgrounds, so "on a night background" is a new context.
TRAIN_BACKGROUNDS = ("gray", "sand", "checkered")
NEW_CONTEXTS = ("sky", "grass", "night", "brick")


def subject_photos(subject: Subject, count: int = 5, seed: int = 0) -> list[Scene]:
    return subject.scenes(count, seed, TRAIN_BACKGROUNDS)


def class_scenes(shape: str, count: int, seed: int, backgrounds: tuple[str, ...] = tuple(BACKGROUNDS)) -> list[Scene]:
    """Real images of the bare class: solid looks of every colour (the class's true spread)."""
    rng = random.Random(f"class:{shape}:{seed}")
    return [random_scene(rng, Look(shape, rng.choice(list(COLORS))), rng.choice(backgrounds)) for _ in range(count)]
