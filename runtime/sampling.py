"""Choosing the next token from logits: greedy, temperature, top-k, top-p,
repetition penalty. numpy only; a seeded Generator makes sampling repeatable."""
from __future__ import annotations

import numpy as np

from vlmedge.errors import UserInputError


def check(temperature: float, top_k: int | None, top_p: float | None,
          repetition_penalty: float | None) -> None:
    if temperature < 0:
        raise UserInputError("temperature must be >= 0", got=str(temperature))
    if top_k is not None and top_k < 1:
        raise UserInputError("top_k must be >= 1", got=str(top_k))
    if top_p is not None and not 0 < top_p <= 1:
        raise UserInputError("top_p must be in (0, 1]", got=str(top_p))
    if repetition_penalty is not None and repetition_penalty <= 0:
        raise UserInputError("repetition_penalty must be > 0", got=str(repetition_penalty))


def next_token(logits: np.ndarray, history: list[int], rng: np.random.Generator,
               temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
               repetition_penalty: float | None = None) -> int:
    """logits: (V,) float32 for the next position."""
    logits = logits.astype(np.float32, copy=True)
    if repetition_penalty and repetition_penalty != 1.0 and history:
        seen = np.unique(np.asarray(history, np.int64))
        vals = logits[seen]  # as HF: divide positive logits, multiply negative ones
        logits[seen] = np.where(vals > 0, vals / repetition_penalty, vals * repetition_penalty)
    if temperature == 0.0:
        return int(np.argmax(logits))
    logits /= temperature
    if top_k is not None and top_k < logits.size:
        kth = np.partition(logits, -top_k)[-top_k]
        logits[logits < kth] = -np.inf
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    if top_p is not None and top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        cum = np.cumsum(probs[order])
        keep = order[: int(np.searchsorted(cum, top_p) + 1)]  # smallest set reaching top_p
        mask = np.zeros_like(probs, dtype=bool)
        mask[keep] = True
        probs = np.where(mask, probs, 0.0)
        probs /= probs.sum()
    return int(rng.choice(probs.size, p=probs))
