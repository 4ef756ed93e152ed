"""Grouped-query attention for the exported decoder, without repeating K/V.

HF's eager and SDPA attention give each of the H query heads its own copy of
the key/value head it shares (`repeat_kv`: an Expand of the whole cache to
(B, KV, H/KV, S, D), then a Reshape). Traced into ONNX, that copy runs on
every decode step, for every layer, over the full past: on the SmolVLM-256M
preset (3 KV heads for 9 query heads, past 100) the Expand and the transpose
of the expanded keys took 7.3 of the int8 decoder's 30.6 ms (onnxruntime
profile), more as the context grows, and the same in fp32.

Here the query heads are grouped instead: Q (B, H, q, D) is viewed as
(B, KV, (H/KV) * q, D), so each KV head is read once by the H/KV query
heads that share it. Same arithmetic, same head order as repeat_kv (query
head h reads KV head h // (H/KV)); only standard ONNX ops (MatMul, Softmax,
Reshape, Add), so TensorRT takes it too.

It is used only while the decoder is traced (`grouped_attention(config)`);
the PyTorch model that export validates against keeps its own attention.
"""
from __future__ import annotations

import contextlib

from .base import torch

NAME = "vlmedge_grouped"


def grouped_attention_forward(module, query, key, value, attention_mask, scaling: float,
                              dropout: float = 0.0, **kwargs):
    """query (B, H, q, D), key/value (B, KV, S, D), attention_mask None or an
    additive float mask (B, 1, q, S) -> (attn_output (B, q, H, D), None)."""
    b, heads, q, d = query.shape
    kv = key.shape[1]
    groups = heads // kv
    grouped = query.reshape(b, kv, groups * q, d)                     # (B, KV, G*q, D)
    scores = torch.matmul(grouped, key.transpose(2, 3)) * scaling     # (B, KV, G*q, S)
    if attention_mask is not None:
        s = key.shape[2]
        scores = scores.reshape(b, kv, groups, q, s) + attention_mask[:, :, None, :, :s]
        scores = scores.reshape(b, kv, groups * q, s)
    probs = torch.nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(probs, value)                                  # (B, KV, G*q, D)
    return out.reshape(b, heads, q, d).transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(NAME, grouped_attention_forward)
    AttentionMaskInterface.register(NAME, eager_mask)  # additive float mask, as eager's


def applies_to(text_config, window_in_mask: bool = False) -> bool:
    """Decoders this formulation covers: grouped (or multi-head) attention
    without logit soft-capping, and with no sliding window unless the caller
    puts the window in the masks it passes (`group_masks`)."""
    heads = text_config.num_attention_heads
    kv = getattr(text_config, "num_key_value_heads", None) or heads
    windowed = getattr(text_config, "use_sliding_window", None)
    if windowed is None:  # configs without the switch use a window when one is set
        windowed = getattr(text_config, "sliding_window", None) is not None
    capped = getattr(text_config, "attn_logit_softcapping", None) is not None
    return heads % kv == 0 and not capped and (window_in_mask or not windowed)


def group_masks(text_config, attention_mask, groups, dtype,
                window_limits_groups: bool = True) -> dict:
    """Additive masks {layer type: (B, 1, S, T)} for a step of S tokens after
    T - S past ones. attention_mask (B, T) 1/0; groups (B, S) int64 (see
    GroupedDecoderWrapper). A query sees key k when k is not padding and
    (k <= q, or both are in one group >= 0); on sliding layers also only when
    q - k < W, as transformers' sliding_window_overlay. Past keys are in no
    group: an image's tokens are always prefilled in one step.
    window_limits_groups False: a group sees itself whole past the window
    (PaliGemma 2's prefix), OR(window AND causal, group)."""
    s, t = groups.shape[1], attention_mask.shape[1]
    q = torch.arange(s) + (t - s)                                     # (S,) absolute
    k = torch.arange(t)                                               # (T,)
    causal = k[None, :] <= q[:, None]                                 # (S, T)
    key_groups = torch.cat([torch.full_like(attention_mask, -1)[:, :t - s], groups], 1)
    same = (groups[:, :, None] == key_groups[:, None, :]) & (groups[:, :, None] >= 0)
    allowed = (causal[None] | same) & attention_mask[:, None, :].bool()  # (B, S, T)
    out = {"full_attention": allowed}
    window = getattr(text_config, "sliding_window", None)
    if window is not None:
        near = ((q[:, None] - k[None, :]) < window)[None]             # (1, S, T)
        out["sliding_attention"] = allowed & near if window_limits_groups else \
            ((causal[None] & near) | same) & attention_mask[:, None, :].bool()
    low = torch.finfo(dtype).min
    return {name: torch.where(a, 0.0, low).to(dtype)[:, None] for name, a in out.items()}


@contextlib.contextmanager
def grouped_attention(text_config, window_in_mask: bool = False):
    """While tracing: the decoder's attention is `grouped_attention_forward`;
    the config's own implementation is restored afterwards."""
    if not applies_to(text_config, window_in_mask):
        yield
        return
    _register()
    before = text_config._attn_implementation
    text_config._attn_implementation = NAME
    try:
        yield
    finally:
        text_config._attn_implementation = before
