"""The lean runtime: numpy + onnxruntime (TensorRT optional) + a C extension.

Never imports torch or transformers: a Jetson image often has neither.

    from vlmedge.runtime import VLMSession
"""
from __future__ import annotations

__all__ = ["VLMSession", "GenerationResult"]


def __getattr__(name):  # lazy: `import vlmedge.runtime` stays cheap for CLIs' --help
    if name in ("VLMSession", "GenerationResult"):
        from . import session
        return getattr(session, name)
    raise AttributeError(name)
