"""Choosing the next token from logits: greedy, temperature, top-k, top-p,
repetition penalty. numpy only; a seeded Generator makes sampling repeatable."""
from __future__ import annotations

import math

import numpy as np

from vlmedge.errors import ArtifactError, UserInputError


def _number(name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) \
            or not math.isfinite(float(v)):
        raise UserInputError(f"{name} must be a finite number", got=repr(v)[:40])
    return float(v)


def check(temperature: float, top_k: int | None, top_p: float | None,
          repetition_penalty: float | None) -> None:
    """Sampling options, each refused in one line: a NaN or a string would
    otherwise turn into garbage tokens rather than an error."""
    if _number("temperature", temperature) < 0:
        raise UserInputError("temperature must be >= 0", got=str(temperature))
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer))
                              or top_k < 1):
        raise UserInputError("top_k must be an integer >= 1", got=repr(top_k)[:40])
    if top_p is not None and not 0 < _number("top_p", top_p) <= 1:
        raise UserInputError("top_p must be in (0, 1]", got=str(top_p))
    if repetition_penalty is not None and \
            _number("repetition_penalty", repetition_penalty) <= 0:
        raise UserInputError("repetition_penalty must be > 0", got=str(repetition_penalty))


def next_token(logits: np.ndarray, history: list[int], rng: np.random.Generator,
               temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
               repetition_penalty: float | None = None) -> int:
    """logits: (V,) float32 for the next position. Computed in float64 with
    the maximum subtracted before the temperature divides, so an extreme
    temperature or penalty cannot overflow into NaN probabilities."""
    # numpy's argmax stops at the first NaN, so one pass both finds the greedy
    # token and tells whether any logit is NaN
    best = int(np.argmax(logits))
    if np.isnan(logits[best]):
        raise ArtifactError("the decoder produced NaN logits",
                            hint="the graphs or their weights are corrupt; re-export the "
                                 "artifact (fp16 graphs: run them on a GPU provider)")
    if temperature == 0.0 and not (repetition_penalty and repetition_penalty != 1.0):
        # greedy: the float32 argmax is the float64 one (widening is exact; the
        # first maximum wins in both), without a float64 copy of (V,) each token
        return best
    logits = logits.astype(np.float64, copy=True)
    if repetition_penalty and repetition_penalty != 1.0 and history:
        seen = np.unique(np.asarray(history, np.int64))
        vals = logits[seen]  # as HF: divide positive logits, multiply negative ones
        logits[seen] = np.where(vals > 0, vals / repetition_penalty, vals * repetition_penalty)
    if temperature == 0.0:
        return int(np.argmax(logits))
    top = logits.max()
    if not np.isfinite(top):  # every logit -inf, or one +inf: the argmax is the only choice
        return int(np.argmax(logits))
    with np.errstate(over="ignore", under="ignore"):
        logits = (logits - top) / float(temperature)  # <= 0; the maximum is exactly 0
    if top_k is not None and top_k < logits.size:
        kth = np.partition(logits, -top_k)[-top_k]
        logits[logits < kth] = -np.inf
    probs = np.exp(logits)  # the maximum's probability is 1 before normalising: sum >= 1
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
