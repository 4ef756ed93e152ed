"""The synthetic scene world the demo VLM was trained on.

A scene is 1-3 coloured shapes on a noisy background, drawn on a 4x4 grid of
32-pixel cells (one shape per cell, jittered inside it) so that every
position question has one unambiguous answer: a cell is always left or right
of the vertical midline, above or below the horizontal one.

Everything is a pure function of an integer seed: `make_scene(seed)` gives
the same image and the same objects on every machine (numpy's PCG64 and
Pillow's polygon rasteriser are both deterministic). Training draws seeds
from `TRAIN_SEEDS`, evaluation from `EVAL_SEEDS`; the two ranges are disjoint.

Only numpy and Pillow are needed, so the runtime's tests and `vlm-eval` on
an artifact can use it without torch.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 128
GRID = 4
CELL = IMAGE_SIZE // GRID  # 32 px

# Saturated colours, far from each other and from the muted backgrounds.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (40, 80, 230),
    "yellow": (240, 220, 40),
    "purple": (150, 50, 200),
    "white": (245, 245, 245),
}
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = {"small": 7, "large": 11}  # half-width in pixels
NUMBER_WORDS = ("zero", "one", "two", "three")

# Seeds: training uses [0, 10^7), evaluation [10^9, ...): disjoint by construction.
TRAIN_SEEDS = range(0, 10_000_000)
EVAL_SEED_BASE = 1_000_000_000
DEFAULT_EVAL_SEED = 0

QUESTION_KINDS = ("color", "shape", "size", "count", "position", "yesno", "caption", "box")

# Grounding answers ("find the red circle.") are LLaVA-1.5's box format:
# "[x1, y1, x2, y2]", each a fraction of the image side with two decimals
# (x right, y down from the top-left). A box answer is right when its IoU with
# the true box is at least BOX_IOU (the usual detection threshold).
BOX_STEPS = 100  # coordinates are k / BOX_STEPS, k = 0..BOX_STEPS: one word each
BOX_IOU = 0.5


@dataclass(frozen=True)
class SceneObject:
    color: str
    shape: str
    size: str
    row: int  # grid row 0..3, top to bottom
    col: int  # grid column 0..3, left to right
    cx: int  # centre in pixels
    cy: int

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"

    @property
    def box(self) -> tuple[float, float, float, float]:
        """(x1, y1, x2, y2) in pixels: the extent of the shape as drawn."""
        r = SIZES[self.size]
        poly = _polygon(self.shape, self.cx, self.cy, r)
        if poly is None:  # circle
            return (self.cx - r, self.cy - r, self.cx + r, self.cy + r)
        xs, ys = [p[0] for p in poly], [p[1] for p in poly]
        return (min(xs), min(ys), max(xs), max(ys))

    @property
    def position(self) -> str:
        vertical = "top" if self.row < GRID // 2 else "bottom"
        horizontal = "left" if self.col < GRID // 2 else "right"
        return f"{vertical} {horizontal}"


@dataclass(frozen=True)
class Scene:
    seed: int
    image: Image.Image  # RGB, IMAGE_SIZE x IMAGE_SIZE
    objects: tuple[SceneObject, ...]  # in reading order: left to right, then top to bottom


@dataclass(frozen=True)
class Question:
    kind: str
    question: str
    answer: str


def _background(rng: np.random.Generator) -> np.ndarray:
    """A muted vertical or horizontal gradient, (H, W, 3) float32 in 0..255."""
    base = rng.uniform(40, 130, size=3)
    delta = rng.uniform(-35, 35, size=3)
    ramp = np.linspace(0.0, 1.0, IMAGE_SIZE, dtype=np.float32)
    if rng.random() < 0.5:
        grad = ramp[:, None, None] * np.ones((1, IMAGE_SIZE, 1), np.float32)
    else:
        grad = ramp[None, :, None] * np.ones((IMAGE_SIZE, 1, 1), np.float32)
    return (base + delta * grad).astype(np.float32)


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "diamond":
        return [(cx, cy - r * 1.25), (cx + r * 1.25, cy), (cx, cy + r * 1.25), (cx - r * 1.25, cy)]
    if shape == "triangle":
        return [(cx + r * 1.2 * math.cos(a), cy + r * 1.2 * math.sin(a))
                for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    return None  # circle: drawn as an ellipse


def make_scene(seed: int) -> Scene:
    """Draw the scene for `seed`: same seed, same pixels and objects."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 4))
    cells = rng.choice(GRID * GRID, size=n, replace=False)
    colors = rng.choice(len(COLORS), size=n, replace=False)  # colours unique per scene
    shapes = rng.choice(len(SHAPES), size=n, replace=False)  # shapes unique per scene
    color_names = list(COLORS)
    objects = []
    for cell, ci, si in zip(cells, colors, shapes):
        row, col = divmod(int(cell), GRID)
        size = "small" if rng.random() < 0.5 else "large"
        jitter = 2 if size == "large" else 7
        cx = col * CELL + CELL // 2 + int(rng.integers(-jitter, jitter + 1))
        cy = row * CELL + CELL // 2 + int(rng.integers(-jitter, jitter + 1))
        objects.append(SceneObject(color_names[ci], SHAPES[si], size, row, col, cx, cy))
    objects.sort(key=lambda o: (o.col, o.row))

    img = Image.fromarray(np.clip(_background(rng), 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for o in objects:
        r = SIZES[o.size]
        fill = COLORS[o.color]
        poly = _polygon(o.shape, o.cx, o.cy, r)
        if poly is None:
            draw.ellipse([o.cx - r, o.cy - r, o.cx + r, o.cy + r], fill=fill)
        else:
            draw.polygon(poly, fill=fill)
    noise = rng.normal(0.0, 6.0, size=(IMAGE_SIZE, IMAGE_SIZE, 3))
    pixels = np.clip(np.asarray(img, np.float32) + noise, 0, 255).astype(np.uint8)
    return Scene(seed, Image.fromarray(pixels, "RGB"), tuple(objects))


def caption(scene: Scene) -> str:
    parts = [f"a {o.name}" for o in scene.objects]
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def questions(scene: Scene, rng: np.random.Generator | None = None) -> list[Question]:
    """One question of every kind for `scene`; the choices come from `rng`
    (seeded from the scene's seed when not given, so they are reproducible)."""
    rng = rng or np.random.default_rng(scene.seed + 7)
    objs = scene.objects
    target = objs[int(rng.integers(len(objs)))]
    out = [
        Question("color", f"what color is the {target.shape}?", target.color),
        Question("shape", f"what shape is the {target.color} object?", target.shape),
        Question("size", f"what size is the {target.name}?", target.size),
        Question("position", f"where is the {target.name}?", target.position),
        Question("caption", "describe the image.", caption(scene)),
    ]
    if rng.random() < 0.5:
        out.append(Question("count", "how many shapes are there?", NUMBER_WORDS[len(objs)]))
    else:
        size = "small" if rng.random() < 0.5 else "large"
        k = sum(o.size == size for o in objs)
        out.append(Question("count", f"how many {size} shapes are there?", NUMBER_WORDS[k]))
    present = {(o.color, o.shape) for o in objs}
    if rng.random() < 0.5:
        color, shape = target.color, target.shape
    else:
        # A near miss half the time: a colour or a shape that is in the scene.
        while True:
            color = list(COLORS)[int(rng.integers(len(COLORS)))]
            shape = SHAPES[int(rng.integers(len(SHAPES)))]
            if rng.random() < 0.5:
                color = target.color if rng.random() < 0.5 else color
                shape = target.shape if color != target.color else shape
            if (color, shape) not in present:
                break
    answer = "yes" if (color, shape) in present else "no"
    out.append(Question("yesno", f"is there a {color} {shape}?", answer))
    # Last, and drawing nothing from rng, so the other kinds' choices are
    # those of the scene world before grounding was added.
    out.append(Question("box", f"find the {target.name}.", box_text(target.box)))
    return out


def box_steps(box: tuple[float, float, float, float]) -> list[int]:
    """Pixel box -> k of each coordinate word k / BOX_STEPS (0..BOX_STEPS)."""
    return [min(max(round(v / IMAGE_SIZE * BOX_STEPS), 0), BOX_STEPS) for v in box]


def box_text(box: tuple[float, float, float, float]) -> str:
    """Pixel box -> the answer text, "[0.21, 0.33, 0.35, 0.47]"."""
    return "[" + ", ".join(f"{k / BOX_STEPS:.2f}" for k in box_steps(box)) + "]"


_BOX = re.compile(r"\[\s*([01](?:\.\d+)?)\s*,\s*([01](?:\.\d+)?)\s*,"
                  r"\s*([01](?:\.\d+)?)\s*,\s*([01](?:\.\d+)?)\s*\]")


def read_box(text: str) -> tuple[float, float, float, float] | None:
    """The first "[x1, y1, x2, y2]" of fractions in `text`, in pixels; None if none."""
    m = _BOX.search(text[:4096])
    if m is None:
        return None
    return tuple(float(g) * IMAGE_SIZE for g in m.groups())


def iou(a, b) -> float:
    """Intersection over union of two (x1, y1, x2, y2) boxes (0 when either is empty)."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(iw, 0.0) * max(ih, 0.0)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 and inter > 0 else 0.0


def normalize(text: str) -> str:
    """Exact match up to case, surrounding space and a trailing full stop."""
    return " ".join(text.strip().lower().rstrip(".").split())


def is_right(kind: str, answer: str, got: str) -> bool:
    """The scene world's scoring rule for `got` against the true `answer` of a
    question of `kind`: a box is right at IoU >= BOX_IOU with the true box,
    every other answer by exact match (up to normalize)."""
    if kind == "box":
        box, want = read_box(got), read_box(answer)
        return box is not None and want is not None and iou(box, want) >= BOX_IOU
    return normalize(got) == normalize(answer)


def eval_items(n: int, seed: int = DEFAULT_EVAL_SEED) -> list[tuple[Scene, Question]]:
    """`n` held-out (scene, question) pairs, cycling through the question kinds
    so each kind gets n/8 of them. Scenes come from the evaluation seed range."""
    items = []
    scene_seed = EVAL_SEED_BASE + seed * 100_000
    i = 0
    while len(items) < n:
        scene = make_scene(scene_seed + i)
        qs = {q.kind: q for q in questions(scene)}
        items.append((scene, qs[QUESTION_KINDS[len(items) % len(QUESTION_KINDS)]]))
        i += 1
    return items


def vocabulary(boxes: bool = True) -> list[str]:
    """Every word the scene world's questions and answers use; boxes=False
    leaves out the grounding words ("find", brackets, coordinates): the tiny
    random-weight family test models keep the word list their seeds were
    picked with (a larger vocabulary draws other random weights)."""
    words = set(COLORS) | set(SHAPES) | set(SIZES) | set(NUMBER_WORDS)
    words |= {"what", "color", "is", "the", "shape", "object", "size", "where", "top", "bottom",
              "left", "right", "describe", "image", "how", "many", "shapes", "are", "there",
              "a", "and", "yes", "no", "?", ",", "."}
    if boxes:
        words |= {"find", "[", "]"} | {f"{k / BOX_STEPS:.2f}" for k in range(BOX_STEPS + 1)}
    return sorted(words)
