"""Qwen2-VL's multimodal rotary positions, computed on the host in numpy.

The decoder of a Qwen2-VL artifact takes position_ids (3, batch, S): one row
each for the temporal, height and width rotary sections (mrope). Text tokens
get the same position in all three rows, counting up by one; the tokens of
an image get its merged patch grid's coordinates, offset by the position the
image starts at. The vision encoder likewise takes per-patch (h, w)
coordinates and the cumulative patch counts of its attention segments (and,
for Qwen2.5-VL, its attention windows).
These depend on the image's grid, which the graphs cannot know from shapes
alone, so the host computes them (after transformers 5.x
Qwen2VLModel.get_rope_index and vision_utils.get_vision_position_ids /
get_vision_cu_seqlens / get_vision_window_index, the references in the tests).

Grids are (t, h, w) in patches, as the HF processor's image_grid_thw.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from vlmedge.errors import ArtifactError, UserInputError

Grid = Sequence[int]  # (t, h, w) patches


def check_grid(grid, merge_size: int) -> tuple[int, int, int]:
    """A (t, h, w) patch grid as ints, or a UserInputError saying what is wrong."""
    try:
        t, h, w = (int(v) for v in grid)
    except (TypeError, ValueError):
        raise UserInputError("bad image grid", expected="(t, h, w) patch counts",
                             got=repr(grid)) from None
    if min(t, h, w) < 1 or h % merge_size or w % merge_size:
        raise UserInputError("bad image grid",
                             expected=f"(t, h, w) >= 1 with h and w multiples of {merge_size}",
                             got=repr(tuple(grid)))
    return t, h, w


def image_token_count(grid: Grid, merge_size: int) -> int:
    """Tokens an image takes in the prompt: its patches merged merge_size x merge_size."""
    t, h, w = check_grid(grid, merge_size)
    return t * h * w // (merge_size * merge_size)


def rope_index(ids: Sequence[int], image_token_id: int, grids: Sequence[Grid],
               merge_size: int, start: int = 0) -> np.ndarray:
    """Token ids (S,) -> mrope position_ids (3, S) int64, the first token at `start`.

    Each run of image tokens is one image, taking the next grid in order
    (several images in one prompt: one grid each, in prompt order): its
    tokens get (p + t, p + h, p + w), p the image's first position, over the merged grid
    (t, h / merge, w / merge), row-major; text after it resumes at
    start + max(h, w) / merge (Qwen2VLModel.get_rope_index)."""
    ids = np.asarray(ids, np.int64)
    out = np.empty((3, len(ids)), np.int64)
    is_image = ids == image_token_id
    # Runs of equal modality: boundaries where is_image flips.
    edges = np.flatnonzero(np.diff(is_image.astype(np.int8))) + 1
    bounds = np.concatenate([[0], edges, [len(ids)]])
    grids = list(grids)
    pos = start
    for a, b in zip(bounds[:-1], bounds[1:]):
        if not is_image[a]:
            out[:, a:b] = np.arange(pos, pos + (b - a))
            pos += b - a
            continue
        if not grids:
            raise UserInputError("the prompt has more runs of image tokens than image grids",
                                 expected="one (t, h, w) grid per image")
        t, h, w = check_grid(grids.pop(0), merge_size)
        gh, gw = h // merge_size, w // merge_size
        if b - a != t * gh * gw:
            raise UserInputError("image tokens and image grid disagree",
                                 expected=f"{t * gh * gw} tokens for grid {(t, h, w)}",
                                 got=str(b - a))
        tt, hh, ww = np.meshgrid(np.arange(t), np.arange(gh), np.arange(gw), indexing="ij")
        out[0, a:b] = tt.ravel() + pos
        out[1, a:b] = hh.ravel() + pos
        out[2, a:b] = ww.ravel() + pos
        pos += max(h, w) // merge_size
    if grids:  # a grid no image took: the ids and the images disagree
        raise UserInputError("the prompt has fewer runs of image tokens than image grids",
                             expected="one run of image tokens per (t, h, w) grid",
                             got=f"{len(grids)} grid(s) left over")
    return out


def vision_position_ids(grid: Grid, merge_size: int) -> np.ndarray:
    """(t, h, w) -> (t*h*w, 2) int64 (row, column) of each patch, in the
    processor's patch order: merge_size x merge_size blocks, row-major, the
    patches of a block consecutive; repeated per frame."""
    t, h, w = check_grid(grid, merge_size)
    m = merge_size
    hh, ww = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")  # (h, w)
    # (h/m, m, w/m, m) -> (h/m, w/m, m, m): blocks first, then within a block.
    hh = hh.reshape(h // m, m, w // m, m).transpose(0, 2, 1, 3).ravel()
    ww = ww.reshape(h // m, m, w // m, m).transpose(0, 2, 1, 3).ravel()
    return np.tile(np.stack([hh, ww], axis=-1), (t, 1))


def vision_cu_seqlens(grid: Grid, merge_size: int) -> np.ndarray:
    """(t, h, w) -> (t + 1,) int32 cumulative patch counts: each frame is one
    attention segment of h*w patches (vision_utils.get_vision_cu_seqlens)."""
    t, h, w = check_grid(grid, merge_size)
    return np.arange(t + 1, dtype=np.int32) * np.int32(h * w)


def vision_window_index(grid: Grid, merge_size: int, window_size: int,
                        patch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Qwen2.5-VL's window attention for one image (vision_utils.get_vision_window_index):
    (t, h, w) -> window_index (t*h*w / merge^2,) int64, the merged units in
    window order, and cu_window_seqlens (windows + 1,) int32, the windows'
    cumulative patch counts. A window is window_size pixels square, so it holds
    at most (window_size // merge // patch * merge)^2 patches: the exported
    graph batches windows padded to that many (export/families/qwen2_vl.py)."""
    t, h, w = check_grid(grid, merge_size)
    side = window_size // merge_size // patch_size  # merged units per window side
    gh, gw = h // merge_size, w // merge_size
    # Pad the merged grid with -1 up to whole windows (a full extra window where
    # it divides evenly, as the reference does; empty windows drop out below).
    ph, pw = gh + side - gh % side, gw + side - gw % side
    padded = np.full((t, ph, pw), -1, np.int64)
    padded[:, :gh, :gw] = np.arange(t * gh * gw).reshape(t, gh, gw)
    windows = padded.reshape(t, ph // side, side, pw // side, side).transpose(0, 1, 3, 2, 4)
    windows = windows.reshape(-1, side * side)  # (windows, units)
    flat = windows.ravel()
    index = flat[flat >= 0]
    counts = (windows >= 0).sum(axis=1) * merge_size * merge_size
    cu = np.concatenate([[0], np.cumsum(counts)])
    cu = cu[np.concatenate([[True], np.diff(cu) != 0])]  # unique_consecutive
    return index, cu.astype(np.int32)


def vision_interpolation(grid: Grid, merge_size: int, side: int
                         ) -> tuple[np.ndarray, np.ndarray]:
    """Qwen3-VL's learned (side x side) position table resampled to a (t, h, w)
    grid: per patch, in the tower's merge-block order, the 4 bilinear taps
    (align_corners, edge-clamped) as indices (N, 4) int64 into the flattened
    table and weights (N, 4) float32; the float32 arithmetic of transformers'
    vision_utils.get_vision_interpolation_indices_and_weights."""
    t, h, w = check_grid(grid, merge_size)
    m = merge_size
    within = np.arange(t * h * w, dtype=np.int64) % (h * w)         # patch in its frame
    block_col = (within // (m * m)) % (w // m)
    block_row = within // (m * m * (w // m))
    row = block_row * m + (within // m) % m
    col = block_col * m + within % m

    def axis(index: np.ndarray, size: int):
        src = index.astype(np.float32) * np.float32(side - 1) / np.float32(max(size - 1, 1))
        floor = np.floor(src)
        offsets = np.arange(2)
        taps = np.clip(floor.astype(np.int64)[:, None] + offsets, 0, side - 1)
        distance = np.abs(src[:, None] - floor[:, None] - offsets.astype(np.float32))
        return taps, np.maximum(np.float32(1) - distance, np.float32(0))

    (ht, hw), (wt, ww) = axis(row, h), axis(col, w)
    indices = (ht[:, :, None] * side + wt[:, None, :]).reshape(-1, 4)
    weights = (hw[:, :, None] * ww[:, None, :]).reshape(-1, 4).astype(np.float32)
    return indices, weights


def _fact(image, key: str):
    """A fact of the image section: the typed ImageFacts of a manifest, or a
    plain dict of the same keys (the exporter's, before the manifest exists)."""
    return image[key] if isinstance(image, Mapping) else getattr(image, key)


_WINDOWS_HINT = ("this vision graph was exported for one number of attention windows (manifest "
                 "image.window_count); re-export the model with this vlmedge to serve every "
                 "grid, or resize the image to a grid like validated_grid")


def vision_inputs(names: Sequence[str], grid: Grid | None, image,
                  shapes: dict[str, list] | None = None) -> dict[str, np.ndarray]:
    """The vision graph's grid-derived inputs `names` for one image of patch
    grid (t, h, w); `image` is the manifest's image section. `shapes`: the
    graph's input shapes (ints fixed, strings dynamic), checked here so that
    a grid the graph cannot take is a clear error, not onnxruntime's.

    A Qwen2.5-VL graph takes cu_window_seqlens of any length (a named dim:
    every grid); one exported by vlmedge before that has a fixed length, the
    window count of the grid it was traced with (manifest image.window_count),
    and other grids are refused here."""
    if grid is None:
        raise UserInputError("this model's vision encoder needs the image's patch grid",
                             expected="image_grid=(t, h, w) as the processor's image_grid_thw")
    merge = int(_fact(image, "merge_size"))
    out: dict[str, np.ndarray] = {}
    for name in names:
        if name == "vision_position_ids":
            out[name] = vision_position_ids(grid, merge)
        elif name == "cu_seqlens":  # Qwen artifacts exported before the graph built it itself
            out[name] = vision_cu_seqlens(grid, merge)
        elif name in ("interp_indices", "interp_weights"):
            indices, weights = vision_interpolation(grid, merge,
                                                    int(_fact(image, "position_grid_side")))
            out[name] = indices if name == "interp_indices" else weights
        elif name in ("window_index", "cu_window_seqlens"):
            index, cu = vision_window_index(grid, merge, int(_fact(image, "window_size")),
                                            int(_fact(image, "patch_size")))
            out[name] = index if name == "window_index" else cu
        else:
            raise ArtifactError(f"unknown vision input {name!r}",
                                hint="upgrade vlmedge or re-export the artifact")
        want = (shapes or {}).get(name)
        if want is not None and (len(want) != out[name].ndim or any(
                isinstance(d, int) and d != n for d, n in zip(want, out[name].shape))):
            windows = name == "cu_window_seqlens"  # (windows + 1,)
            raise UserInputError(
                f"image grid {tuple(grid)} does not fit this artifact's vision graph",
                expected=f"{name} of shape {want}"
                         + (f" (window count {want[0] - 1})" if windows else ""),
                got=str(list(out[name].shape))
                    + (f" (window count {len(out[name]) - 1})" if windows else ""),
                hint=_WINDOWS_HINT if windows else "re-export the model with this vlmedge, or "
                "resize the image to a grid like the manifest's validated_grid")
    return out


class LinearPositions:
    """position_ids (1, S) = past .. past + S - 1: Llama-style decoders."""

    def __call__(self, past: int, offset: int, s: int, ids=None, image_grid=None):
        return np.arange(past, past + s, dtype=np.int64)[None, :], offset


class MropePositions:
    """position_ids (3, 1, S) for a Qwen2-VL decoder.

    A KV cache of length `past` carries `offset`: the next text position is
    past + offset (offset < 0 after an image, which takes fewer positions
    than tokens). Chunks with image tokens need their ids and image grid(s)."""

    def __init__(self, image_token_id: int, merge_size: int):
        self.image_token_id = int(image_token_id)
        self.merge_size = int(merge_size)

    def __call__(self, past: int, offset: int, s: int, ids=None, image_grid=None):
        start = past + offset
        if ids is None or self.image_token_id not in ids:
            pos = np.arange(start, start + s, dtype=np.int64)
            return np.broadcast_to(pos, (3, 1, s)).copy(), offset
        if len(ids) != s:
            raise ValueError(f"{len(ids)} ids for {s} positions")  # a caller bug
        if image_grid is None:
            raise UserInputError(
                "this model's positions depend on the image's patch grid, and none was given",
                expected="image_grid=(t, h, w) as the processor's image_grid_thw")
        grids = [image_grid] if np.ndim(image_grid) == 1 else list(image_grid)
        pos = rope_index(ids, self.image_token_id, grids, self.merge_size, start)
        # As rope_deltas in transformers: max position + 1 - tokens so far.
        return pos[:, None, :], int(pos.max()) + 1 - (past + s)
