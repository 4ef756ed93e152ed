"""The accuracy gate: a quantized pipeline against fp32 on the held-out split.

Figures (all through the runtime's own session code):

    cosine      image features, int8 vision vs fp32, cosine per image token,
                mean (and min) over tokens and held-out images
    agreement   teacher-forced top-1 agreement: fp32 answers each held-out
                prompt greedily (up to DECODE_STEPS tokens, stop token
                included); the int8 pipeline (its own vision features, its
                own prefill and KV cache) is fed the same tokens, and each
                position counts when its argmax equals fp32's token
    kl          mean KL(fp32 || int8) of the next-token distributions at those
                positions (a smooth figure for ranking nodes; not gated)
    scene       demo model only: exact-match accuracy on the held-out scenes'
                questions (answers generated freely), int8 and fp32

Targets: agreement >= --accuracy-target, cosine mean >= --min-cosine, and
(demo) scene accuracy no more than --max-accuracy-drop points below fp32.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np

from vlmedge.demo import scenes

from .dataset import Sample
from .feeds import DECODE_STEPS, greedy

SCENE_MAX_NEW_TOKENS = 24  # as vlm-eval


@dataclass
class Targets:
    agreement: float = 0.97
    cosine: float = 0.99
    scene_drop_points: float = 1.0


@dataclass
class Prompted:
    """One held-out prompt's fp32 reference."""
    image: int  # index into Reference.features / grids
    ids: list[int]
    tokens: list[int]  # fp32 greedy tokens (= argmax at each position)
    logits: np.ndarray  # (len(tokens), V) float16: fp32 logits per position


@dataclass
class Reference:
    samples: list[Sample]
    pixels: list[np.ndarray]
    grids: list[Any]
    features: list[np.ndarray]  # fp32 image features (N, T_img, D) per image
    prompts: list[Prompted]
    scene: dict | None = None  # fp32 scene accuracy (demo)


@dataclass
class Figures:
    cosine_mean: float | None = None
    cosine_min: float | None = None
    agreement: float | None = None
    positions: int = 0
    kl: float | None = None
    scene_accuracy: float | None = None
    scene_accuracy_fp32: float | None = None
    scene_questions: int = 0
    scene_per_kind: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def reference(session, holdout: list[Sample], scene: bool,
              progress: Callable[[int], None] | None = None) -> Reference:
    """Runs the fp32 session over the held-out split once; `progress(done)`
    after each image (a tiled model's image can take many seconds)."""
    pixels, grids, feats, prompts = [], [], [], []
    for i, s in enumerate(holdout):
        px, grid = session.preprocess(s.image())
        px = px.copy()  # the preprocessor reuses its output buffer from frame to frame
        f = session.encode_image(px, grid)
        pixels.append(px)
        grids.append(grid)
        feats.append(f)
        for p in s.prompts:
            ids = session.chat.prompt_ids(p, image_grid=grid)
            logits = [lg.copy() for _, lg in greedy(session, ids, f, grid, DECODE_STEPS)]
            if not logits:
                continue
            stacked = np.stack(logits)
            prompts.append(Prompted(i, ids, [int(t) for t in stacked.argmax(-1)],
                                    stacked.astype(np.float16)))
        if progress is not None:
            progress(i + 1)
    ref = Reference(holdout, pixels, grids, feats, prompts)
    if scene:
        ref.scene = scene_accuracy(session, holdout)
    return ref


def measure(session, ref: Reference, images: int | None = None, cosine_only: bool = False,
            scene: bool = True) -> Figures:
    """Figures of `session` (a quantized pipeline) against `ref`; `images`
    limits the measurement to the first held-out images (sensitivity ranking)."""
    n_img = len(ref.features) if images is None else min(images, len(ref.features))
    fig = Figures()
    cos_all, feats = [], []
    for i in range(n_img):
        f = session.encode_image(ref.pixels[i], ref.grids[i])
        feats.append(f)
        cos_all.append(_cosine(ref.features[i], f))
    cos = np.concatenate(cos_all)
    fig.cosine_mean, fig.cosine_min = float(cos.mean()), float(cos.min())
    if cosine_only:
        return fig
    agree = total = 0
    kl = 0.0
    for p in ref.prompts:
        if p.image >= n_img:
            continue
        logits = _teacher_forced(session, p, feats[p.image], ref.grids[p.image])
        agree += int((logits.argmax(-1) == np.asarray(p.tokens)).sum())
        total += len(p.tokens)
        kl += float(_kl(p.logits.astype(np.float64), logits.astype(np.float64)).sum())
    fig.agreement = agree / total if total else None
    fig.positions = total
    fig.kl = kl / total if total else None
    if scene and ref.scene is not None and images is None:
        s = scene_accuracy(session, ref.samples)
        fig.scene_accuracy, fig.scene_questions = s["accuracy"], s["n"]
        fig.scene_per_kind = s["per_kind"]
        fig.scene_accuracy_fp32 = ref.scene["accuracy"]
    return fig


def failures(fig: Figures, targets: Targets) -> list[str]:
    """What falls short of `targets`, in words; [] when the gate passes."""
    out = []
    if fig.cosine_mean is not None and fig.cosine_mean < targets.cosine:
        out.append(f"image-feature cosine {fig.cosine_mean:.4f} < {targets.cosine:g}")
    if fig.agreement is not None and fig.agreement < targets.agreement:
        out.append(f"top-1 agreement {fig.agreement:.4f} < {targets.agreement:g}")
    if fig.scene_accuracy is not None:
        drop = 100.0 * (fig.scene_accuracy_fp32 - fig.scene_accuracy)
        if drop > targets.scene_drop_points:
            out.append(f"scene accuracy {100 * fig.scene_accuracy:.1f}% is {drop:.1f} points "
                       f"below fp32 ({100 * fig.scene_accuracy_fp32:.1f}%; at most "
                       f"{targets.scene_drop_points:g})")
    return out


def _teacher_forced(session, p: Prompted, feats, grid) -> np.ndarray:
    """(len(p.tokens), V) logits of `session` fed the fp32 tokens."""
    logits, cache = session.prefill(p.ids, feats, session.empty_cache(), grid)
    out = [logits]
    for t in p.tokens[:-1]:
        logits, cache = session.step(session.embed_token(t), cache)
        out.append(logits)
    return np.stack(out)


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-token cosine of two (..., D) feature arrays -> (tokens,)."""
    a = a.reshape(-1, a.shape[-1]).astype(np.float64)
    b = b.reshape(-1, b.shape[-1]).astype(np.float64)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (a * b).sum(1) / np.maximum(den, 1e-30)


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _kl(ref_logits: np.ndarray, logits: np.ndarray) -> np.ndarray:
    lp, lq = _log_softmax(ref_logits), _log_softmax(logits)
    return (np.exp(lp) * (lp - lq)).sum(-1)


def scene_accuracy(session, samples: list[Sample]) -> dict[str, Any]:
    """Accuracy on the samples' questions (those with answers), by the scene
    world's rule (scenes.is_right: exact match, a box by IoU)."""
    right: dict[str, int] = {}
    total: dict[str, int] = {}
    for s in samples:
        if not s.answers:
            continue
        results = session.ask(s.image(), list(s.prompts), max_new_tokens=SCENE_MAX_NEW_TOKENS)
        for r, answer, kind in zip(results, s.answers, s.kinds):
            total[kind] = total.get(kind, 0) + 1
            right[kind] = right.get(kind, 0) + scenes.is_right(kind, answer, r.text)
    n = sum(total.values())
    return {"accuracy": sum(right.values()) / n if n else None, "n": n,
            "per_kind": {k: right[k] / total[k] for k in total}}
