"""Answers questions with an exported artifact through the vlmedge runtime
(no torch): the counterpart of torch_answerer for vlm-eval."""
from __future__ import annotations

from pathlib import Path


class RuntimeAnswerer:
    def __init__(self, artifact_dir: Path, max_new_tokens: int = 24, threads: int | None = None,
                 provider: str = "cpu"):
        from vlmedge.runtime import VLMSession

        self.session = VLMSession(artifact_dir, provider=provider, threads=threads)
        self.max_new_tokens = max_new_tokens
        m = self.session.manifest
        self.system_name = f"{m.target}-{m.precision}"

    def __call__(self, image, question: str) -> str:
        return self.session.generate(image, question, max_new_tokens=self.max_new_tokens).text
