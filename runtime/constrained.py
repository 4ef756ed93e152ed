"""Constrained decoding: a mask on the logits at each step, so that an answer
is exactly one of a list of choices, or JSON that matches a schema.

    c = constraint_for(session.chat, vocab_size, choices=["yes", "no"])
    c = constraint_for(session.chat, vocab_size, json_schema={"type": "object", ...})

The decode loop (VLMSession._decode) asks, before each token:
    must_stop()   nothing may follow: the answer is whole
    allowed()     bool (V,): the tokens that keep the answer valid
    complete()    the answer so far is whole (a stop token is allowed too)
and calls advance(token) after it. A constraint is per call (it keeps the
answer's state), never shared.

Choices need nothing but the tokenizer: each choice, as the tokenizer
encodes it (with and without a leading space), is a path in a trie of token
ids, so any tokenizer works (the demo's word-level one included).
JSON schemas go through llguidance (the grammar engine onnxruntime-genai and
llama.cpp use), imported lazily; it needs a byte-level BPE or SentencePiece
tokenizer, and says so in one line otherwise.
"""
from __future__ import annotations

import json
from typing import Any, Sequence

import numpy as np

from vlmedge.errors import UserInputError
from vlmedge.lazy import require

MAX_CHOICES = 1024


class Constraint:
    """The interface the decode loop uses (see the module docstring)."""

    kind = "none"

    def must_stop(self) -> bool:
        raise NotImplementedError

    def allowed(self) -> np.ndarray:
        raise NotImplementedError

    def complete(self) -> bool:
        raise NotImplementedError

    def advance(self, token: int) -> None:
        raise NotImplementedError

    def value(self, text: str) -> Any:
        """The answer as the caller wants it (the choice, or the parsed JSON)."""
        return text


class Choices(Constraint):
    """The answer is exactly one of `choices` (after stripping whitespace).

    A trie over token ids: node = dict token -> child, with END marking a
    whole choice. Variants: each choice encoded alone and after a space, as
    byte-level BPE tokenizers encode a word differently at the start of a
    text and after a space."""

    kind = "choices"
    END = -1

    def __init__(self, chat, vocab_size: int, choices: Sequence[str]):
        self.choices = _check_choices(choices)
        self.vocab_size = vocab_size
        self.root: dict = {}
        for c in self.choices:
            paths = 0
            for text in (c, " " + c):
                ids = chat.encode(text)
                # Only encodings that decode back to the choice: a word-level
                # tokenizer writes an unknown word as <unk>, which is no answer.
                if not ids or not all(0 <= t < vocab_size for t in ids) \
                        or chat.decode(ids).strip() != c:
                    continue
                node = self.root
                for t in ids:
                    node = node.setdefault(t, {})
                node[self.END] = c
                paths += 1
            if not paths:
                raise UserInputError(f"the choice {c!r} cannot be written with this model's "
                                     f"tokenizer", expected="words the model knows",
                                     hint="check the spelling, or drop that choice")
        self.node = self.root
        self.chosen: str | None = None

    def must_stop(self) -> bool:
        return set(self.node) == {self.END}

    def allowed(self) -> np.ndarray:
        mask = np.zeros(self.vocab_size, bool)
        mask[[t for t in self.node if t != self.END]] = True
        return mask

    def complete(self) -> bool:
        return self.END in self.node

    def advance(self, token: int) -> None:
        self.node = self.node[token]
        self.chosen = self.node.get(self.END)

    def value(self, text: str) -> str | None:
        return self.chosen if self.complete() else None


class JsonSchema(Constraint):
    """The answer is JSON matching `schema`, through an llguidance matcher."""

    kind = "json_schema"

    def __init__(self, chat, vocab_size: int, schema: dict, stop_token_ids: Sequence[int]):
        lg = require("llguidance", "json_schema answers")
        if not isinstance(schema, dict):
            raise UserInputError("json_schema must be a JSON schema object (a dict)",
                                 got=type(schema).__name__)
        try:
            # Compact JSON by default (", " and ": " between items, no other
            # whitespace): a model must not spend its token budget on blank
            # runs. A schema's own "x-guidance" options take precedence.
            grammar = lg.LLMatcher.grammar_from_json_schema(
                json.dumps(schema), defaults={"whitespace_flexible": False,
                                              "item_separator": ", ", "key_separator": ": "})
        except (TypeError, ValueError) as e:
            raise UserInputError(f"bad json_schema: {str(e)[:160]}") from None
        self.tokenizer = _ll_tokenizer(chat, vocab_size, stop_token_ids)
        self.matcher = lg.LLMatcher(self.tokenizer, grammar, log_level=0)
        if self.matcher.is_error():
            raise UserInputError(f"json_schema is not supported: "
                                 f"{self.matcher.get_error()[:160]}")
        self.vocab_size = vocab_size
        self.stop_ids = np.asarray(list(stop_token_ids), np.int64)

    def must_stop(self) -> bool:
        return self.matcher.is_stopped()

    def allowed(self) -> np.ndarray:
        words = np.frombuffer(self.matcher.compute_bitmask(), np.uint32)
        bits = np.unpackbits(words.view(np.uint8), bitorder="little").astype(bool)
        mask = np.zeros(self.vocab_size, bool)
        n = min(self.vocab_size, bits.size)
        mask[:n] = bits[:n]
        mask[self.stop_ids[self.stop_ids < self.vocab_size]] = False  # complete() decides
        return mask

    def complete(self) -> bool:
        return self.matcher.is_accepting()

    def advance(self, token: int) -> None:
        if not self.matcher.consume_token(int(token)):  # the mask allowed it: a bug if not
            raise RuntimeError(f"llguidance refused token {token}: {self.matcher.get_error()}")

    def value(self, text: str) -> Any:
        return json.loads(text) if self.complete() else None


def _check_choices(choices) -> list[str]:
    if isinstance(choices, str) or not isinstance(choices, (list, tuple)) or not choices:
        raise UserInputError("choices must be a non-empty list of strings",
                             got=repr(choices)[:80])
    if len(choices) > MAX_CHOICES:
        raise UserInputError(f"at most {MAX_CHOICES} choices", got=str(len(choices)))
    out = []
    for c in choices:
        if not isinstance(c, str) or not c.strip():
            raise UserInputError("each choice must be a non-empty string", got=repr(c)[:40])
        out.append(c.strip())
    return out


def _ll_tokenizer(chat, vocab_size: int, stop_token_ids):
    """llguidance's view of the artifact's tokenizer, built once per
    ChatTokenizer (it costs ~1 s on a 50k vocabulary) and kept on it."""
    cached = getattr(chat, "_llguidance_tokenizer", None)
    if cached is None:
        lg = require("llguidance", "json_schema answers")
        try:
            cached = lg.LLTokenizer(chat.tokenizer.to_str(), n_vocab=vocab_size,
                                    eos_token=list(stop_token_ids))
        except ValueError as e:
            raise UserInputError(
                "json_schema answers need a byte-level BPE or SentencePiece tokenizer, and "
                f"this artifact's is not one llguidance reads ({str(e)[:100]})",
                hint="use choices=[...] for this model") from None
        chat._llguidance_tokenizer = cached
    return cached


def constraint_for(chat, vocab_size: int, stop_token_ids: Sequence[int],
                   choices: Sequence[str] | None = None,
                   json_schema: dict | None = None) -> Constraint | None:
    """The constraint of one call, or None."""
    if choices is not None and json_schema is not None:
        raise UserInputError("choices and json_schema are exclusive", hint="pass one of them")
    if choices is not None:
        return Choices(chat, vocab_size, choices)
    if json_schema is not None:
        return JsonSchema(chat, vocab_size, json_schema, stop_token_ids)
    return None
