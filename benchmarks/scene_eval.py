"""Scene-world accuracy: ask held-out questions, score the answers (exact
match; a box by IoU >= 0.5, scenes.is_right).

The same (scene, question) pairs are produced for a given (n, seed) whatever
answers them (PyTorch, an ONNX artifact, INT8, ...), so accuracies compare
on identical inputs.
"""
from __future__ import annotations

import time
from collections import defaultdict
from typing import Callable

from vlmedge.demo import scenes

# answer_fn(pil_image, question_text) -> answer text
AnswerFn = Callable[[object, str], str]


def evaluate(answer: AnswerFn, n: int, seed: int = scenes.DEFAULT_EVAL_SEED,
             progress: Callable[[int, int], None] | None = None) -> dict:
    """Ask `n` held-out questions; returns accuracy overall and per kind,
    plus the wrong answers (at most 20) for inspection."""
    items = scenes.eval_items(n, seed)
    right: dict[str, int] = defaultdict(int)
    total: dict[str, int] = defaultdict(int)
    wrong = []
    start = time.perf_counter()
    for i, (scene, q) in enumerate(items):
        got = answer(scene.image, q.question)
        ok = scenes.is_right(q.kind, q.answer, got)
        total[q.kind] += 1
        right[q.kind] += ok
        if not ok and len(wrong) < 20:
            wrong.append({"seed": scene.seed, "kind": q.kind, "question": q.question,
                          "expected": q.answer, "got": got})
        if progress:
            progress(i + 1, n)
    return {
        "n": n,
        "seed": seed,
        "accuracy": sum(right.values()) / n,
        "per_kind": {k: right[k] / total[k] for k in scenes.QUESTION_KINDS if total[k]},
        "per_kind_n": {k: total[k] for k in scenes.QUESTION_KINDS if total[k]},
        "seconds": round(time.perf_counter() - start, 2),
        "wrong": wrong,
    }
