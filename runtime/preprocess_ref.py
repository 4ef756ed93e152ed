"""numpy reference implementations of the C preprocessing functions.

Each function here computes exactly what its namesake in _cpreprocess.c does;
tests compare them over many inputs. They are also the fallback when the C
extension is not built (for example, a source checkout without a compiler).
"""
from __future__ import annotations

import math

import numpy as np


def normalize_to_chw(hwc: np.ndarray, scale: float, mean, std) -> np.ndarray:
    """uint8 (H, W, 3|4) RGB[A] -> float32 (3, H, W): (v * scale - mean[c]) / std[c].

    As HF computes it (and the C code, bit for bit): v * scale in float64
    rounded to float32 (transformers' rescale), then float32 subtraction and
    division (transformers' normalize)."""
    x = (hwc[..., :3].astype(np.float64) * float(scale)).astype(np.float32)
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


# --- resize: Pillow's Image.resize for 8-bit bands (see _cpreprocess.c) -----

PREC_BITS = 22  # Pillow's fixed-point weights: 32 - 8 - 2 fractional bits
FILTERS = {"lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}
_SUPPORT = {1: 3.0, 2: 1.0, 3: 2.0, 4: 0.5, 5: 1.0}


def _sinc(x: float) -> float:
    if x == 0.0:
        return 1.0
    x = x * math.pi
    return math.sin(x) / x


def _filter(f: int, x: np.ndarray) -> np.ndarray:
    """Pillow's kernels, term for term, in float64 (sin/cos through libm via
    math, as the C code, rather than numpy's own implementations)."""
    if f == 3:  # Keys cubic, a = -0.5
        ax = np.abs(x)
        near = (1.5 * ax - 2.5) * ax * ax + 1
        far = (((ax - 5) * ax + 8) * ax - 4) * -0.5
        return np.where(ax < 1.0, near, np.where(ax < 2.0, far, 0.0))
    if f == 2:
        ax = np.abs(x)
        return np.where(ax < 1.0, 1.0 - ax, 0.0)
    if f == 4:
        return np.where((x > -0.5) & (x <= 0.5), 1.0, 0.0)
    if f == 5:  # Pillow writes 0.54f and 0.46f: float32 constants
        c54, c46 = float(np.float32(0.54)), float(np.float32(0.46))

        def ham(v: float) -> float:
            v = abs(v)
            if v == 0.0:
                return 1.0
            if v >= 1.0:
                return 0.0
            v = v * math.pi
            return math.sin(v) / v * (c54 + c46 * math.cos(v))
        return np.array([ham(v) for v in x], np.float64)
    if f == 1:
        return np.array([_sinc(v) * _sinc(v / 3) if -3.0 <= v < 3.0 else 0.0 for v in x],
                        np.float64)
    raise ValueError(f"resize: filter must be 1..5 (Pillow's LANCZOS..HAMMING); got {f}")


def axis_coeffs(in_size: int, out_size: int, first: int, count: int, f: int):
    """Weights of output pixels [first, first+count) along one axis.

    Returns a list of (xmin, k) with k an int64 (n,) array of fixed-point
    weights (22 fractional bits) for source pixels xmin..xmin+n-1."""
    scale = float(np.float32(in_size)) / out_size  # Pillow keeps the box as floats
    filterscale = max(scale, 1.0)
    support = _SUPPORT[f] * filterscale
    inv_fs = 1.0 / filterscale
    out = []
    for xx in range(first, first + count):
        center = (xx + 0.5) * scale
        lo = max(int(center - support + 0.5), 0)   # int() truncates toward 0, as C
        hi = min(int(center + support + 0.5), in_size)
        w = _filter(f, (np.arange(lo, hi, dtype=np.float64) - center + 0.5) * inv_fs)
        ww = 0.0
        for v in w:  # sequential sum, as C (np.sum is pairwise)
            ww += v
        if ww != 0.0:
            w = w / ww
        scaled = w * float(1 << PREC_BITS)
        k = np.where(w < 0, np.trunc(-0.5 + scaled), np.trunc(0.5 + scaled))
        out.append((lo, k.astype(np.int64)))
    return out


def _clip8(ss: np.ndarray) -> np.ndarray:
    return np.clip(ss >> PREC_BITS, 0, 255).astype(np.uint8)


ORDER_PILLOW13, ORDER_HORIZONTAL_FIRST = 0, 1


def vertical_first(h: int, w: int, out_h: int, out_w: int, order: int = ORDER_PILLOW13) -> bool:
    """Pillow 13 runs the vertical pass first when the height shrinks by more
    than twice as many pixels as the width (python-pillow/Pillow#9549, measured
    against Pillow 13.0); Pillow <= 12 always goes horizontal first."""
    if order == ORDER_HORIZONTAL_FIRST:
        return False
    return out_h < h and (h - out_h) > 2 * (w - out_w)


def _hpass(rows: np.ndarray, coeffs) -> np.ndarray:
    """int64 (R, W, C) -> uint8 (R, len(coeffs), C) along the width."""
    half = 1 << (PREC_BITS - 1)
    out = np.empty((rows.shape[0], len(coeffs), rows.shape[2]), np.uint8)
    for i, (lo, k) in enumerate(coeffs):
        out[:, i, :] = _clip8((rows[:, lo:lo + len(k), :] * k[None, :, None]).sum(axis=1) + half)
    return out


def _vpass(cols: np.ndarray, coeffs, y_base: int) -> np.ndarray:
    """int64 (H, W, C), row 0 = source row y_base -> uint8 (len(coeffs), W, C)."""
    half = 1 << (PREC_BITS - 1)
    out = np.empty((len(coeffs), cols.shape[1], cols.shape[2]), np.uint8)
    for i, (lo, k) in enumerate(coeffs):
        rows = cols[lo - y_base:lo - y_base + len(k)]
        out[i] = _clip8((rows * k[:, None, None]).sum(axis=0) + half)
    return out


def resize_region(src: np.ndarray, out_h: int, out_w: int, f: int,
                  y0: int, x0: int, rh: int, rw: int, order: int = ORDER_PILLOW13) -> np.ndarray:
    """Rows [y0, y0+rh), columns [x0, x0+rw) of the (out_h, out_w) resize of
    uint8 (H, W, C) `src` -> uint8 (rh, rw, C). Pillow's two passes through an
    8-bit intermediate, in Pillow's order; a pass whose size does not change is
    skipped (a copy)."""
    h, w, _ = src.shape
    need_h, need_v = out_w != w, out_h != h
    cy = axis_coeffs(h, out_h, y0, rh, f) if need_v else None
    cx = axis_coeffs(w, out_w, x0, rw, f) if need_h else None
    if need_h and need_v and vertical_first(h, w, out_h, out_w, order):
        c0, c1 = cx[0][0], cx[-1][0] + len(cx[-1][1])
        tmp = _vpass(src[:, c0:c1].astype(np.int64), cy, 0)          # (rh, c1-c0, C)
        return _hpass(tmp.astype(np.int64), [(lo - c0, k) for lo, k in cx])
    y_first, y_last = (cy[0][0], cy[-1][0] + len(cy[-1][1])) if need_v else (y0, y0 + rh)
    if need_h:
        tmp = _hpass(src[y_first:y_last].astype(np.int64), cx)       # (rows, rw, C)
    else:
        tmp = src[y_first:y_last, x0:x0 + rw]
    if not need_v:
        return np.ascontiguousarray(tmp)
    return _vpass(tmp.astype(np.int64), cy, y_first)


def resize(src: np.ndarray, out_h: int, out_w: int, f: int,
           order: int = ORDER_PILLOW13) -> np.ndarray:
    """uint8 (H, W, C) -> uint8 (out_h, out_w, C), equal to Pillow's
    Image.resize((out_w, out_h), resample=f) per band (f: 1..5, Pillow's
    LANCZOS, BILINEAR, BICUBIC, BOX, HAMMING)."""
    return resize_region(src, out_h, out_w, f, 0, 0, out_h, out_w, order)


def resize_normalize(src: np.ndarray, out_h: int, out_w: int, f: int, y0: int, x0: int,
                     rh: int, rw: int, scale: float, mean, std,
                     order: int = ORDER_PILLOW13) -> np.ndarray:
    """uint8 (H, W, 3|4) -> float32 (3, rh, rw): resize_region then
    normalize_to_chw, the two steps that _cpreprocess.resize_normalize fuses
    into one pass."""
    u8 = resize_region(src, out_h, out_w, f, y0, x0, rh, rw, order)
    return normalize_to_chw(u8, scale, mean, std)
