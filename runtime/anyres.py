"""LLaVA-NeXT / LLaVA-OneVision "anyres" images on the host, in numpy.

The processor picks, from the model's grid pinpoints, the resolution (bh, bw)
that keeps most of an h x w image, resizes the image into it keeping its
aspect ratio, pads it centred with zeros, and cuts it into rows x cols
tiles of the vision tower's size S (rows = bh / S, cols = bw / S), after a
base tile: the whole image squashed to S x S. The vision graph turns the
N = rows * cols + 1 tiles into per-tile features (N, side * side, D), side =
S / patch. Packing them (LlavaNextModel.pack_image_features) depends on the
ORIGINAL image size, so it happens here, after the vision graph:

    tiles (rows, cols, side, side, D) -> one feature map (rows*side, cols*side, D)
    -> unpadded: the rows (or columns) that came from the padding dropped
    -> OneVision "anyres_max_K": a map of more than about K tiles' features
       shrunk by bilinear interpolation (torch's, align_corners=False)
    -> the learned image_newline vector (D,) after each row
    -> the base tile's side*side features first

An image's grid, as the runtime passes it around, is (h, w, bh, bw): its
original size and the resolution it was tiled at. The prompt's image token
count follows from it (`image_token_count`), equal to the processor's.

LLaVA-OneVision packs an image that shares a prompt with others differently
(processor and model, batch_num_images > 1): padded to a square of the mean
colour, resized to one tile, its side*side features and one newline. Its
grid is (h, w, 0, 0): SQUARE.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np

from vlmedge.errors import ArtifactError, UserInputError

Grid = Sequence[int]  # (h, w, bh, bw): original size, tiled resolution


def select_best_resolution(h: int, w: int, pinpoints) -> tuple[int, int]:
    """The (height, width) of `pinpoints` keeping the most of an h x w image,
    ties to the least padding (transformers' select_best_resolution)."""
    best, most, least = None, 0, float("inf")
    for ph, pw in pinpoints:
        scale = min(pw / w, ph / h)
        effective = min(int(w * scale) * int(h * scale), w * h)
        wasted = pw * ph - effective
        if effective > most or (effective == most and wasted < least):
            best, most, least = (int(ph), int(pw)), effective, wasted
    if best is None:
        raise ArtifactError("anyres tiling has no grid pinpoints", hint="re-export the artifact")
    return best


def fitted_size(h: int, w: int, bh: int, bw: int) -> tuple[int, int]:
    """The image's size inside (bh, bw), aspect ratio kept (transformers'
    get_patch_output_size); the rest is zero padding, centred."""
    scale_w, scale_h = bw / w, bh / h
    if scale_w < scale_h:
        return min(math.ceil(h * scale_w), bh), bw
    return bh, min(math.ceil(w * scale_h), bw)


def _fact(image, key: str):
    """A fact of the image section: typed ImageFacts or a plain dict."""
    return image[key] if isinstance(image, Mapping) else getattr(image, key)


SQUARE = (0, 0)  # (bh, bw) of a OneVision image padded square, one tile (several images)


def check_grid(grid, image) -> tuple[int, int, int, int]:
    """(h, w, bh, bw) as ints, (bh, bw) one of the artifact's pinpoints (or
    SQUARE, for OneVision), or a UserInputError saying what is wrong."""
    try:
        h, w, bh, bw = (int(v) for v in grid)
    except (TypeError, ValueError):
        raise UserInputError("bad anyres image grid", expected="(height, width, tiled height, "
                             "tiled width) as preprocess() returns it", got=repr(grid)) from None
    pins = {tuple(int(v) for v in p) for p in _fact(image, "grid_pinpoints")}
    if _fact(image, "anyres_max_tiles") is not None:
        pins.add(SQUARE)
    if min(h, w) < 1 or (bh, bw) not in pins:
        raise UserInputError("bad anyres image grid",
                             expected=f"a size >= 1 and a tiled resolution among the artifact's "
                                      f"{len(pins)} grid pinpoints", got=repr(tuple(grid)))
    return h, w, bh, bw


def feature_layout(grid, image) -> dict:
    """Where an image's tile features go: side (features per tile side),
    rows/cols of tiles, the unpadded window [top:bottom, left:right] of the
    (rows*side, cols*side) map, and `shrunk` (its size after anyres_max
    interpolation, None if kept)."""
    h, w, bh, bw = check_grid(grid, image)
    tile = int(_fact(image, "tile_size"))
    side = tile // int(_fact(image, "patch_size"))
    rows, cols = bh // tile, bw // tile
    H, W = rows * side, cols * side
    top, bottom, left, right = 0, H, 0, W
    if w / h > W / H:  # wider than the map: padding above and below (unpad_image)
        pad = (H - int(round(h * (W / w), 7))) // 2
        top, bottom = pad, H - pad
    else:
        pad = (W - int(round(w * (H / h), 7))) // 2
        left, right = pad, W - pad
    ch, cw = bottom - top, right - left
    shrunk = None
    most = _fact(image, "anyres_max_tiles")
    if most is not None:
        ratio = math.sqrt(ch * cw / (int(most) * side ** 2))
        if ratio > 1.1:  # LlavaOnevisionModel.pack_image_features
            shrunk = (int(ch // ratio), int(cw // ratio))
    return {"side": side, "rows": rows, "cols": cols, "window": (top, bottom, left, right),
            "shrunk": shrunk}


def image_token_count(grid, image) -> int:
    """Tokens an image takes in the prompt: the base tile's side^2, then per
    row of the packed map its features and one newline."""
    if tuple(check_grid(grid, image)[2:]) == SQUARE:  # one tile and one newline
        side = int(_fact(image, "tile_size")) // int(_fact(image, "patch_size"))
        return side * side + 1
    lay = feature_layout(grid, image)
    top, bottom, left, right = lay["window"]
    fh, fw = lay["shrunk"] or (bottom - top, right - left)
    return lay["side"] ** 2 + fh * (fw + 1)


def tiles(grid, image) -> int:
    """Frames the vision graph takes for an image: rows * cols + the base."""
    lay = feature_layout(grid, image)
    return lay["rows"] * lay["cols"] + 1


def bilinear(x: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """(H, W, D) -> (out_h, out_w, D) as torch.nn.functional.interpolate(mode=
    "bilinear", align_corners=False, no antialias), in float32: each output
    pixel's source (dst + 0.5) * in / out - 0.5, clamped at 0, blended from
    its 2 x 2 neighbours (rows last, as torch's CPU kernel sums)."""
    def axis(n_in: int, n_out: int):
        scale = np.float32(n_in) / np.float32(n_out)
        src = np.maximum(scale * (np.arange(n_out, dtype=np.float32) + np.float32(0.5))
                         - np.float32(0.5), np.float32(0))
        i0 = src.astype(np.int64)
        i1 = np.minimum(i0 + 1, n_in - 1)
        l1 = src - i0.astype(np.float32)
        return i0, i1, np.float32(1) - l1, l1

    y0, y1, wy0, wy1 = axis(x.shape[0], out_h)
    x0, x1, wx0, wx1 = axis(x.shape[1], out_w)
    x = x.astype(np.float32, copy=False)
    wx0, wx1 = wx0[None, :, None], wx1[None, :, None]
    top = wx0 * x[y0][:, x0] + wx1 * x[y0][:, x1]       # (out_h, out_w, D)
    bottom = wx0 * x[y1][:, x0] + wx1 * x[y1][:, x1]
    return wy0[:, None, None] * top + wy1[:, None, None] * bottom


def pack_features(feats: np.ndarray, grid, image) -> np.ndarray:
    """Per-tile features (N, side*side, D), base tile first, -> the image's
    packed features (1, M, D), M = image_token_count(grid, image); a SQUARE
    grid's one tile: its features, then the newline."""
    if tuple(check_grid(grid, image)[2:]) == SQUARE:
        side = int(_fact(image, "tile_size")) // int(_fact(image, "patch_size"))
        lay = {"side": side, "rows": 0, "cols": 0}
    else:
        lay = feature_layout(grid, image)
    side, rows, cols = lay["side"], lay["rows"], lay["cols"]
    n, t, d = feats.shape
    if n != rows * cols + 1 or t != side * side:
        raise UserInputError("anyres tile features and image grid disagree",
                             expected=f"({rows * cols + 1}, {side * side}, D) for grid "
                                      f"{tuple(grid)}", got=str(tuple(feats.shape)))
    newline = np.asarray(_fact(image, "image_newline"), np.float32)
    if newline.shape != (d,):
        raise ArtifactError("image.image_newline disagrees with the vision graph",
                            expected=f"{d} values", got=str(newline.shape[0]),
                            hint="re-export the artifact")
    if rows == 0:  # SQUARE: LlavaOnevisionModel.pack_image_features for one tile
        return np.concatenate([feats[0], newline.astype(feats.dtype)[None]])[None]
    fmap = feats[1:].reshape(rows, cols, side, side, d).transpose(0, 2, 1, 3, 4)
    fmap = fmap.reshape(rows * side, cols * side, d)                # (H, W, D)
    top, bottom, left, right = lay["window"]
    fmap = fmap[top:bottom, left:right]
    if lay["shrunk"] is not None:
        fmap = bilinear(fmap, *lay["shrunk"]).astype(feats.dtype, copy=False)
    rows_out = fmap.shape[0]
    lines = np.broadcast_to(newline.astype(feats.dtype), (rows_out, 1, d))
    packed = np.concatenate([fmap, lines], axis=1).reshape(-1, d)   # (fh * (fw + 1), D)
    return np.concatenate([feats[0], packed])[None]                 # (1, M, D)
