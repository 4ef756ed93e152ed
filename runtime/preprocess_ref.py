"""numpy reference implementations of the C preprocessing functions.

Each function here computes exactly what its namesake in _cpreprocess.c does;
tests compare them over many inputs. They are also the fallback when the C
extension is not built (for example, a source checkout without a compiler).
"""
from __future__ import annotations

import numpy as np


def normalize_to_chw(hwc: np.ndarray, scale: float, mean, std) -> np.ndarray:
    """uint8 (H, W, 3|4) RGB[A] -> float32 (3, H, W): (v * scale - mean[c]) / std[c].

    Arithmetic is float32 throughout, matching the C code bit for bit."""
    x = hwc[..., :3].astype(np.float32) * np.float32(scale)
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))
