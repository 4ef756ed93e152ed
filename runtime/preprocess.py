"""Image preprocessing for the runtime: the C extension, with the numpy
reference as a fallback when the extension is not built.

Pixel layout everywhere: images in are uint8 (H, W, C) interleaved (HWC), RGB
unless stated; model inputs out are float32 planar (3, H, W) (CHW), batched as
(1, 3, H, W) `pixel_values`. The numbers equal those of the Hugging Face image
processors on their Pillow backend (transformers 5.x): the resize is Pillow's
Image.resize, bit for bit, and rescale/normalize round as HF's do.
"""
from __future__ import annotations

import math

import numpy as np

from vlmedge.errors import UserInputError

from . import anyres, preprocess_ref
from .image_io import load_image

try:
    from . import _cpreprocess
except ImportError:  # source tree without a built extension
    _cpreprocess = None

# The largest side a resize may produce, and the largest size a config may ask
# for: an extreme aspect ratio (a 1 x 20,000,000 px strip resized to a short
# side of 128) or a hostile manifest (size 10**6) must be an error, not a
# terabyte allocation or a C integer overflow. Far above any VLM's input.
MAX_RESIZE_SIDE = 1 << 24  # (only the cropped region is computed, so this costs nothing)
MAX_CONFIG_SIZE = 1 << 14
MAX_CONFIG_PIXELS = 1 << 28

# Pillow's filter numbers (PIL.Image.Resampling). NEAREST (0) is not provided.
RESAMPLE = {"lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}
_RESAMPLE_NAMES = {v: k for k, v in RESAMPLE.items()}


def has_c_extension() -> bool:
    return _cpreprocess is not None


def normalize_to_chw(hwc: np.ndarray, scale: float, mean, std,
                     out: np.ndarray | None = None) -> np.ndarray:
    """uint8 (H, W, 3|4) RGB[A] pixels -> float32 (3, H, W), rescaled and
    normalized per channel: (v * scale - mean[c]) / std[c].

    `out`, if given, must be a C-contiguous float32 (3, H, W) array; it is
    filled and returned (no allocation per frame)."""
    if hwc.ndim != 3 or hwc.shape[2] not in (3, 4) or hwc.dtype != np.uint8:
        raise ValueError(f"normalize_to_chw: expected uint8 (H, W, 3|4) pixels; "
                         f"got {hwc.dtype} {hwc.shape}")
    h, w, ch = hwc.shape
    if out is None:
        out = np.empty((3, h, w), np.float32)
    elif out.dtype != np.float32 or out.shape != (3, h, w):
        raise ValueError(f"normalize_to_chw: out must be float32 (3, {h}, {w}); "
                         f"got {out.dtype} {out.shape}")
    if _cpreprocess is None:
        out[...] = preprocess_ref.normalize_to_chw(hwc, scale, mean, std)
        return out
    _cpreprocess.normalize_to_chw(np.ascontiguousarray(hwc), h, w, ch, out, float(scale),
                                  tuple(map(float, mean)), tuple(map(float, std)))
    return out


# --- resize and crop ----------------------------------------------------------

def resample_id(resample) -> int:
    """'bicubic' | 'bilinear' | 'lanczos' | 'box' | 'hamming' or Pillow's
    number (1..5) -> Pillow's number."""
    if isinstance(resample, str) and resample.lower() in RESAMPLE:
        return RESAMPLE[resample.lower()]
    if isinstance(resample, (int, np.integer)) and int(resample) in _RESAMPLE_NAMES:
        return int(resample)
    nearest = resample in (0, "nearest")
    raise UserInputError("unsupported resample filter",
                         expected=f"one of {sorted(RESAMPLE)} or Pillow's 1..5",
                         got=repr(resample), hint="NEAREST (0) is not supported" if nearest else None)


def _check_pixels(hwc: np.ndarray, fn: str) -> np.ndarray:
    if not isinstance(hwc, np.ndarray) or hwc.dtype != np.uint8 or hwc.ndim != 3 \
            or not 1 <= hwc.shape[2] <= 4:
        got = f"{hwc.dtype} {hwc.shape}" if isinstance(hwc, np.ndarray) else type(hwc).__name__
        raise UserInputError(f"{fn}: bad pixels", expected="uint8 (H, W, C) with C in 1..4",
                             got=got)
    if hwc.shape[0] == 0 or hwc.shape[1] == 0:
        raise UserInputError(f"{fn}: empty image", expected="height and width >= 1",
                             got=f"{hwc.shape[0]}x{hwc.shape[1]} (HxW)")
    return np.ascontiguousarray(hwc)


def resize_region(hwc: np.ndarray, out_h: int, out_w: int, region, resample="bicubic",
                  out: np.ndarray | None = None, order: int = 0) -> np.ndarray:
    """Rows [y0, y0+rh) and columns [x0, x0+rw) of the (out_h, out_w) resize of
    uint8 (H, W, C) pixels, region = (y0, x0, rh, rw) -> uint8 (rh, rw, C).

    Equals np.asarray(Image.fromarray(hwc).resize((out_w, out_h), resample))
    [y0:y0+rh, x0:x0+rw] for 8-bit bands (Pillow 13's pass order; order=1 for
    Pillow <= 12), computing only the region (a fused resize + crop). `out`, if
    given, is a C-contiguous uint8 (rh, rw, C) array that is filled and returned."""
    hwc, (y0, x0, rh, rw) = _check_region(hwc, out_h, out_w, region)
    h, w, ch = hwc.shape
    f = resample_id(resample)
    if out is None:
        out = np.empty((rh, rw, ch), np.uint8)
    elif out.dtype != np.uint8 or out.shape != (rh, rw, ch) or not out.flags.c_contiguous:
        raise UserInputError("resize: bad out buffer",
                             expected=f"C-contiguous uint8 {(rh, rw, ch)}",
                             got=f"{out.dtype} {out.shape}")
    if _cpreprocess is None:
        out[...] = preprocess_ref.resize_region(hwc, out_h, out_w, f, y0, x0, rh, rw, order)
    else:
        _cpreprocess.resize_region(hwc, h, w, ch, out, out_h, out_w, f, y0, x0, rh, rw, order)
    return out


def resize_normalize(hwc: np.ndarray, out_h: int, out_w: int, region, resample, scale: float,
                     mean, std, out: np.ndarray | None = None, order: int = 0) -> np.ndarray:
    """resize_region then normalize_to_chw in one pass: uint8 (H, W, 3|4) RGB[A]
    -> float32 (3, rh, rw) CHW, region = (y0, x0, rh, rw) of the (out_h, out_w)
    resize. Bit for bit the two calls' result; the C path never writes the
    uint8 crop (its rows go through L1 scratch). `out`, if given, is a
    C-contiguous float32 (3, rh, rw) array that is filled and returned."""
    hwc, (y0, x0, rh, rw) = _check_region(hwc, out_h, out_w, region)
    h, w, ch = hwc.shape
    if ch not in (3, 4):
        raise UserInputError("resize_normalize: bad pixels", expected="uint8 (H, W, 3|4) RGB[A]",
                             got=f"{hwc.dtype} {hwc.shape}")
    f = resample_id(resample)
    if out is None:
        out = np.empty((3, rh, rw), np.float32)
    elif out.dtype != np.float32 or out.shape != (3, rh, rw) or not out.flags.c_contiguous:
        raise UserInputError("resize_normalize: bad out buffer",
                             expected=f"C-contiguous float32 {(3, rh, rw)}",
                             got=f"{out.dtype} {out.shape}")
    if _cpreprocess is None:
        out[...] = preprocess_ref.resize_normalize(hwc, out_h, out_w, f, y0, x0, rh, rw,
                                                   scale, mean, std, order)
    else:
        _cpreprocess.resize_normalize(hwc, h, w, ch, out, out_h, out_w, f, y0, x0, rh, rw,
                                      float(scale), tuple(map(float, mean)),
                                      tuple(map(float, std)), order)
    return out


def _check_region(hwc, out_h: int, out_w: int, region) -> tuple[np.ndarray, tuple]:
    """(C-contiguous pixels, (y0, x0, rh, rw)), or a UserInputError for a
    region outside the (out_h, out_w) output or a resize too large to do."""
    hwc = _check_pixels(hwc, "resize")
    h, w = hwc.shape[:2]
    y0, x0, rh, rw = (int(v) for v in region)
    if min(out_h, out_w) < 1 or y0 < 0 or x0 < 0 or rh < 1 or rw < 1 \
            or y0 + rh > out_h or x0 + rw > out_w:
        raise UserInputError("resize: region outside the output",
                             expected=f"rows and columns inside {out_h}x{out_w} (HxW)",
                             got=f"rows {y0}..{y0 + rh}, columns {x0}..{x0 + rw}")
    if max(out_h, out_w) > MAX_RESIZE_SIDE or max(h, w) > MAX_RESIZE_SIDE * 64:
        raise UserInputError("image too elongated or too large to resize for this model",
                             expected=f"a resize to at most {MAX_RESIZE_SIDE} px a side",
                             got=f"{h}x{w} -> {out_h}x{out_w} (HxW)",
                             hint="crop the image to a more usual aspect ratio first")
    return hwc, (y0, x0, rh, rw)


def resize(hwc: np.ndarray, out_h: int, out_w: int, resample="bicubic",
           out: np.ndarray | None = None, order: int = 0) -> np.ndarray:
    """uint8 (H, W, C) -> uint8 (out_h, out_w, C), equal to Pillow's
    Image.resize((out_w, out_h), resample) (reducing_gap=None) per band.
    C channels are resized independently: pass RGB, not RGBA (Pillow
    premultiplies alpha)."""
    return resize_region(hwc, out_h, out_w, (0, 0, out_h, out_w), resample, out, order)


def crop_offsets(h: int, w: int, crop_h: int, crop_w: int) -> tuple[int, int]:
    """HF's center-crop corner (top, left) for an h x w image; negative when
    the crop is larger (the image is then zero-padded). Floor division, so an
    odd margin puts the extra pixel at the bottom/right (see
    transformers.image_transforms.center_crop)."""
    return (h - crop_h) // 2, (w - crop_w) // 2


def center_crop(hwc: np.ndarray, crop_h: int, crop_w: int) -> np.ndarray:
    """uint8 (H, W, C) -> uint8 (crop_h, crop_w, C), as HF's center_crop:
    the centered window, with zeros where it extends past the image (the image
    sits at ceil(margin / 2) from the top/left)."""
    hwc = _check_pixels(hwc, "center_crop")
    if crop_h < 1 or crop_w < 1:
        raise UserInputError("center_crop: bad crop size", expected="height and width >= 1",
                             got=f"{crop_h}x{crop_w}")
    h, w, ch = hwc.shape
    top, left = crop_offsets(h, w, crop_h, crop_w)
    if top >= 0 and left >= 0:
        return np.ascontiguousarray(hwc[top:top + crop_h, left:left + crop_w])
    out = np.zeros((crop_h, crop_w, ch), np.uint8)
    (sy, sx, rh, rw), (dy, dx) = _crop_overlap(h, w, crop_h, crop_w)
    out[dy:dy + rh, dx:dx + rw] = hwc[sy:sy + rh, sx:sx + rw]
    return out


def _crop_overlap(h, w, crop_h, crop_w):
    """((y0, x0, rh, rw) of the h x w image inside the centered crop window,
    (dy, dx) where that part lands in the crop)."""
    top, left = crop_offsets(h, w, crop_h, crop_w)
    y0, x0 = max(top, 0), max(left, 0)
    rh, rw = min(h, top + crop_h) - y0, min(w, left + crop_w) - x0
    return (y0, x0, rh, rw), (y0 - top, x0 - left)


# --- output sizes, as transformers computes them --------------------------------

def shortest_edge_size(h: int, w: int, size: int, max_size: int | None = None) -> tuple[int, int]:
    """(out_h, out_w) with the shorter side `size`, the longer int()-truncated,
    as transformers' get_resize_output_image_size(default_to_square=False);
    with max_size (HF size {"shortest_edge", "longest_edge"}) as its
    get_size_with_aspect_ratio."""
    if max_size is not None:
        return _size_with_aspect_ratio(h, w, size, max_size)
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    return (new_long, new_short) if w <= h else (new_short, new_long)


def _size_with_aspect_ratio(h, w, size, max_size):
    raw_size = None
    lo, hi = float(min(h, w)), float(max(h, w))
    if hi / lo * size > max_size:
        raw_size = max_size * lo / hi
        size = int(round(raw_size))
    if (h <= w and h == size) or (w <= h and w == size):
        return h, w
    scale = raw_size if raw_size is not None else size
    if w < h:
        return int(scale * h / w), size
    return size, int(scale * w / h)


# --- the pipeline -----------------------------------------------------------

_DEFAULTS = {"resize": "shortest_edge", "size": 224, "max_size": None, "crop": None,
             "resample": "bicubic", "rescale": 1 / 255, "mean": None, "std": None,
             "convert_rgb": True, "tiling": None, "processor": None}
_RESIZE_RULES = ("shortest_edge", "exact", "none")


class ImagePreprocessor:
    """An HF-style image processor for one model, driven by a plain dict (the
    artifact manifest's "preprocess" entry). Image in (path, bytes, PIL image, or
    uint8 HWC array in `layout` order) -> float32 (1, 3, H, W) pixel_values (CHW)
    by __call__; preprocess() also serves configs that tile or patch the
    image (Idefics3, Qwen2-VL) and returns the image grid with the pixels.

    Config keys (missing keys take the default in brackets):
      resize      "shortest_edge" | "exact" | "none" ["shortest_edge"]: scale so
                  the short side is `size` (HF size {"shortest_edge"}), or to
                  exactly (height, width) (HF {"height", "width"}), or not at all
      size        int for shortest_edge; [height, width] (or an int) for exact [224]
      max_size    int | None: cap on the long side with shortest_edge (HF
                  size["longest_edge"]) [None]
      crop        [height, width] | None: HF center crop, zero padding where
                  the crop is larger than the resized image [None]
      resample    "bicubic" | "bilinear" | "lanczos" | "box" | "hamming" ["bicubic"]
      rescale     float | None: pixel scale (HF rescale_factor; None when
                  do_rescale is false) [1/255]
      mean, std   3 floats | None: per-channel normalization (None when
                  do_normalize is false) [None]
      convert_rgb bool: composite transparency over white as HF's
                  convert_to_rgb (False: Pillow's plain convert, alpha dropped) [True]
      tiling      None, or the family's own layout, resize included [None]:
                  {"method": "idefics3", "longest_edge": int | None (None:
                  no first resize), "tile_size": int, "do_image_splitting": bool}
                  or {"method": "qwen2_vl_patches", "patch_size",
                  "temporal_patch_size", "merge_size", "min_pixels",
                  "max_pixels": int} or {"method": "anyres", "tile_size": int,
                  "grid_pinpoints": [[height, width], ...] multiples of
                  tile_size} or {"method": "internvl", "tile_size": int,
                  "min_patches", "max_patches": int, "crop_to_patches": bool,
                  "use_thumbnail": true} or {"method": "pan_and_scan", "size":
                  [height, width], "min_crop_size": int, "max_num_crops": int
                  (0: no crops), "min_ratio": float}; `resize`, `size` and
                  `crop` are then unused
      processor   str: the HF class it came from, for the record only [None]

    __call__'s array is reused by the next call with the same output shape
    (no allocation per frame): copy it to keep it. One instance per thread.
    """

    def __init__(self, config: dict):
        self.config = _check_config(config)
        c = self.config
        self._filter = resample_id(c["resample"])
        self._scale = 1.0 if c["rescale"] is None else float(c["rescale"])
        self._mean = (0.0, 0.0, 0.0) if c["mean"] is None else tuple(map(float, c["mean"]))
        self._std = (1.0, 1.0, 1.0) if c["std"] is None else tuple(map(float, c["std"]))
        self._u8: np.ndarray | None = None    # (H, W, 3) zero-padded crop (crop > image only)
        self._out: np.ndarray | None = None   # (1, 3, H, W) pixel_values

    @classmethod
    def from_hf_processor_config(cls, hf: dict) -> "ImagePreprocessor":
        """From an HF preprocessor_config.json dict, or a processor_config.json
        holding one under "image_processor" (CLIPImageProcessor style)."""
        return cls(config_from_hf(hf))

    def resized_size(self, h: int, w: int) -> tuple[int, int]:
        """(height, width) after the resize step, for an h x w image."""
        c = self.config
        if c["resize"] == "shortest_edge":
            return shortest_edge_size(h, w, c["size"], c["max_size"])
        if c["resize"] == "exact":
            return tuple(c["size"])
        return h, w

    def seen_region(self, h: int, w: int) -> tuple[float, float, float, float]:
        """(x0, y0, width, height): the part of an h x w image (its pixels) that
        the model sees after the resize and center crop (the whole image for
        a tiling config). It extends past the image where the crop pads."""
        if self.config["tiling"] is not None:
            return 0.0, 0.0, float(w), float(h)
        oh, ow = self.resized_size(h, w)
        crop_h, crop_w = self.config["crop"] or (oh, ow)
        top, left = crop_offsets(oh, ow, crop_h, crop_w)
        sx, sy = ow / w, oh / h
        return left / sx, top / sy, crop_w / sx, crop_h / sy

    def __call__(self, image, layout: str = "RGB") -> np.ndarray:
        """Image -> float32 (1, 3, H, W) pixel_values (RGB, CHW)."""
        if self.config["tiling"] is not None:  # the pixels alone would lose the grid
            raise UserInputError("ImagePreprocessor: this config tiles images "
                                 f"({self.config['tiling']['method']})",
                                 hint="call .preprocess(image) for pixel_values and the grid")
        rgb = load_image(image, layout, composite_alpha=self.config["convert_rgb"])  # (h, w, 3)
        oh, ow = self.resized_size(*rgb.shape[:2])
        crop_h, crop_w = self.config["crop"] or (oh, ow)
        out = self._buffer("_out", (1, 3, crop_h, crop_w), np.float32)
        region, _ = _crop_overlap(oh, ow, crop_h, crop_w)
        if region[2:] == (crop_h, crop_w):  # the usual case: resize, crop, normalize in one pass
            resize_normalize(rgb, oh, ow, region, self._filter, self._scale, self._mean,
                             self._std, out=out[0])
        else:  # the crop is larger than the image: zero padding, as HF, then normalize
            u8 = self._padded_crop(rgb, oh, ow, crop_h, crop_w)                 # (H, W, 3)
            normalize_to_chw(u8, self._scale, self._mean, self._std, out=out[0])
        return out

    def preprocess(self, image, layout: str = "RGB", tiling: dict | None = None
                   ) -> tuple[np.ndarray, tuple | None]:
        """Image -> (pixel_values float32, image_grid), by the config's tiling
        (or `tiling`, a budgeted variant of it: see image_budget.py):

          None              (1, 3, H, W) (what __call__ returns, buffer reused); grid None
          idefics3          (N, 3, S, S) tiles: rows x cols row-major, then the
                            whole image; grid (rows, cols), (0, 0) when not split
          qwen2_vl_patches  (gh * gw, 3 * T * P * P) flattened patches;
                            grid (1, gh, gw) in patches (image_grid_thw)
          anyres            (N, 3, S, S) tiles: the whole image, then rows x
                            cols row-major; grid (h, w, bh, bw): the original
                            size and the pinpoint it was tiled at (anyres.py)
          internvl          (N, 3, S, S) tiles: rows x cols row-major, then the
                            whole image (thumbnail) when rows * cols > 1;
                            grid (rows, cols), (1, 1) for one tile
          pan_and_scan      (1 + n, 3, H, W): the whole image, then its n
                            crops (Gemma 3); grid n, 0 when not cropped

        Equal to the HF image processor's pixel_values for one image (Idefics3's
        without its padding) and its rows/cols or image_grid_thw."""
        if tiling is not None:
            tiling = _check_tiling(tiling)
        tiling = tiling or self.config["tiling"]
        if tiling is None:
            return self(image, layout), None
        rgb = load_image(image, layout, composite_alpha=self.config["convert_rgb"])  # (h, w, 3)
        if tiling["method"] == "idefics3":
            return self._idefics3(rgb, tiling)
        if tiling["method"] == "anyres" and tiling.get("square"):
            fill = tuple(int(m * 255) for m in self._mean)  # HF's background colour
            frames, grid = square_frame(rgb, tiling["tile_size"], fill, self._filter)
            return frames_to_pixel_values(frames, self._scale, self._mean, self._std)[0], grid
        if tiling["method"] == "anyres":
            frames, grid = anyres_frames(rgb, tiling["grid_pinpoints"], tiling["tile_size"],
                                         self._filter)
            return frames_to_pixel_values(frames, self._scale, self._mean, self._std)[0], grid
        if tiling["method"] == "internvl":
            return internvl_tiles(rgb, tiling, self._filter, self._scale, self._mean, self._std)
        if tiling["method"] == "pan_and_scan":
            return pan_and_scan_views(rgb, tiling, self._filter, self._scale, self._mean,
                                      self._std)
        return self._qwen2_vl(rgb, tiling)

    def _idefics3(self, rgb: np.ndarray, tiling: dict) -> tuple[np.ndarray, tuple[int, int]]:
        frames, rows, cols = idefics3_frames(rgb, tiling["longest_edge"], tiling["tile_size"],
                                             self._filter, tiling["do_image_splitting"])
        pixels = frames_to_pixel_values(frames, self._scale, self._mean, self._std)
        return pixels[0], (int(rows), int(cols))  # (N, 3, S, S): the one image's tiles

    def _qwen2_vl(self, rgb: np.ndarray, tiling: dict) -> tuple[np.ndarray, tuple[int, int, int]]:
        patches, grid = qwen2_vl_patches(
            rgb, self._scale, self._mean, self._std, patch_size=tiling["patch_size"],
            merge_size=tiling["merge_size"], temporal_patch_size=tiling["temporal_patch_size"],
            min_pixels=tiling["min_pixels"], max_pixels=tiling["max_pixels"],
            resample=self._filter)
        return patches, tuple(int(v) for v in grid[0])  # grid (1, 3) -> (t, h, w)

    def _padded_crop(self, rgb: np.ndarray, oh: int, ow: int, crop_h: int, crop_w: int
                     ) -> np.ndarray:
        """uint8 (crop_h, crop_w, 3): the (oh, ow) resize's part inside the
        centered crop window, zeros around it (HF pads before normalizing)."""
        u8 = self._buffer("_u8", (crop_h, crop_w, 3), np.uint8)
        (y0, x0, rh, rw), (dy, dx) = _crop_overlap(oh, ow, crop_h, crop_w)
        u8.fill(0)
        u8[dy:dy + rh, dx:dx + rw] = resize_region(rgb, oh, ow, (y0, x0, rh, rw), self._filter)
        return u8

    def _buffer(self, name: str, shape: tuple, dtype) -> np.ndarray:
        buf = getattr(self, name)
        if buf is None or buf.shape != shape:
            buf = np.empty(shape, dtype)
            setattr(self, name, buf)
        return buf


def _check_config(config: dict) -> dict:
    if not isinstance(config, dict):
        raise UserInputError("ImagePreprocessor: the config must be a dict",
                             got=type(config).__name__)
    unknown = set(config) - set(_DEFAULTS)
    if unknown:
        raise UserInputError("ImagePreprocessor: unknown config keys",
                             expected=f"a subset of {sorted(_DEFAULTS)}", got=sorted(unknown))
    c = {**_DEFAULTS, **config}
    if c["resize"] is None:
        c["resize"] = "none"
    if c["resize"] not in _RESIZE_RULES:
        raise UserInputError("ImagePreprocessor: bad resize rule",
                             expected=" | ".join(map(repr, _RESIZE_RULES)), got=repr(c["resize"]))
    if c["tiling"] is not None:
        c["tiling"] = _check_tiling(c["tiling"])
    if c["resize"] == "shortest_edge" and not _size_ok(c["size"]):
        raise UserInputError("ImagePreprocessor: shortest_edge needs an int size",
                             expected=f"1..{MAX_CONFIG_SIZE}", got=repr(c["size"]))
    if c["max_size"] is not None and not _size_ok(c["max_size"]):
        raise UserInputError("ImagePreprocessor: bad max_size", expected=f"1..{MAX_CONFIG_SIZE}",
                             got=repr(c["max_size"]))
    if c["resize"] == "exact":
        c["size"] = _pair(c["size"], "size")
    if c["crop"] is not None:
        c["crop"] = _pair(c["crop"], "crop")
    for key in ("mean", "std"):
        if c[key] is not None:
            if not isinstance(c[key], (list, tuple)) or len(c[key]) != 3 or not all(
                    _finite(v) for v in c[key]):
                raise UserInputError(f"ImagePreprocessor: {key} needs 3 values (RGB), finite numbers",
                                     got=repr(c[key])[:60])
            c[key] = [float(v) for v in c[key]]
    if c["rescale"] is not None and not _finite(c["rescale"]):
        raise UserInputError("ImagePreprocessor: rescale must be a finite number or None",
                             got=repr(c["rescale"])[:40])
    if not isinstance(c["convert_rgb"], bool):
        raise UserInputError("ImagePreprocessor: convert_rgb must be true or false",
                             got=repr(c["convert_rgb"])[:40])
    if c["std"] is not None and 0.0 in c["std"]:
        raise UserInputError("ImagePreprocessor: std must be non-zero", got=repr(c["std"]))
    resample_id(c["resample"])
    return c


# The keys each tiling method needs (export/families/*.py write them).
_TILING_KEYS = {
    "idefics3": ("longest_edge", "tile_size", "do_image_splitting"),
    "qwen2_vl_patches": ("patch_size", "temporal_patch_size", "merge_size", "min_pixels",
                         "max_pixels"),
    "anyres": ("tile_size", "grid_pinpoints"),
    "internvl": ("tile_size", "min_patches", "max_patches", "crop_to_patches", "use_thumbnail"),
    "pan_and_scan": ("size", "min_crop_size", "max_num_crops", "min_ratio"),
}
MAX_PINPOINTS = 256  # LLaVA-OneVision has 36
# InternVL's tile count: the grids it weighs grow as max_patches^2 (InternVL3 uses 12).
MAX_INTERNVL_PATCHES = 256
# Gemma 3's pan-and-scan crops per image (its processor's default is 4); each
# crop is one more full image of tokens.
MAX_PAN_AND_SCAN_CROPS = 64


# anyres "square": the image padded to a square of the mean colour and resized to
# one tile (LLaVA-OneVision's path for an image that shares a prompt with others).
_TILING_OPTIONAL = {"idefics3": ("global_image",), "anyres": ("square",)}


def _check_tiling(tiling) -> dict:
    method = tiling.get("method") if isinstance(tiling, dict) else None
    if not isinstance(method, str) or method not in _TILING_KEYS:
        raise UserInputError("ImagePreprocessor: unknown tiling method",
                             expected=" | ".join(map(repr, _TILING_KEYS)) + " or tiling None",
                             got=repr(method if isinstance(tiling, dict) else tiling),
                             hint="upgrade vlmedge or re-export the artifact")
    unknown = set(tiling) - {"method", *_TILING_KEYS[method], *_TILING_OPTIONAL.get(method, ())}
    if unknown:
        raise UserInputError(f"ImagePreprocessor: unknown {method} tiling keys",
                             expected=f"keys {list(_TILING_KEYS[method])}", got=sorted(unknown))
    if method == "idefics3" and tiling.get("global_image", True) is not True:
        raise UserInputError("ImagePreprocessor: idefics3 tiling always appends the global image",
                             expected="global_image true", got=repr(tiling["global_image"]))
    missing = [k for k in _TILING_KEYS[method] if k not in tiling]
    if missing:
        raise UserInputError(f"ImagePreprocessor: {method} tiling lacks {missing}",
                             expected=f"keys {list(_TILING_KEYS[method])}",
                             got=repr(sorted(tiling)))
    if method == "anyres":
        return _check_anyres(tiling)
    if method == "internvl":
        return _check_internvl(tiling)
    if method == "pan_and_scan":
        return _check_pan_and_scan(tiling)
    for key in _TILING_KEYS[method]:
        v = tiling[key]
        hi = MAX_CONFIG_PIXELS if key.endswith("_pixels") else MAX_CONFIG_SIZE
        ok = isinstance(v, bool) if key == "do_image_splitting" else \
            (v is None and key == "longest_edge") or _size_ok(v, hi)
        if not ok:
            raise UserInputError(f"ImagePreprocessor: bad tiling {key}",
                                 expected="a bool" if key == "do_image_splitting"
                                 else f"an int in 1..{hi}", got=repr(v)[:40])
    if method == "qwen2_vl_patches" and tiling["min_pixels"] > tiling["max_pixels"]:
        raise UserInputError("ImagePreprocessor: qwen2_vl tiling min_pixels > max_pixels",
                             got=f"{tiling['min_pixels']} > {tiling['max_pixels']}")
    return dict(tiling)


def _check_anyres(tiling: dict) -> dict:
    """tile_size an int; grid_pinpoints 1..MAX_PINPOINTS [height, width]
    pairs, each side a multiple of tile_size within MAX_CONFIG_SIZE."""
    tile, pins = tiling["tile_size"], tiling["grid_pinpoints"]
    if not isinstance(tiling.get("square", False), bool):
        raise UserInputError("ImagePreprocessor: anyres tiling square must be true or false",
                             got=repr(tiling["square"])[:40])
    if not _size_ok(tile):
        raise UserInputError("ImagePreprocessor: bad tiling tile_size",
                             expected=f"an int in 1..{MAX_CONFIG_SIZE}", got=repr(tile)[:40])
    ok = isinstance(pins, (list, tuple)) and 1 <= len(pins) <= MAX_PINPOINTS and all(
        isinstance(p, (list, tuple)) and len(p) == 2 and all(_size_ok(v) and v % tile == 0
                                                             for v in p) for p in pins)
    if not ok:
        raise UserInputError("ImagePreprocessor: bad anyres grid_pinpoints",
                             expected=f"1..{MAX_PINPOINTS} [height, width] pairs, multiples of "
                                      f"tile_size {tile}", got=repr(pins)[:60])
    return {**tiling, "grid_pinpoints": [[int(h), int(w)] for h, w in pins]}


def _check_internvl(tiling: dict) -> dict:
    """tile_size an int; min/max_patches ints in 1..MAX_INTERNVL_PATCHES (min
    may exceed max: the processor then tiles 1 x 1, and so does the runtime);
    crop_to_patches a bool; use_thumbnail true (GotOcr2's processor always
    appends the thumbnail to a split image)."""
    for key, hi in (("tile_size", MAX_CONFIG_SIZE), ("min_patches", MAX_INTERNVL_PATCHES),
                    ("max_patches", MAX_INTERNVL_PATCHES)):
        if not _size_ok(tiling[key], hi):
            raise UserInputError(f"ImagePreprocessor: bad internvl tiling {key}",
                                 expected=f"an int in 1..{hi}", got=repr(tiling[key])[:40])
    if not isinstance(tiling["crop_to_patches"], bool):
        raise UserInputError("ImagePreprocessor: bad internvl tiling crop_to_patches",
                             expected="a bool", got=repr(tiling["crop_to_patches"])[:40])
    if tiling["use_thumbnail"] is not True:
        raise UserInputError("ImagePreprocessor: internvl tiling always appends the thumbnail",
                             expected="use_thumbnail true", got=repr(tiling["use_thumbnail"]))
    return dict(tiling)


def _check_pan_and_scan(tiling: dict) -> dict:
    """size [height, width]; min_crop_size an int; max_num_crops an int in
    0..MAX_PAN_AND_SCAN_CROPS (0: the image is never cropped, the budget's
    way to turn crops off); min_ratio a finite number >= 1 (an aspect ratio)."""
    if not _size_ok(tiling["min_crop_size"]):
        raise UserInputError("ImagePreprocessor: bad pan_and_scan tiling min_crop_size",
                             expected=f"an int in 1..{MAX_CONFIG_SIZE}",
                             got=repr(tiling["min_crop_size"])[:40])
    n = tiling["max_num_crops"]
    if not (isinstance(n, int) and not isinstance(n, bool) and 0 <= n <= MAX_PAN_AND_SCAN_CROPS):
        raise UserInputError("ImagePreprocessor: bad pan_and_scan tiling max_num_crops",
                             expected=f"an int in 0..{MAX_PAN_AND_SCAN_CROPS}", got=repr(n)[:40])
    if not _finite(tiling["min_ratio"]) or tiling["min_ratio"] < 1:
        raise UserInputError("ImagePreprocessor: bad pan_and_scan tiling min_ratio",
                             expected="a number >= 1 (an aspect ratio)",
                             got=repr(tiling["min_ratio"])[:40])
    return {**tiling, "size": _pair(tiling["size"], "pan_and_scan size"),
            "min_ratio": float(tiling["min_ratio"])}


def _size_ok(v, hi: int = MAX_CONFIG_SIZE) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= hi


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _pair(v, name: str) -> list[int]:
    if isinstance(v, int) and not isinstance(v, bool):
        v = [v, v]
    if not isinstance(v, (list, tuple)) or len(v) != 2 or not all(_size_ok(x) for x in v):
        raise UserInputError(f"ImagePreprocessor: bad {name}",
                             expected=f"[height, width] in 1..{MAX_CONFIG_SIZE}",
                             got=repr(v)[:60])
    return [int(v[0]), int(v[1])]


def config_from_hf(hf: dict) -> dict:
    """HF image processor config (CLIPImageProcessor style) -> ImagePreprocessor
    config. Accepts preprocessor_config.json or processor_config.json (its
    "image_processor" entry). Refuses settings this pipeline does not do
    (padding, image splitting, ...) rather than silently ignoring them."""
    hf = hf.get("image_processor", hf)
    for key in ("do_pad", "do_image_splitting", "image_grid_pinpoints"):
        if hf.get(key):
            raise UserInputError(f"config_from_hf: {key} is not supported by ImagePreprocessor",
                                 got=f"{key}={hf[key]!r}",
                                 hint="use the model family's own preprocessing")
    cfg: dict = {"resample": _RESAMPLE_NAMES.get(hf.get("resample", 3), hf.get("resample")),
                 "processor": hf.get("image_processor_type")}
    cfg.update(_hf_resize(hf))
    crop = hf.get("crop_size")
    if hf.get("do_center_crop", crop is not None) and crop is not None:
        cfg["crop"] = [crop, crop] if isinstance(crop, int) else [crop["height"], crop["width"]]
    cfg["rescale"] = float(hf.get("rescale_factor", 1 / 255)) if hf.get("do_rescale", True) \
        else None
    if hf.get("do_normalize", True) and hf.get("image_mean") is not None:
        cfg["mean"], cfg["std"] = _per_channel(hf["image_mean"]), _per_channel(hf["image_std"])
    cfg["convert_rgb"] = bool(hf.get("do_convert_rgb", True))
    return cfg


def _hf_resize(hf: dict) -> dict:
    if not hf.get("do_resize", True):
        return {"resize": "none"}
    size = hf.get("size")
    if isinstance(size, int):  # old configs; HF reads an int as the shortest edge here
        return {"resize": "shortest_edge", "size": size}
    if isinstance(size, dict) and "shortest_edge" in size:
        return {"resize": "shortest_edge", "size": int(size["shortest_edge"]),
                "max_size": size.get("longest_edge")}
    if isinstance(size, dict) and {"height", "width"} <= set(size):
        return {"resize": "exact", "size": [int(size["height"]), int(size["width"])]}
    raise UserInputError("config_from_hf: unsupported size",
                         expected='{"shortest_edge": N[, "longest_edge": M]}, '
                                  '{"height": H, "width": W} or an int',
                         got=repr(size))


def _per_channel(v) -> list[float]:
    return [float(v)] * 3 if isinstance(v, (int, float)) else [float(x) for x in v]



# --- model families with their own image layout ---------------------------------
# Pure functions: HWC RGB uint8 in, float32 out, equal to the HF image processors
# (Pillow backend) of Idefics3 / SmolVLM and Qwen2-VL.

IDEFICS3_MAX_SIDE = 4096  # transformers' MAX_IMAGE_SIZE for Idefics3


def idefics3_resized_size(h: int, w: int, longest_edge: int) -> tuple[int, int]:
    """Idefics3's first resize: the long side to `longest_edge` (up or down),
    the other by aspect ratio rounded up to even, then capped at 4096."""
    aspect = w / h
    if w >= h:
        w, h = longest_edge, int(longest_edge / aspect)
        h += h % 2
    else:
        h, w = longest_edge, int(longest_edge * aspect)
        w += w % 2
    h, w = max(h, 1), max(w, 1)
    aspect = w / h
    if w >= h and w > IDEFICS3_MAX_SIDE:
        w, h = IDEFICS3_MAX_SIDE, int(IDEFICS3_MAX_SIDE / aspect)
    elif h > w and h > IDEFICS3_MAX_SIDE:
        h, w = IDEFICS3_MAX_SIDE, int(IDEFICS3_MAX_SIDE * aspect)
    return max(h, 1), max(w, 1)


def idefics3_encoder_size(h: int, w: int, tile: int) -> tuple[int, int]:
    """Idefics3's second resize: both sides up to multiples of `tile`."""
    aspect = w / h
    if w >= h:
        w = math.ceil(w / tile) * tile
        h = math.ceil(int(w / aspect) / tile) * tile
    else:
        h = math.ceil(h / tile) * tile
        w = math.ceil(int(h * aspect) / tile) * tile
    return h, w


def idefics3_frames(rgb: np.ndarray, longest_edge: int | None = 4 * 364, tile: int = 364,
                    resample="lanczos", splitting: bool = True):
    """uint8 (H, W, 3) RGB -> (frames uint8 (N, tile, tile, 3), rows, cols), as
    transformers' Idefics3ImageProcessor: resize the long side to longest_edge
    (None: not at all, HF's do_resize=False), then (splitting) to multiples of
    `tile`, cut rows x cols tiles row-major and append the whole image resized
    to tile x tile as the last frame;
    without splitting, one frame: the image resized to tile x tile. Each resize
    starts from the previous one's pixels, as HF's does."""
    img = rgb if longest_edge is None else \
        resize(rgb, *idefics3_resized_size(*rgb.shape[:2], longest_edge), resample)
    if not splitting:
        return resize(img, tile, tile, resample)[None], 0, 0
    img = resize(img, *idefics3_encoder_size(*img.shape[:2], tile), resample)
    h, w = img.shape[:2]
    if h <= tile and w <= tile:
        return img[None], 0, 0
    rows, cols = (h - tile) // tile + 1, (w - tile) // tile + 1
    frames = np.empty((rows * cols + 1, tile, tile, 3), np.uint8)
    for i in range(rows * cols):
        r, c = divmod(i, cols)
        frames[i] = img[r * tile:(r + 1) * tile, c * tile:(c + 1) * tile]
    resize(img, tile, tile, resample, out=frames[-1])  # the global view
    return frames, rows, cols


def frames_to_pixel_values(frames: np.ndarray, scale: float, mean, std) -> np.ndarray:
    """uint8 (N, H, W, 3) frames -> float32 (1, N, 3, H, W) pixel_values."""
    out = np.empty((1, frames.shape[0], 3) + frames.shape[1:3], np.float32)
    for i, frame in enumerate(frames):
        normalize_to_chw(frame, scale, mean, std, out=out[0, i])
    return out


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 28 * 28 * 1280) -> tuple[int, int]:
    """Qwen2-VL's output size: both sides multiples of `factor`, the area within
    [min_pixels, max_pixels], the aspect ratio kept as well as it can be
    (transformers' qwen2_vl smart_resize; Python's round() included)."""
    if max(height, width) / min(height, width) > 200:
        ratio = max(height, width) / min(height, width)
        raise UserInputError("smart_resize: image too elongated for Qwen2-VL",
                             expected="aspect ratio <= 200", got=f"{height}x{width} ({ratio:.0f})")
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def qwen2_vl_patches(rgb: np.ndarray, scale: float, mean, std, *, patch_size: int = 14,
                     merge_size: int = 2, temporal_patch_size: int = 2,
                     min_pixels: int = 56 * 56, max_pixels: int = 28 * 28 * 1280,
                     resample="bicubic") -> tuple[np.ndarray, np.ndarray]:
    """uint8 (H, W, 3) RGB -> (pixel_values float32 (gh * gw, 3 * T * P * P),
    image_grid_thw int64 (1, 3) = [[1, gh, gw]]), as transformers'
    Qwen2VLImageProcessor: smart_resize, rescale + normalize, then patches in
    merge-window order, each repeated T times along time (a still image)."""
    h, w = smart_resize(*rgb.shape[:2], patch_size * merge_size, min_pixels, max_pixels)
    chw = normalize_to_chw(resize(rgb, h, w, resample), scale, mean, std)   # (3, h, w)
    gh, gw, m, p = h // patch_size, w // patch_size, merge_size, patch_size
    x = chw.reshape(3, gh // m, m, p, gw // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)
    # (gh/m, gw/m, m, m, C, P, P) -> add time, repeat T: (..., C, T, P, P)
    x = np.broadcast_to(x[:, :, :, :, :, None], x.shape[:5] + (temporal_patch_size, p, p))
    flat = np.ascontiguousarray(x).reshape(gh * gw, 3 * temporal_patch_size * p * p)
    return flat, np.array([[1, gh, gw]], np.int64)


def anyres_frames(rgb: np.ndarray, pinpoints, tile: int, resample="bicubic"
                  ) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """uint8 (H, W, 3) RGB -> (frames uint8 (N, tile, tile, 3), grid (H, W, bh, bw)),
    as transformers' LlavaNext / LlavaOnevision image processors: the whole
    image resized to tile x tile first, then the image resized into the best
    pinpoint (bh, bw) keeping its aspect ratio, zero-padded centred, cut into
    (bh / tile) x (bw / tile) tiles row-major. Both resizes start from the
    original pixels, as HF's do."""
    h, w = rgb.shape[:2]
    bh, bw = anyres.select_best_resolution(h, w, pinpoints)
    nh, nw = anyres.fitted_size(h, w, bh, bw)
    rows, cols = bh // tile, bw // tile
    frames = np.empty((rows * cols + 1, tile, tile, 3), np.uint8)
    resize(rgb, tile, tile, resample, out=frames[0])  # the base (whole-image) tile
    canvas = np.zeros((bh, bw, 3), np.uint8)
    top, left = (bh - nh) // 2, (bw - nw) // 2  # the padding's odd pixel goes bottom/right
    canvas[top:top + nh, left:left + nw] = resize(rgb, nh, nw, resample)
    tiles = canvas.reshape(rows, tile, cols, tile, 3).transpose(0, 2, 1, 3, 4)
    frames[1:] = tiles.reshape(rows * cols, tile, tile, 3)
    return frames, (int(h), int(w), int(bh), int(bw))


def square_frame(rgb: np.ndarray, tile: int, fill: tuple[int, int, int], resample="bicubic"
                 ) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """uint8 (H, W, 3) -> (frames uint8 (1, tile, tile, 3), grid (H, W, 0, 0)): the
    image centred on a square of `fill` (the odd pixel after it), resized to one
    tile, as LlavaOnevisionImageProcessor's pad_to_square + resize for an image
    that shares a prompt with others."""
    h, w = rgb.shape[:2]
    side = max(h, w)
    canvas = np.empty((side, side, 3), np.uint8)
    canvas[:] = np.asarray(fill, np.uint8)
    top, left = (side - h) // 2, (side - w) // 2
    canvas[top:top + h, left:left + w] = rgb
    frames = np.empty((1, tile, tile, 3), np.uint8)
    resize(canvas, tile, tile, resample, out=frames[0])
    return frames, (int(h), int(w), 0, 0)


def internvl_grid(h: int, w: int, tiling: dict) -> tuple[int, int]:
    """(rows, cols) of tiles InternVL's image processor (transformers'
    GotOcr2ImageProcessor, crop_to_patches) cuts an h x w image into: of the
    grids of min_patches..max_patches tiles, the one whose aspect ratio (cols
    / rows) is closest to w / h; on a tie the later (larger) grid wins while
    the image's area exceeds half of the grid's. (1, 1) without cropping.
    Same float arithmetic and order as get_optimal_tiled_canvas."""
    lo, hi = tiling["min_patches"], tiling["max_patches"]
    if not tiling["crop_to_patches"] or hi <= 1:
        return 1, 1
    grids = sorted(((c, r) for c in range(1, hi + 1) for r in range(1, hi + 1)
                    if lo <= c * r <= hi), key=lambda g: g[0] * g[1])  # stable, as HF's
    aspect, area, tile = w / h, w * h, tiling["tile_size"]
    best_diff, best = float("inf"), (1, 1)
    for cols, rows in grids:
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best_diff, best = diff, (cols, rows)
        elif diff == best_diff and area > 0.5 * tile * tile * cols * rows:
            best = (cols, rows)
    return best[1], best[0]


def internvl_tile_count(grid: tuple[int, int]) -> int:
    """Tiles of a (rows, cols) grid: the grid's, plus the thumbnail when split."""
    n = int(grid[0]) * int(grid[1])
    return n + 1 if n > 1 else n


def internvl_tiles(rgb: np.ndarray, tiling: dict, resample, scale: float, mean, std
                   ) -> tuple[np.ndarray, tuple[int, int]]:
    """uint8 (H, W, 3) RGB -> (pixel_values float32 (N, 3, S, S), grid (rows,
    cols)), as transformers' GotOcr2ImageProcessor (InternVL): the image
    resized to (rows * S, cols * S), cut into rows x cols tiles row-major,
    then the whole image resized to S x S appended when rows * cols > 1. Both
    resizes start from the original pixels, as HF's do; each tile is computed
    as its region of the big resize and normalized in the same pass."""
    s = tiling["tile_size"]
    rows, cols = internvl_grid(*rgb.shape[:2], tiling)
    out = np.empty((internvl_tile_count((rows, cols)), 3, s, s), np.float32)
    for i in range(rows * cols):
        r, c = divmod(i, cols)
        resize_normalize(rgb, rows * s, cols * s, (r * s, c * s, s, s), resample, scale, mean,
                         std, out=out[i])
    if rows * cols > 1:  # the thumbnail
        resize_normalize(rgb, s, s, (0, 0, s, s), resample, scale, mean, std, out=out[-1])
    return out, (int(rows), int(cols))


def pan_and_scan_crops(h: int, w: int, tiling: dict) -> list[tuple[int, int, int, int]]:
    """The crops (y0, x0, height, width) Gemma 3's pan-and-scan cuts from an
    h x w image, row-major; [] when the image is not elongated enough (aspect
    ratio below min_ratio) or its crops would be smaller than min_crop_size.
    As transformers' Gemma3ImageProcessor.pan_and_scan: 2..max_num_crops crops
    along the long side, about one per aspect-ratio unit, each ceil(side / n)
    long, the last one cut short by the image's edge."""
    n_max, least, ratio = tiling["max_num_crops"], tiling["min_crop_size"], tiling["min_ratio"]
    if n_max < 1:  # the budget's "no crops" (the processor has no such setting)
        return []
    if w >= h:
        if w / h < ratio:
            return []
        cols = min(int(math.floor(w / least)), int(math.floor(w / h + 0.5)))
        rows, cols = 1, min(n_max, max(2, cols))
    else:
        if h / w < ratio:
            return []
        rows = min(int(math.floor(h / least)), int(math.floor(h / w + 0.5)))
        rows, cols = min(n_max, max(2, rows)), 1
    ch, cw = int(math.ceil(h / rows)), int(math.ceil(w / cols))
    if min(ch, cw) < least:
        return []
    crops = [(r * ch, c * cw, min(ch, h - r * ch), min(cw, w - c * cw))
             for r in range(rows) for c in range(cols)]
    # With min_crop_size 1 a short side can run out before the last crop (h 5 in
    # 4 rows of 2); the processor would fail on that empty crop, we drop it.
    return [c for c in crops if c[2] > 0 and c[3] > 0]


def pan_and_scan_views(rgb: np.ndarray, tiling: dict, resample, scale: float, mean, std
                       ) -> tuple[np.ndarray, int]:
    """uint8 (H, W, 3) RGB -> (pixel_values float32 (1 + n, 3, S_h, S_w), n):
    the whole image resized to `size`, then each of its n pan-and-scan crops
    (pan_and_scan_crops) resized to `size`, as Gemma3ImageProcessor with
    do_pan_and_scan. Each crop is a slice of the original pixels (copied only
    when its rows are not contiguous: a landscape image's columns); resize
    and normalize run in one C pass per view."""
    sh, sw = tiling["size"]
    h, w = rgb.shape[:2]
    crops = pan_and_scan_crops(h, w, tiling)
    out = np.empty((1 + len(crops), 3, sh, sw), np.float32)
    resize_normalize(rgb, sh, sw, (0, 0, sh, sw), resample, scale, mean, std, out=out[0])
    for i, (y0, x0, ch, cw) in enumerate(crops, 1):
        resize_normalize(rgb[y0:y0 + ch, x0:x0 + cw], sh, sw, (0, 0, sh, sw), resample, scale,
                         mean, std, out=out[i])
    return out, len(crops)
