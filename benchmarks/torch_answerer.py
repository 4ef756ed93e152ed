"""Answers questions with the PyTorch model through transformers: the
reference every exported artifact is measured against."""
from __future__ import annotations

from pathlib import Path

from vlmedge.lazy import require


class TorchAnswerer:
    """Greedy `generate()` of a Hugging Face image-text-to-text model."""

    def __init__(self, model_dir: Path, max_new_tokens: int = 24, threads: int | None = None):
        torch = require("torch", "running the PyTorch model")
        transformers = require("transformers", "running the PyTorch model")
        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        # Never runs code from the model directory: no trust_remote_code.
        self.processor = transformers.AutoProcessor.from_pretrained(model_dir)
        self.model = transformers.AutoModelForImageTextToText.from_pretrained(
            model_dir, use_safetensors=True).eval()
        self.max_new_tokens = max_new_tokens

    def prompt(self, question: str) -> str:
        messages = [{"role": "user", "content": [{"type": "image"},
                                                 {"type": "text", "text": question}]}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True)

    def generate_ids(self, image, question: str) -> list[int]:
        inputs = self.processor(images=image, text=self.prompt(question), return_tensors="pt")
        with self.torch.inference_mode():
            out = self.model.generate(**inputs, do_sample=False,
                                      max_new_tokens=self.max_new_tokens)
        ids = out[0, inputs["input_ids"].shape[1]:].tolist()
        stops = set(self.model.generation_config.eos_token_id or [])
        if isinstance(self.model.generation_config.eos_token_id, int):
            stops = {self.model.generation_config.eos_token_id}
        # Drop the stop token and anything after it (padding in batched use).
        for i, t in enumerate(ids):
            if t in stops:
                return ids[:i]
        return ids

    def __call__(self, image, question: str) -> str:
        ids = self.generate_ids(image, question)
        return self.processor.tokenizer.decode(ids, skip_special_tokens=True)
