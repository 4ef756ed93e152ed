"""The TensorRT optimization-profile plan of an artifact.

TensorRT needs, for every dynamic input dimension, a [min, opt, max] range
(an optimization profile); kernels are tuned at `opt` and the engine refuses
shapes outside [min, max]. The plan derives the ranges of the artifact's
named dims from three serving limits:

    max_context  C: tokens in the KV cache (prompt incl. image tokens + answer)
    max_batch    B: sequences decoded together (the runtime uses 1)
    max_images   I: images per prompt

per component:

    vision   llava:    batch = images          [1, 1, B*I]
             idefics3: batch = tiles           [1, tiles/image, B*I*tiles/image]
             anyres:   batch = tiles           [fewest, 5, B*I*most] over the
                       grid pinpoints (LLaVA-NeXT/OneVision)
             internvl: batch = tiles           [fewest, a 640x480 frame's,
                       B*I*(max_patches + 1)] (grid + thumbnail)
             qwen2_vl: num_patches, num_image_tokens of ONE image (one image
                       per vision call): from the processor's pixel limits;
                       Qwen2.5-VL also num_window_edges (attention windows
                       + 1): [2, validated grid's, the most any grid within
                       the limits makes], so one engine serves every grid
                       (artifacts exported before that fix the window count)
    embed    batch [1, 1, B], sequence_length [1, P, C]
    decoder  two profiles, because prefill and decode want different kernels
             (GEMM over a prompt vs. matrix-vector per token):
               prefill: sequence_length [1, P, C], past [0, 0, C-1]
               decode:  sequence_length [1, 1, 1], past [0, D, C-1]
             with total_sequence_length = past + sequence (attention_mask);
             a decoder with window layers (Gemma 2/3) adds their
             past_window_length, capped at decoder.window_cache rows.

P, the typical prompt, is one image's tokens plus TEXT_TOKENS (a short
question in its chat template); D = P + ANSWER_TOKENS, the past in the middle
of a typical short answer. The runtime picks the decode profile for one-token
steps and prefill otherwise. The plan's vision component says in words which
images its profile covers (`covers`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from vlmedge.errors import ArtifactError, UserInputError

TEXT_TOKENS = 32  # a short question + chat template around the image tokens
ANSWER_TOKENS = 16  # a short answer: where decode steps spend their time


@dataclass(frozen=True)
class Limits:
    max_context: int
    max_batch: int = 1
    max_images: int = 1

    def check(self) -> None:
        for name, v, lo in (("--max-context", self.max_context, 2),
                            ("--max-batch", self.max_batch, 1),
                            ("--max-images", self.max_images, 1)):
            if not isinstance(v, int) or v < lo:
                raise UserInputError(f"{name} must be an integer >= {lo}", got=str(v))


Range = tuple[int, int, int]  # (min, opt, max)
WINDOW_DIM = "num_window_edges"  # Qwen2.5-VL's cu_window_seqlens: (windows + 1,)


def _dim_names(m: dict[str, Any], comp: str) -> set[str]:
    """The named (dynamic) dims of a component's inputs."""
    return {d for spec in m["components"][comp]["inputs"] for d in spec["shape"]
            if isinstance(d, str)}


def _windows(gh: int, gw: int, side: int) -> int:
    """Attention windows of a merged gh x gw grid, side x side merged units
    each (runtime/mrope.py vision_window_index; empty windows drop out)."""
    return -(-gh // side) * -(-gw // side)


def _max_windows(tok_max: int, side: int) -> int:
    """The most windows of any merged grid gh x gw with gh * gw <= tok_max:
    for each gh the widest gw (windows never fall as gw grows). An upper
    bound: the processor's aspect-ratio limit rules out the thinnest grids."""
    return max(_windows(gh, tok_max // gh, side) for gh in range(1, tok_max + 1))


def _image_ranges(m: dict[str, Any], lim: Limits) -> tuple[dict[str, Range], Range]:
    """Vision dims and the image-token count of one image, as ranges."""
    img, pre = m["image"], m["preprocess"]
    per = int(img["tokens_per_image"])
    tiling = pre.get("tiling") or {}
    method = tiling.get("method")
    n = lim.max_batch * lim.max_images
    if method == "idefics3":
        # Resized to `longest_edge`, cut into tile x tile squares, plus the global tile.
        if tiling.get("do_image_splitting") and tiling.get("longest_edge"):
            side = math.ceil(int(tiling["longest_edge"]) / int(tiling["tile_size"]))
            tiles = side * side + 1
        else:
            tiles = 1
        return {"batch": (1, tiles, n * tiles)}, (per, per * tiles, per * tiles)
    if method == "qwen2_vl_patches":
        # Both sides are multiples of patch*merge with min_pixels <= area <= max_pixels;
        # each merged patch (patch*merge)^2 pixels is one image token.
        unit = (int(tiling["patch_size"]) * int(tiling["merge_size"])) ** 2
        merge2 = int(tiling["merge_size"]) ** 2
        tok_max = max(1, int(tiling["max_pixels"]) // unit)
        tok_min = min(tok_max, max(1, math.ceil(int(tiling["min_pixels"]) / unit)))
        t, h, w = img.get("validated_grid") or (1, 1, tok_max * merge2)
        tok_opt = min(max(t * h * w // merge2, tok_min), tok_max)
        toks = (tok_min, tok_opt, tok_max)
        dims = {"num_patches": tuple(x * merge2 for x in toks), "num_image_tokens": toks}
        if WINDOW_DIM in _dim_names(m, "vision"):  # Qwen2.5-VL: window_size px windows
            merge = int(tiling["merge_size"])
            side = max(1, int(img["window_size"]) // merge // int(tiling["patch_size"]))
            most = _max_windows(tok_max, side)
            opt = min(max(_windows(h // merge, w // merge, side), 1), most)
            dims[WINDOW_DIM] = (2, opt + 1, most + 1)
        return dims, toks
    if method == "anyres":
        # LLaVA-NeXT/OneVision: the base tile + rows x cols tiles of the chosen
        # pinpoint; the packed image tokens are counted by the host (runtime/anyres.py).
        s = int(tiling["tile_size"])
        counts = [(h // s) * (w // s) + 1 for h, w in tiling["grid_pinpoints"]]
        most, least = max(counts), min(counts)
        opt = min(max(counts), max(least, 5))  # a 2 x 2 grid: a camera frame's usual pinpoint
        toks = (per, per * opt, per * most)
        # batch from 1: the runtime feeds tiles one at a time (runtime/adapters/base.py),
        # and OneVision's several-image path is one tile
        return {"batch": (1, opt, n * most)}, toks
    if method == "internvl":
        return _internvl_ranges(tiling, per, n)
    if method == "pan_and_scan":
        # Gemma 3: the whole image, then up to max_num_crops crops, each one
        # image's tokens; opt: a 640 x 480 frame's crops (2). Views go through
        # the vision graph one at a time (runtime/adapters/base.py).
        from vlmedge.runtime.preprocess import pan_and_scan_crops
        most = 1 + int(tiling["max_num_crops"])
        opt = min(most, 1 + len(pan_and_scan_crops(480, 640, tiling)))
        return {"batch": (1, 1, n * most)}, (per, per * opt, per * most)
    return {"batch": (1, 1, n)}, (per, per, per)


def _internvl_ranges(tiling: dict[str, Any], per: int, n: int
                     ) -> tuple[dict[str, Range], Range]:
    """InternVL: rows x cols tiles of min..max_patches, plus the thumbnail when
    split; one tile when the processor does not crop. opt: a 640 x 480 camera
    frame's tiling (13 tiles for InternVL3's 1..12)."""
    from vlmedge.runtime.preprocess import internvl_grid, internvl_tile_count

    lo, hi = int(tiling["min_patches"]), int(tiling["max_patches"])
    if not tiling.get("crop_to_patches") or hi <= 1:
        return {"batch": (1, 1, n)}, (per, per, per)
    most = hi + 1  # the cols = max_patches, rows = 1 grid, and the thumbnail
    # a grid of min_patches tiles (min > max: no grid qualifies, HF's tiles 1 x 1)
    least = internvl_tile_count((1, lo)) if lo <= hi else 1
    opt = min(max(internvl_tile_count(internvl_grid(480, 640, tiling)), least), most)
    # batch from 1: the runtime feeds tiles one at a time (runtime/adapters/base.py)
    return {"batch": (1, opt, n * most)}, (per * least, per * opt, per * most)


def dim_ranges(m: dict[str, Any], lim: Limits) -> dict[str, list[tuple[str, dict[str, Range]]]]:
    """component -> [(profile name, {dim name: (min, opt, max)})]."""
    lim.check()
    c, b = lim.max_context, lim.max_batch
    vision, tok = _image_ranges(m, lim)
    if lim.max_images * tok[0] + 1 > c:
        raise UserInputError(
            f"--max-images {lim.max_images} needs at least {lim.max_images * tok[0]} image tokens, "
            f"more than --max-context {c} holds", hint="raise --max-context or lower --max-images")
    p = min(c, tok[1] + TEXT_TOKENS)  # typical prompt: one image + a short question
    d = min(c - 1, p + ANSWER_TOKENS)  # past during a typical short answer
    batch = (1, 1, b)
    prefill = {"batch": batch, "sequence_length": (1, p, c),
               "past_sequence_length": (0, 0, c - 1), "total_sequence_length": (1, p, c)}
    decode = {"batch": batch, "sequence_length": (1, 1, 1),
              "past_sequence_length": (0, d, c - 1), "total_sequence_length": (1, d + 1, c)}
    w = (m.get("decoder") or {}).get("window_cache")
    if w:  # window layers hold at most w rows, whatever the context
        prefill["past_window_length"] = (0, 0, min(w, c - 1))
        decode["past_window_length"] = (0, min(d, w), min(w, c - 1))
    return {
        "vision": [("images", vision)],
        "embed": [("tokens", {"batch": batch, "sequence_length": (1, p, c)})],
        "decoder": [("prefill", prefill), ("decode", decode)],
    }


def covers(m: dict[str, Any], lim: Limits) -> str:
    """Which images the vision profile serves, in words (the plan's
    components.vision.covers)."""
    dims, tok = _image_ranges(m, lim)
    method = (m["preprocess"].get("tiling") or {}).get("method")
    if method != "qwen2_vl_patches":
        n = dims["batch"][2]
        if method == "pan_and_scan":
            return (f"every image (resized to the graph's input size, and up to "
                    f"{dims['batch'][2] // lim.max_images // lim.max_batch - 1} pan-and-scan "
                    f"crops of it), one view per vision call")
        return (f"every image ({'tiled' if method else 'resized'} to the graph's input size), "
                f"up to {n} {'tiles' if method else 'images'} per vision call")
    text = (f"every grid of one image with {tok[0]}..{tok[2]} image tokens "
            f"({dims['num_patches'][0]}..{dims['num_patches'][2]} patches)")
    shapes = {i["name"]: i["shape"] for i in m["components"]["vision"]["inputs"]}
    edges = shapes.get("cu_window_seqlens", [None])[0]
    if isinstance(edges, int):  # exported before the window count was a dim
        return (f"{text} and exactly {edges - 1} attention windows (this vision graph fixes "
                f"the window count; re-export it to serve every grid)")
    if WINDOW_DIM in dims:
        return f"{text} and 1..{dims[WINDOW_DIM][2] - 1} attention windows"
    return text


def _shapes(comp: str, inputs: list[dict], dims: dict[str, Range]) -> dict[str, dict[str, list]]:
    """{input: {"min"|"opt"|"max": shape}} from the manifest's named-dim shapes."""
    out = {}
    for spec in inputs:
        shape = {"min": [], "opt": [], "max": []}
        for d in spec["shape"]:
            if isinstance(d, int) and d > 0:
                r = (d, d, d)
            elif isinstance(d, str) and d in dims:
                r = dims[d]
            else:
                raise ArtifactError(
                    f"{comp} input {spec['name']} has a dimension {d!r} the TensorRT plan does not "
                    f"know", expected=f"a fixed size or one of {sorted(dims)}",
                    hint="re-export the artifact with this version of vlm-export")
            for k, v in zip(("min", "opt", "max"), r):
                shape[k].append(int(v))
        out[spec["name"]] = shape
    return out


def make_plan(m: dict[str, Any], lim: Limits) -> dict[str, Any]:
    """The manifest's trt.plan: limits, and per component its profiles with
    the min/opt/max shape of every input (profile index = list position)."""
    ranges = dim_ranges(m, lim)
    comps = {}
    for comp, spec in m["components"].items():
        if comp not in ranges:
            raise ArtifactError(f"component {comp!r} has no TensorRT profile rule",
                                expected=f"one of {sorted(ranges)}")
        comps[comp] = {"profiles": [
            {"name": name, "dims": {k: list(v) for k, v in dims.items()},
             "shapes": _shapes(comp, spec["inputs"], dims)}
            for name, dims in ranges[comp]]}
    if "vision" in comps:
        comps["vision"]["covers"] = covers(m, lim)
    return {"max_context": lim.max_context, "max_batch": lim.max_batch,
            "max_images": lim.max_images, "components": comps}


def profile_index(plan_component: dict[str, Any], sequence_length: int | None) -> int:
    """Which profile a call uses: decode for one-token steps, else the first
    (prefill, or the component's only profile)."""
    names = [p["name"] for p in plan_component["profiles"]]
    if sequence_length == 1 and "decode" in names:
        return names.index("decode")
    return 0
