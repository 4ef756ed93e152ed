"""An image-token budget: how much of an image becomes tokens, per call.

Image tokens cost vision time and prefill: a 640 x 480 camera frame is 13
SmolVLM tiles (832 tokens, ~17 s of vision on 2 cores), where one tile (64
tokens) may answer "is the door open?". The budget caps the tokens within
what the exported graphs take (they take any tile count or patch grid):

    idefics3   the image's long side is resized to the largest multiple of the
               tile size whose tiling (rows x cols tiles + the global one, or
               the global one alone) fits: tokens = tiles x image_seq_len
    qwen2_vl   max_pixels = budget x (patch x merge)^2, so smart_resize keeps
               the merged patches, the image tokens, within the budget
    repeat     (LLaVA, PaliGemma; and wrap, Gemma 3) the image always takes
               tokens_per_image: a smaller budget is an error; Gemma 3 with
               pan-and-scan keeps as many crops as fit beside the whole image
               (its max_num_crops lowered; fewer than 2: no crops, since one
               crop would be the whole image again)
    anyres     (LLaVA-NeXT/OneVision) the grid pinpoints are narrowed to those
               at which this image's packed features fit; the runtime carries
               the pinpoint used in the image grid, so packing follows it (the
               model was trained on the full set: a smaller budget is a
               coarser image, not the processor's own choice); an image
               beside others in a LLaVA-OneVision prompt is one tile and a
               newline, whatever the budget (below that: an error)
    internvl   max_patches is lowered to the largest whose tiling of this image
               (rows x cols tiles + the thumbnail, or one tile) fits:
               tokens = tiles x image_seq_len (the processor's max_patches
               setting, so the image is what it would make with it)

The preprocessing stays the HF processor's, run with those settings
(Idefics3ImageProcessor size={"longest_edge": L}, Qwen2VLImageProcessor
max_pixels), so a budgeted image is what the processor would have made.
"""
from __future__ import annotations

from vlmedge.errors import UserInputError

from . import anyres
from .preprocess import (idefics3_encoder_size, idefics3_resized_size, internvl_grid,
                         internvl_tile_count)


def idefics3_tiles(h: int, w: int, longest_edge: int, tile: int, splitting: bool) -> int:
    """Frames the Idefics3 tiling makes of an h x w image at `longest_edge`."""
    if not splitting:
        return 1
    rh, rw = idefics3_resized_size(h, w, longest_edge)
    eh, ew = idefics3_encoder_size(rh, rw, tile)
    if eh <= tile and ew <= tile:
        return 1
    return ((eh - tile) // tile + 1) * ((ew - tile) // tile + 1) + 1


def budget_tiling(tiling: dict | None, image, shape: tuple[int, int], max_tokens: int) -> dict | None:
    """The tiling for an h x w image within `max_tokens` image tokens (None:
    the artifact's own); `image` is the manifest's ImageFacts."""
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise UserInputError("max_image_tokens must be a positive integer",
                             got=repr(max_tokens)[:40])
    from .adapters import adapter_for  # the family's rule (runtime/adapters/)

    h, w = shape
    return adapter_for(image).budget(tiling, h, w, max_tokens)


def idefics3_budget(tiling: dict, image, h: int, w: int, max_tokens: int) -> dict:
    """The largest longest_edge (a multiple of the tile) whose tiling of an
    h x w image takes at most max_tokens tokens."""
    tile, per_tile = tiling["tile_size"], image.image_seq_len
    if max_tokens < per_tile:
        raise UserInputError("an image takes at least one tile",
                             expected=f"max_image_tokens >= {per_tile}", got=str(max_tokens))
    top = tiling["longest_edge"] or max(h, w)
    for k in range(max(top // tile, 1), 0, -1):
        edge = min(k * tile, top)
        if idefics3_tiles(h, w, edge, tile, tiling["do_image_splitting"]) * per_tile \
                <= max_tokens:
            return {**tiling, "longest_edge": edge}
    return {**tiling, "longest_edge": tile}


def qwen_budget(tiling: dict, max_tokens: int) -> dict:
    """max_pixels lowered to max_tokens merged patches' pixels."""
    unit = (tiling["patch_size"] * tiling["merge_size"]) ** 2  # pixels per image token
    max_pixels = min(tiling["max_pixels"], max_tokens * unit)
    if max_pixels < tiling["min_pixels"]:
        raise UserInputError("max_image_tokens is below this model's smallest image",
                             expected=f">= {-(-tiling['min_pixels'] // unit)}",
                             got=str(max_tokens))
    return {**tiling, "max_pixels": max_pixels}


def anyres_budget(tiling: dict, image, h: int, w: int, max_tokens: int) -> dict:
    """The pinpoints at which an h x w image takes at most max_tokens tokens."""
    counts = [(anyres.image_token_count((h, w, ph, pw), image), [ph, pw])
              for ph, pw in tiling["grid_pinpoints"]]
    fits = [pin for n, pin in counts if n <= max_tokens]
    if not fits:
        least = min(n for n, _ in counts)
        raise UserInputError(f"a {h}x{w} image takes at least {least} tokens with this model",
                             expected=f"max_image_tokens >= {least}", got=str(max_tokens))
    return {**tiling, "grid_pinpoints": fits}


def internvl_budget(tiling: dict, image, h: int, w: int, max_tokens: int) -> dict:
    """The largest max_patches at which an h x w image takes at most
    max_tokens tokens; max_patches 1 is one tile (the processor does not crop)."""
    per_tile = image.image_seq_len
    if max_tokens < per_tile:
        raise UserInputError("an image takes at least one tile",
                             expected=f"max_image_tokens >= {per_tile}", got=str(max_tokens))
    for m in range(tiling["max_patches"], 1, -1):
        budgeted = {**tiling, "max_patches": m}
        if internvl_tile_count(internvl_grid(h, w, budgeted)) * per_tile <= max_tokens:
            return budgeted
    return {**tiling, "max_patches": 1}
