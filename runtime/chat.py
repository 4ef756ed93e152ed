"""Tokenizer and chat template for the runtime (tokenizers + jinja2, no
transformers).

The chat template is the model's own (copied into the manifest at export)
and is rendered the way transformers renders it: a sandboxed jinja2
environment with trim_blocks and lstrip_blocks. The rendered prompt holds one
image placeholder, which `prompt_ids` expands into the image's token count.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from vlmedge.errors import ArtifactError


def _raise(message: str):
    raise ArtifactError(f"chat template error: {message}")


class ChatTokenizer:
    def __init__(self, directory: Path, facts: dict[str, Any], image: dict[str, Any]):
        from jinja2.sandbox import ImmutableSandboxedEnvironment
        from tokenizers import Tokenizer

        path = directory / facts["file"]
        try:
            self.tokenizer = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for bad files
            raise ArtifactError(f"cannot read tokenizer {path.name}: {e}",
                                hint="re-export the artifact") from None
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        self.template = env.from_string(facts["chat_template"])
        self.special = {k: facts.get(k) for k in ("bos_token", "eos_token", "pad_token")}
        self.add_special_tokens = bool(facts.get("add_special_tokens", False))
        self.stop_token_ids = [int(t) for t in facts["stop_token_ids"]]
        self.image_token_id = int(image["image_token_id"])
        self.tokens_per_image = int(image["tokens_per_image"])

    def render(self, question: str, with_image: bool = True) -> str:
        content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": question}]
        return self.template.render(messages=[{"role": "user", "content": content}],
                                    add_generation_prompt=True, **self.special)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=self.add_special_tokens).ids

    def prompt_ids(self, question: str, with_image: bool = True) -> list[int]:
        """Token ids of the rendered prompt, the image placeholder expanded
        to `tokens_per_image` image tokens (as the HF processor does)."""
        ids = self.encode(self.render(question, with_image))
        out: list[int] = []
        for t in ids:
            out.extend([t] * self.tokens_per_image if t == self.image_token_id else [t])
        return out

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


class StreamDecoder:
    """Turns tokens into text pieces that are always complete UTF-8.

    Decodes everything generated so far and emits the new suffix; while the
    text ends in U+FFFD (a character whose bytes are split across tokens) it
    holds the piece back until the next token completes it."""

    def __init__(self, tokenizer: ChatTokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        piece, self.emitted = text[self.emitted:], len(text)
        return piece

    def flush(self) -> str:
        text = self.tokenizer.decode(self.ids)
        piece, self.emitted = text[self.emitted:], len(text)
        return piece
