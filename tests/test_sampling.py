"""runtime/sampling.py's greedy path: the float32 argmax it takes is the float64
one, and a NaN anywhere in the logits is refused whatever the options."""
from __future__ import annotations

import numpy as np
import pytest

from vlmedge.errors import ArtifactError
from vlmedge.runtime import sampling


def _logits(seed: int, v: int = 4099) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(v).astype(np.float32)
    x[rng.integers(0, v, 40)] = -np.inf  # masked tokens (constraints, forced lengths)
    top = rng.integers(0, v, 3)
    x[top] = x.max() + 1.0  # a three-way tie for the maximum: the first one wins
    return x


@pytest.mark.parametrize("seed", range(20))
def test_greedy_is_the_float64_argmax(seed):
    x = _logits(seed)
    want = int(np.argmax(x.astype(np.float64)))
    assert sampling.next_token(x, [], np.random.default_rng(0)) == want
    # a repetition penalty takes the float64 path: the same token when the
    # penalised tokens are not the maximum (finite ones, so the penalty applies)
    history = [int(i) for i in np.flatnonzero(np.isfinite(x))[:5] if i != want]
    assert sampling.next_token(x, history, np.random.default_rng(0),
                               repetition_penalty=1.3) == want


@pytest.mark.parametrize("where", ["first", "middle", "last"])
@pytest.mark.parametrize("opts", [{}, {"temperature": 0.7, "top_k": 5},
                                  {"repetition_penalty": 1.3}])
def test_nan_anywhere_is_refused(where, opts):
    x = _logits(1)
    x[int(np.argmax(x))] = 1e30  # a huge maximum before the NaN does not hide it
    x[{"first": 0, "middle": x.size // 2, "last": x.size - 1}[where]] = np.nan
    with pytest.raises(ArtifactError, match="NaN logits"):
        sampling.next_token(x, [3], np.random.default_rng(0), **opts)


def test_all_masked_but_one_picks_it():
    x = np.full(100, -np.inf, np.float32)
    x[57] = -3.0
    assert sampling.next_token(x, [], np.random.default_rng(0)) == 57
    assert sampling.next_token(x, [], np.random.default_rng(0), temperature=1.0) == 57
