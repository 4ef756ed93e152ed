"""Image preprocessing for the runtime: the C extension, with the numpy
reference as a fallback when the extension is not built."""
from __future__ import annotations

import numpy as np

from . import preprocess_ref

try:
    from . import _cpreprocess
except ImportError:  # source tree without a built extension
    _cpreprocess = None


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
