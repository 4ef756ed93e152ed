"""Answers questions with an exported artifact through the vlmedge runtime
(no torch): the counterpart of torch_answerer for vlm-eval."""
from __future__ import annotations

from pathlib import Path


class RuntimeAnswerer:
    def __init__(self, artifact_dir: Path, max_new_tokens: int = 24, threads: int | None = None,
                 provider: str = "cpu", decoder_flavour: str | None = None):
        from vlmedge.runtime import VLMSession

        self.session = VLMSession(artifact_dir, provider=provider, threads=threads,
                                  decoder_flavour=decoder_flavour)
        self.max_new_tokens = max_new_tokens
        from .bench.systems import system_name
        # named as vlm-bench names systems (ort-int4-b128-vint8, onnx-fp32, ...)
        self.system_name = system_name(self.session.manifest, self.session.decoder_flavour)

    def __call__(self, image, question: str) -> str:
        return self.session.generate(image, question, max_new_tokens=self.max_new_tokens).text
