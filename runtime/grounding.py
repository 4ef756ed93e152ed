"""Grounding: a model's answer text -> boxes in the original image's pixels.

Each family writes boxes its own way (the convention), in its own coordinate
frame; parse_boxes reads one convention and maps every box to the pixels of
the image the caller passed (before any resize or tiling), clipped to it:

  qwen2_5_vl  JSON, maybe inside a ```json fence: [{"bbox_2d": [x1, y1, x2, y2],
              "label": "cat"}, ...] in ABSOLUTE pixels of the image the model
              saw (the processor's smart_resize: grid w * patch_size by grid
              h * patch_size), so model_size is needed to map them back.
  qwen2_vl    <|object_ref_start|>cat<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)
              <|box_end|>, coordinates normalized to 0..1000. The session
              parses the answer decoded with special tokens kept, so the
              markers and labels are there; a bare "(x1,y1),(x2,y2)" (markers
              decoded away elsewhere) is read too, with label None.
  internvl    <ref>cat</ref><box>[[x1, y1, x2, y2], ...]</box>, normalized to
              0..1000, several boxes per ref. As above, a bare
              "[[x1, y1, x2, y2]]" is read with label None.
  paligemma   <locY1><locX1><locY2><locX2> label, groups separated by " ; ",
              each loc 0..1023 as a fraction of 1024 (order y, x): PaliGemma's
              "detect cat" answers.
  qwen3_vl    Qwen2.5-VL's JSON objects, coordinates normalized to 0..1000.
  llava       [x1, y1, x2, y2], each a fraction 0..1 of the image the model
              saw (LLaVA-1.5's grounding format; the demo model answers "find
              the red circle." this way). With CLIP's shortest-edge resize and
              center crop that image is a centered region of the original, so
              the caller passes that region (`region`); no label.
The text is untrusted (a model can emit anything): malformed text gives [],
never an exception, and the work is bounded (MAX_TEXT chars scanned, at most
MAX_BOXES boxes). numpy/stdlib only; PIL is imported by draw_boxes alone.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass

MAX_TEXT = 65536   # chars scanned: far above any answer an edge context holds
MAX_BOXES = 256    # boxes returned: more is a degenerate answer, not a scene

# Manifest family -> the convention its answers follow (families absent: none).
CONVENTIONS = {"qwen2_5_vl": "qwen2_5_vl", "qwen2_vl": "qwen2_vl", "internvl": "internvl",
               "paligemma": "paligemma", "qwen3_vl": "qwen3_vl", "llava": "llava"}
PARSERS = ("qwen2_5_vl", "qwen3_vl", "qwen2_vl", "internvl", "paligemma", "llava")


@dataclass(frozen=True)
class Box:
    """One box in the original image's pixels: 0 <= x1 <= x2 <= width,
    0 <= y1 <= y2 <= height (floats; x right, y down from the top-left)."""
    label: str | None
    x1: float
    y1: float
    x2: float
    y2: float

    def to_dict(self) -> dict:
        return asdict(self)


def convention_for(family: str) -> str | None:
    """The grounding convention of a manifest family, None where it has none."""
    return CONVENTIONS.get(family)


def model_size_from_grid(grid, patch_size: int | None) -> tuple[int, int] | None:
    """(w, h) of the image the model saw, from a Qwen (t, h, w) patch grid and
    the manifest's image.patch_size; None for any other grid."""
    if patch_size is None or not isinstance(grid, tuple) or len(grid) != 3:
        return None
    return int(grid[2]) * int(patch_size), int(grid[1]) * int(patch_size)


def parse_boxes(text: str, convention: str, image_size: tuple[int, int],
                model_size: tuple[int, int] | None = None,
                region: tuple[float, float, float, float] | None = None) -> list[Box]:
    """Boxes in `text` per `convention` (one of PARSERS), in the pixels of the
    original image of image_size (w, h). model_size (w, h): the image the model
    saw, for conventions in its absolute pixels (qwen2_5_vl; None: taken as the
    original's). region (x0, y0, w, h): the part of the original the model saw,
    for the llava convention (None: the whole image). Unknown convention, bad
    sizes or malformed text: []."""
    parse = _PARSE.get(convention)
    if parse is None or not isinstance(text, str) or not _size_ok(image_size):
        return []
    w, h = float(image_size[0]), float(image_size[1])
    ox = oy = 0.0
    if convention == "llava":
        if region is not None and _size_ok(region[2:]) and all(map(math.isfinite, region[:2])):
            ox, oy, sx, sy = (float(v) for v in region)
        else:
            sx, sy = w, h
    elif convention == "qwen2_5_vl":
        mw, mh = model_size if _size_ok(model_size) else (w, h)
        sx, sy = w / mw, h / mh
    elif convention == "paligemma":
        sx, sy = w / 1024.0, h / 1024.0
    else:  # 0..1000 normalized
        sx, sy = w / 1000.0, h / 1000.0
    boxes = []
    for label, x1, y1, x2, y2 in parse(text[:MAX_TEXT]):
        box = _box(label, ox + x1 * sx, oy + y1 * sy, ox + x2 * sx, oy + y2 * sy, w, h)
        if box is not None:
            boxes.append(box)
            if len(boxes) >= MAX_BOXES:
                break
    return boxes


def _size_ok(size) -> bool:
    return (isinstance(size, (tuple, list)) and len(size) == 2
            and all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in size))


def _box(label, x1, y1, x2, y2, w, h) -> Box | None:
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        return None
    x1, x2 = sorted((min(max(x1, 0.0), w), min(max(x2, 0.0), w)))
    y1, y2 = sorted((min(max(y1, 0.0), h), min(max(y2, 0.0), h)))
    if isinstance(label, str):
        label = label.strip()[:200] or None
    else:
        label = None
    return Box(label, x1, y1, x2, y2)


# -- qwen2_5_vl: JSON objects with "bbox_2d" ---------------------------------
_FENCE = re.compile(r"```(?:json)?\s*(.*?)(?:```|$)", re.S)
# Flat objects: a list that max_new_tokens cut still gives its whole ones.
_OBJECT = re.compile(r"\{[^{}]{0,2000}\}")


def _qwen2_5_vl(text: str):
    m = _FENCE.search(text)
    body = m.group(1) if m else text
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):  # not one JSON value: read its whole objects
        data = []
        for om in _OBJECT.finditer(body):
            try:
                data.append(json.loads(om.group(0)))
            except ValueError:
                continue
            if len(data) >= MAX_BOXES:
                break
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        return
    for item in data[:MAX_BOXES * 4]:
        if not isinstance(item, dict):
            continue
        bbox = item.get("bbox_2d", item.get("bbox"))
        if (isinstance(bbox, list) and len(bbox) == 4
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox)):
            label = item.get("label")
            yield (label if isinstance(label, str) else None, *map(float, bbox))


# -- qwen2_vl: (x1,y1),(x2,y2) in 0..1000 -----------------------------------
_NUM = r"\s{0,8}(-?\d{1,9}(?:\.\d{1,6})?)\s{0,8}"
_QWEN2 = re.compile(r"(?:<\|object_ref_start\|>([^<]{0,200})<\|object_ref_end\|>\s{0,8})?"
                    r"(?:<\|box_start\|>)?\s{0,8}"
                    rf"\({_NUM},{_NUM}\)\s{{0,8}},\s{{0,8}}\({_NUM},{_NUM}\)")


def _qwen2_vl(text: str):
    for m in _QWEN2.finditer(text):
        yield (m.group(1), *(float(v) for v in m.group(2, 3, 4, 5)))


# -- internvl: <ref>label</ref><box>[[x1, y1, x2, y2], ...]</box> -------------
# Bounded runs ({0,8}, {0,63}): no two open-ended repeats meet, so hostile
# text costs linear time.
_QUAD_TEXT = r"\[[^\[\]]{0,200}\]"
_INTERNVL = re.compile(r"(?:<ref>([^<]{0,200})</ref>\s{0,8})?(?:<box>)?\s{0,8}\[\s{0,8}("
                       + _QUAD_TEXT + r"(?:\s{0,8},?\s{0,8}" + _QUAD_TEXT + r"){0,63})\s{0,8}\]")
_QUAD = re.compile(rf"\[{_NUM},{_NUM},{_NUM},{_NUM}\]")


def _internvl(text: str):
    for m in _INTERNVL.finditer(text):
        for q in _QUAD.finditer(m.group(2)):
            yield (m.group(1), *(float(v) for v in q.groups()))


# -- paligemma: <locY1><locX1><locY2><locX2> label ; ... ----------------------
_PALIGEMMA = re.compile(r"<loc(\d{4})><loc(\d{4})><loc(\d{4})><loc(\d{4})>\s*([^<;]{0,200})")


def _paligemma(text: str):
    for m in _PALIGEMMA.finditer(text):
        y1, x1, y2, x2 = (float(v) for v in m.group(1, 2, 3, 4))
        if max(y1, x1, y2, x2) > 1023:  # not a location token
            continue
        yield (m.group(5), x1, y1, x2, y2)


# -- llava: [x1, y1, x2, y2] as fractions 0..1 --------------------------------


def _llava(text: str):
    for q in _QUAD.finditer(text):
        v = [float(g) for g in q.groups()]
        if all(0.0 <= c <= 1.0 for c in v):  # larger numbers are not this format
            yield (None, *v)


_PARSE = {"qwen2_5_vl": _qwen2_5_vl, "qwen3_vl": _qwen2_5_vl, "qwen2_vl": _qwen2_vl,
          "internvl": _internvl, "paligemma": _paligemma, "llava": _llava}


def draw_boxes(image, boxes: list[Box], out_path) -> None:
    """Draw `boxes` (original pixels) and their labels on `image` (a path or
    anything runtime.image_io.load_image takes) and write a PNG to out_path."""
    from PIL import Image, ImageDraw

    from .image_io import load_image
    canvas = Image.fromarray(load_image(image)).convert("RGB")
    draw = ImageDraw.Draw(canvas)
    width = max(2, round(min(canvas.size) / 200))  # visible on a camera frame
    for b in boxes:
        draw.rectangle((b.x1, b.y1, b.x2, b.y2), outline=(255, 0, 0), width=width)
        if b.label:
            draw.text((b.x1 + width, b.y1 + width), b.label, fill=(255, 0, 0))
    canvas.save(out_path, format="PNG")
