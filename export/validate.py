"""Parity of an exported artifact with its PyTorch model.

On a fixed image and prompts, through the runtime's own session (so what is
validated is what deploys), with the HF processor's pixel_values and ids fed
to both sides (preprocessing parity is tested separately):

- image features: max |ORT - torch| of the vision graph's output;
- first-step logits: max |ORT - torch| at the last prompt position;
- 16 greedy tokens: the runtime's own decode loop (VLMSession.decode, the
  one generate() runs) with the KV cache vs PyTorch full recompute (no
  cache; the image is encoded once per prompt where positions are 1-D), stop
  tokens ignored; fewer where the artifact's context (a sliding window) ends
  sooner, and both sides stop right after a generated image token, which is
  compared but never fed back (it would be taken for an image slot);
- cached decode equals recompute: the ORT decoder run once over the whole
  sequence gives the same logits for the last token as the cached
  step-by-step run.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from vlmedge.lazy import require

QUESTIONS = ("describe the image.", "what color is the circle?")
GREEDY_TOKENS = 16
# fp16 graphs: image features are held to tol + FP16_STEPS fp16 steps (2^-10
# relative) at their largest magnitude. Every fp16 tensor is rounded to a
# step of its own magnitude, and the tower's hidden states grow beyond its
# outputs, so a trained demo's features (~80, where one step is 0.06) drift by
# about one step; an absolute 5e-2 alone fails them, while tol x scale (the
# fp32 rule) would let 4 (5% of 80) through.
FP16_STEPS = 4


def image_features_bound(precision: str, tol: float, scale: float) -> float:
    """The largest |ORT - torch| image feature allowed, for features whose
    largest magnitude is `scale` (>= 1): fp32 tol x scale, fp16 tol +
    FP16_STEPS steps of fp16 at that magnitude (see FP16_STEPS)."""
    if precision == "fp32":
        return tol * scale
    return tol + FP16_STEPS * 2.0 ** -10 * scale


def _first_step(torch, model, ids, extra: dict, family):
    """The whole model on the prompt -> (merged text + image embeddings (1, T, D)
    the language model received, or None where they cannot be reused, and the
    last position's logits (V,)). They are reused when `family` is given and
    its decoder takes plain 1-D positions and causal masks; mrope positions
    depend on the image grid inside the model, and Gemma 3's image tokens
    attend both ways only where the whole model sees token_type_ids."""
    if family is None or family.decoder_facts(model, 0)["position_ids"] != "1d" \
            or family.attention_groups:
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False, **extra)
        return None, out.logits[0, -1].float()
    seen = {}

    def capture(module, args, kwargs):
        seen.setdefault("embeds", kwargs.get("inputs_embeds"))

    handle = family.language_model(model).register_forward_pre_hook(capture, with_kwargs=True)
    try:
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False, **extra)
    finally:
        handle.remove()
    return seen.get("embeds"), out.logits[0, -1].float()


def _torch_greedy(torch, model, hf: dict, n: int, family=None,
                  image_token_id: int | None = None) -> tuple[list[int], np.ndarray]:
    """n greedy tokens by full recompute (no KV cache); returns the tokens and
    the first step's logits. Stops right after a generated `image_token_id`
    (compared, never fed back: it would be taken for an image slot with no
    image feature behind it), as `_ort_greedy` does.

    The first step runs the whole model on the processor's inputs. Given the
    `family` of a decoder with plain 1-D positions (llava, idefics3), later
    steps recompute only the language model, over the merged text + image
    embeddings captured from that first step plus the new tokens': the vision
    tower runs once per prompt instead of once per token (a 13-tile SmolVLM
    frame costs ~25 s of PyTorch vision on 2 cores, x16 tokens x2 prompts).
    Qwen2-VL's mrope positions come from the image grid inside the model, so
    it recomputes everything each step."""
    ids = hf["input_ids"]
    extra = {k: v for k, v in hf.items() if k not in ("input_ids", "attention_mask")}
    # Per-token modality types (Qwen2-VL's mrope and Gemma 3's image blocks
    # need them) grow with the sequence: a generated token is text (0).
    types = {k: extra[k] for k in ("mm_token_type_ids", "token_type_ids") if k in extra}
    with torch.inference_mode():
        embeds, last = _first_step(torch, model, ids, extra, family)
        tokens, first = [], last.numpy().copy()
        for _ in range(n):
            t = int(last.argmax())
            tokens.append(t)
            if len(tokens) == n or t == image_token_id:
                break
            ids = torch.cat([ids, torch.tensor([[t]])], dim=1)
            if embeds is not None:  # language model only, whole sequence, no cache
                embeds = torch.cat([embeds, model.get_input_embeddings()(ids[:, -1:])], dim=1)
                hidden = family.language_model(model)(
                    inputs_embeds=embeds, use_cache=False,
                    attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long))
                last = family.lm_head(model)(hidden.last_hidden_state[:, -1])[0].float()
            else:
                for key, t0 in types.items():  # generated: text, or PaliGemma's suffix
                    fill = family.generated_token_type if family is not None else 0
                    extra[key] = torch.cat(
                        [t0, t0.new_full((1, ids.shape[1] - t0.shape[1]), fill)], dim=1)
                last = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False,
                             **extra).logits[0, -1].float()
    return tokens, first


def _ort_greedy(session, ids: list[int], feats: np.ndarray, n: int, grid=None):
    """n greedy tokens through the runtime's own decode loop (KV cache, stop
    tokens ignored, as in the reference) -> (tokens, first step's logits (V,),
    max |cached - recomputed logits| that chose the last token, stopped at the
    image token).

    Stops right after a generated image token (session.chat.image_token_id),
    as `_torch_greedy` does: it is compared but never fed back. The recompute
    runs the whole sequence but that last token in one prefill."""
    image_token_id = session.chat.image_token_id
    logits, cache = session.prefill(ids, feats, session.empty_cache(), grid)
    first = logits.copy()
    timings: dict = {}
    tokens = []
    for t in session.decode(logits, cache, n, ignore_stop_tokens=True, timings=timings):
        tokens.append(t)
        if t == image_token_id:
            break
    if session.facts.attention_groups == "prompt":
        # A prefix-LM: the prompt is one both-way block and generated tokens are
        # not in it, so they are recomputed in one step after the prompt's.
        full, prompt = session.prefill(ids, feats, session.empty_cache(), grid)
        if len(tokens) > 1:
            full, _ = session.prefill(tokens[:-1], None, prompt, grid)
    else:
        full, _ = session.prefill(ids + tokens[:-1], feats, session.empty_cache(), grid)
    d_cache = float(np.abs(full - timings["last_logits"]).max())
    return tokens, first, d_cache, tokens[-1] == image_token_id


def validate(family, model, processor, artifact_dir: Path, precision: str,
             manifest: dict | None = None, decoder_flavour: str | None = None
             ) -> dict[str, Any]:
    """The parity record of one decoder flavour (None: the session's pick on
    the CPU) of the artifact against PyTorch."""
    torch = require("torch", "validating an export")
    from vlmedge.runtime.session import VLMSession

    start = time.perf_counter()
    # manifest: the exporter's, in memory (the staged artifact has no manifest.json yet)
    session = VLMSession(artifact_dir, provider="cpu", verify=False, manifest=manifest,
                         decoder_flavour=decoder_flavour)
    image = family.sample_image()
    tol = family.tolerances if precision == "fp32" else family.tolerances_fp16
    result: dict[str, Any] = {"precision": precision, "provider": "CPUExecutionProvider",
                              "decoder_flavour": session.decoder_flavour,
                              "tolerances": dict(tol), "greedy_tokens": GREEDY_TOKENS,
                              "prompts": []}
    worst_feat = worst_logit = worst_cache = 0.0
    # Image features are held to tol x max(1, their largest magnitude): fp32
    # rounding grows with the values (a trained tower's features reach ~80,
    # where 1e-4 absolute is ~1e-6 relative), so a bound in absolute units
    # alone would fail exact graphs of larger models.
    feat_scale = 1.0
    all_match = ids_match = True
    for q in QUESTIONS:
        hf = family.hf_inputs(processor, image, q)
        ref_ids = hf["input_ids"][0].tolist()
        # Only within what the artifact serves: past a sliding window the
        # exported decoder (full attention) is no longer the model.
        n = min(GREEDY_TOKENS, session.context_length - len(ref_ids))
        if n < 1:
            from vlmedge.errors import ModelDirError, UserInputError

            window = family.sliding_window(model)
            need = f">= {len(ref_ids) + 1} tokens ({len(ref_ids)} for the image prompt + 1)"
            if window is not None and session.context_length == window:
                raise ModelDirError(
                    f"the model's sliding window of {window} tokens is too small to serve an "
                    f"image prompt", expected=need, got=str(window),
                    hint="the export serves at most the window; --no-validate exports anyway")
            raise UserInputError("--max-context is too small to serve an image prompt",
                                 expected=need, got=str(session.context_length))
        with torch.inference_mode():
            ref_feats = family.torch_image_features(model, hf).float().numpy()
        # The image layout (tile grid, patch grid) as the processor saw it: the
        # runtime computes its prompt and vision/decoder positions from it.
        grid = family.image_grid(processor, image, hf)
        feats = session.encode_image(np.asarray(family.vision_args(hf)[0].numpy(), np.float32),
                                     image_grid=grid)
        d_feat = float(np.abs(feats.astype(np.float32) - ref_feats).max())
        feat_scale = max(feat_scale, float(np.abs(ref_feats).max()))
        our_ids = session.chat.prompt_ids(q, image_grid=grid)
        same_ids = our_ids == ref_ids
        ids_match &= same_ids
        ref_tokens, ref_first = _torch_greedy(torch, model, hf, n, family,
                                              session.chat.image_token_id)
        tokens, first, d_cache, stopped = _ort_greedy(session, ref_ids, feats, n, grid)
        d_logit = float(np.abs(first - ref_first).max())
        match = tokens == ref_tokens
        all_match &= match
        worst_feat, worst_logit = max(worst_feat, d_feat), max(worst_logit, d_logit)
        worst_cache = max(worst_cache, d_cache)
        result["prompts"].append({
            "question": q, "prompt_ids_match": same_ids, "tokens_match": match,
            "max_abs_diff_image_features": d_feat, "max_abs_diff_logits": d_logit,
            "cached_vs_recompute_max_abs_diff": d_cache, "greedy_tokens": n,
            "stopped_at_image_token": stopped,
            "torch_text": processor.tokenizer.decode(ref_tokens, skip_special_tokens=True),
            "onnx_text": session.chat.decode(tokens)})
    result.update({
        "max_abs_diff_image_features": worst_feat,
        "image_features_scale": feat_scale,
        "image_features_bound": image_features_bound(precision, tol["image_features"],
                                                     feat_scale),
        "max_abs_diff_logits": worst_logit,
        "cached_vs_recompute_max_abs_diff": worst_cache,
        "tokens_match": bool(all_match),
        "prompt_ids_match": bool(ids_match),
        "seconds": round(time.perf_counter() - start, 2),
    })
    result["passed"] = bool(all_match and ids_match
                            and worst_feat <= result["image_features_bound"]
                            and worst_logit <= tol["logits"]
                            and worst_cache <= tol["logits"])
    return result


# The figures where the worst of several flavours' records is the larger one.
_WORST = ("max_abs_diff_image_features", "max_abs_diff_logits",
          "cached_vs_recompute_max_abs_diff", "image_features_scale")


def combine(records: list[dict[str, Any]]) -> dict[str, Any]:
    """One validation record for an artifact with several decoder flavours
    (--decoder-flavour both): each flavour's record under "flavours", and at
    the top the worst figures (largest differences; tokens and ids matching
    and passing only where every flavour's do), so a reader of the top level
    sees the weakest flavour. One record is returned as it is."""
    if len(records) == 1:
        return records[0]
    out = {**records[0], "decoder_flavour": None,
           "flavours": {r["decoder_flavour"]: r for r in records}}
    for key in _WORST:
        out[key] = max(r[key] for r in records)
    out["image_features_bound"] = min(r["image_features_bound"] for r in records)
    out["seconds"] = round(sum(r["seconds"] for r in records), 2)
    for key in ("tokens_match", "prompt_ids_match", "passed"):
        out[key] = all(r[key] for r in records)
    out["prompts"] = [{**p, "decoder_flavour": r["decoder_flavour"]} for r in records
                      for p in r["prompts"]]
    return out
