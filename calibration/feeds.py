"""Graph inputs for calibration, taken from the fp32 artifact running real
image + prompt pairs through the runtime's own code.

The runtime builds every feed itself (C preprocessing, chat template and
image-token expansion, mrope positions, KV cache), so calibration sees
exactly what deployment sees. A RecordingBackend in place of a session's
backend keeps the feeds of its last run; the generators below drive the
session one graph call at a time and yield those feeds:

    vision_feeds   one per image: pixel_values (+ the host-computed patch
                   inputs of qwen2_vl)
    decoder_feeds  per (image, prompt): the prefill (inputs_embeds (1, S, D),
                   attention_mask (1, S), position_ids, empty past (1, kv, 0, hd))
                   then each greedy decode step (inputs_embeds (1, 1, D) and
                   the past (1, kv, P, hd)), up to `steps` tokens or a stop token

Every yielded dict holds every input of its graph (ORT's calibrators run the
graph on it).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterable, Iterator

import numpy as np

from .dataset import Sample

DECODE_STEPS = 16  # greedy tokens per prompt, for calibration and the gate's references


class RecordingBackend:
    """A runtime Backend that remembers the feeds of its last run()."""

    def __init__(self, inner):
        self.inner = inner
        self.last: dict[str, np.ndarray] | None = None

    def __getattr__(self, name):  # input_names, output_names, path, ...
        return getattr(self.inner, name)

    def run(self, feeds):
        self.last = {n: feeds[n] for n in self.inner.input_names}
        return self.inner.run(feeds)


@contextmanager
def recording(session, graph: str):
    """Temporarily puts a RecordingBackend in front of session.<graph>."""
    inner = getattr(session, graph)
    rec = RecordingBackend(inner)
    setattr(session, graph, rec)
    try:
        yield rec
    finally:
        setattr(session, graph, inner)


def vision_feeds(session, samples: Iterable[Sample],
                 on_sample: Callable[[], None] = lambda: None) -> Iterator[dict]:
    # A yielded feed is valid until the next one is asked for: the
    # preprocessor reuses its output buffer (the calibrator consumes each
    # feed at once).
    with recording(session, "vision") as rec:
        for s in samples:
            pixels, grid = session.preprocess(s.image())
            session.encode_image(pixels, grid)
            yield rec.last
            on_sample()


def greedy(session, ids: list[int], feats, grid, steps: int) -> Iterator[tuple[int, np.ndarray]]:
    """(position, logits (V,)) of a greedy run: position 0 is the prefill's
    prediction, position i the step fed token i-1. Stops after a stop token
    or `steps` predictions (or at the context length)."""
    steps = min(steps, session.context_length - len(ids))
    if steps < 1:
        return
    stop = set(session.chat.stop_token_ids)
    logits, cache = session.prefill(ids, feats, session.empty_cache(), grid)
    for i in range(steps):
        yield i, logits
        token = int(np.argmax(logits))
        if token in stop or i + 1 == steps:
            return
        logits, cache = session.step(session.embed_token(token), cache)


def decoder_feeds(session, samples: Iterable[Sample], steps: int = DECODE_STEPS,
                  on_sample: Callable[[], None] = lambda: None) -> Iterator[dict]:
    with recording(session, "decoder") as rec:
        for s in samples:
            pixels, grid = session.preprocess(s.image())
            feats = session.encode_image(pixels, grid)
            for prompt in s.prompts:
                ids = session.chat.prompt_ids(prompt, image_grid=grid)
                for _ in greedy(session, ids, feats, grid, steps):
                    yield rec.last
            on_sample()
