"""The one seam for optional heavy imports (torch, transformers, onnx,
tensorrt, ...). Every module imports them through `require`, at the point of
use, so the lean runtime and every `--help` work without them, and a missing
one says exactly what to install."""
from __future__ import annotations

import importlib
from types import ModuleType

from .errors import MissingDependencyError

# module -> (pip extra that provides it, what to tell the user)
_EXTRAS = {
    "torch": ("export", "pip install torch==2.13.0 (CPU) or your platform's torch build"),
    "transformers": ("export", "pip install 'vlmedge[export]'"),
    "onnx": ("export", "pip install 'vlmedge[export]'"),
    "onnxscript": ("export", "pip install 'vlmedge[export]'"),
    "safetensors": ("export", "pip install 'vlmedge[export]'"),
    "tensorrt": ("trt", "install TensorRT for this device (JetPack ships it; on a desktop "
                 "pip install 'vlmedge[trt]' from NVIDIA's index)"),
    "onnxruntime": ("", "pip install onnxruntime (or onnxruntime-gpu)"),
    "cuda": ("trt", "pip install cuda-python (NVIDIA's CUDA bindings, used with TensorRT)"),
    "onnxruntime_genai": ("export", "pip install 'vlmedge[export]' (onnxruntime-genai: its model "
                          "builder makes the ort decoder flavour)"),
    "llguidance": ("structured", "pip install 'vlmedge[structured]' (llguidance)"),
    "llama_cpp": ("peers", "pip install 'vlmedge[peers]' (llama-cpp-python; on a CPU with AMX "
                  "see the README's Benchmarks section for its build flags)"),
    "gguf": ("peers", "pip install 'vlmedge[peers]' (gguf)"),
    "av": ("camera", "pip install 'vlmedge[camera]' (PyAV, for video files)"),
    "cv2": ("camera", "pip install opencv-python-headless (or your platform's OpenCV: "
            "JetPack's has GStreamer)"),
}


def require(module: str, purpose: str) -> ModuleType:
    """Import `module` or raise MissingDependencyError naming the install."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        top = module.split(".")[0]
        _, how = _EXTRAS.get(top, ("", f"pip install {top}"))
        raise MissingDependencyError(
            f"{purpose} needs {top}, which is not importable ({e.__class__.__name__}: {e})",
            hint=how) from None


def available(module: str) -> bool:
    """True if `module` can be imported (without importing it when avoidable)."""
    import importlib.util
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False
