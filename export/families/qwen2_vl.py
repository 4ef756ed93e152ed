"""Qwen2-VL (Qwen2VLForConditionalGeneration) and Qwen2.5-VL: a ViT over
flattened temporal x spatial patches with 2-D rotary positions, a 2x2 patch
merger, and a Qwen2 decoder with multimodal rotary positions (mrope).

Dynamic resolution: the processor resizes an image to multiples of
patch * merge pixels and flattens it into (t*h*w, C * temporal_patch *
patch * patch) patches with grid (t, h, w). The vision graph takes those
patches for ONE image plus what depends on the grid and not on the patch
count alone, computed on the host by runtime/mrope.py: the patches' (row,
col) rotary coordinates. The patch count is a dynamic dim, so one graph
serves every grid of an image.

One image (t = 1) is one attention segment, so the graph builds the tower's
cu_seqlens itself as [0, num_patches] from the input's shape instead of
taking it as an input: the tower splits the patch sequence by the lengths in
cu_seqlens, and lengths read from an input's values are data-dependent
shapes that TensorRT cannot build (check-trt flagged the Split); lengths
derived from a shape are shape arithmetic it can. The decoder
takes mrope position_ids (3, batch, sequence_length), also from the host.

Qwen2.5-VL adds window attention in most vision blocks: the host also
computes the window order of the merged patches (window_index) and the
windows' cumulative patch counts (cu_window_seqlens, a dynamic dim). The
tower itself splits its sequence into a Python list of windows
(`torch.split(..., lengths.tolist())`), which a trace unrolls into the traced
grid's window count: earlier vlmedge graphs served only that count (their
manifests say image.window_count; the runtime refuses other grids for them).
While the graph is traced, the windowed blocks attend instead over the
windows gathered into a (windows, window_patches) batch, padded and masked,
window_patches being the most a window can hold (a constant of the config):
the window count is a shape, never a loop, so one graph serves every grid.
"""
from __future__ import annotations

import contextlib
import functools
import json
from pathlib import Path
from typing import Any

from vlmedge.errors import ModelDirError
from vlmedge.runtime import mrope

from .base import Family, GraphSpec, decoder_facts, normalization_facts, torch

nn = torch.nn

# The grid the vision graph is traced with: (t, h, w) patches, h != w so that
# rows and columns cannot be confused; 96 patches -> 24 image tokens.
_TRACE_GRID = (1, 8, 12)


def _one_segment(pixel_values):
    """cu_seqlens (2,) int32 = [0, num_patches]: one image, one attention
    segment, from the shape alone (see the module docstring)."""
    return torch.tensor([0, 1], dtype=torch.int32) * pixel_values.shape[0]


class Qwen2VLVision(nn.Module):
    """pixel_values (num_patches, C*T*P*P), vision_position_ids (num_patches, 2)
    int64 -> image_features (1, num_patches / merge^2, D_text).

    The precomputed position ids are handed to the tower the way
    transformers' vision_utils takes them (popped from kwargs), so the graph
    never derives them from a grid tensor (.tolist(), loops)."""

    def __init__(self, model):
        super().__init__()
        self.visual = model.model.visual

    def forward(self, pixel_values, vision_position_ids):
        out = self.visual(pixel_values, grid_thw=None, position_ids=vision_position_ids,
                          cu_seqlens=_one_segment(pixel_values))
        return out.pooler_output[None]


def _window_slots(cu_window_seqlens, window_patches: int):
    """cu_window_seqlens (W + 1,) int32 -> index (W, L) int64, valid (W, L) bool,
    L = window_patches: slot s of window w holds patch cu[w] + s if s is
    below the window's length; padding slots point at patch 0, masked."""
    cu = cu_window_seqlens.long()
    slot = torch.arange(window_patches)                              # (L,)
    valid = slot[None, :] < (cu[1:] - cu[:-1])[:, None]              # (W, L)
    return torch.where(valid, cu[:-1, None] + slot[None, :], 0), valid


def _patch_slots(cu_window_seqlens, num_patches, window_patches: int):
    """(N,) int64: each patch's row in the (W * L) rows of the batched windows.
    The (N, W) comparison costs about N^2 / L, a small part of a
    full-attention block's N^2 scores per head."""
    cu = cu_window_seqlens.long()
    patch = torch.arange(num_patches)                                # (N,)
    window = (patch[:, None] >= cu[None, 1:]).sum(-1)                # (N,) window of each patch
    return window * window_patches + patch - cu[window]


def batched_window_attention(attn, window_patches: int, hidden_states, cu_seqlens,
                             position_embeddings=None, **kwargs):
    """Qwen2_5_VLVisionAttention.forward for a windowed block, with the windows
    batched instead of split: hidden_states (N, C), cu_seqlens the window
    bounds (W + 1,) -> (N, C). The same arithmetic as transformers' per-window
    eager attention (padded keys get exp(min) = 0 weight); standard ONNX ops
    only (Gather, MatMul, Where, Softmax), sizes from shapes alone."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision

    n = hidden_states.shape[0]
    qkv = attn.qkv(hidden_states).reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3)
    q, k, v = qkv.unbind(0)                                          # (N, H, D) each
    cos, sin = position_embeddings
    q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
    index, valid = _window_slots(cu_seqlens, window_patches)
    q, k, v = (t[index].permute(0, 2, 1, 3) for t in (q, k, v))      # (W, H, L, D)
    scores = torch.matmul(q, k.transpose(2, 3)) * attn.scaling       # (W, H, L, L)
    scores = scores.masked_fill(~valid[:, None, None, :], torch.finfo(scores.dtype).min)
    probs = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    out = torch.matmul(probs, v).permute(0, 2, 1, 3)                 # (W, L, H, D)
    out = out.reshape(-1, attn.dim)[_patch_slots(cu_seqlens, n, window_patches)]  # (N, C)
    return attn.proj(out)


@contextlib.contextmanager
def batched_windows(visual):
    """While inside: the windowed blocks of a Qwen2.5-VL tower attend through
    batched_window_attention; their own forward is restored on exit, so the
    PyTorch model export validates against keeps transformers' attention."""
    side = visual.window_size // visual.spatial_merge_size // visual.patch_size
    window_patches = (side * visual.spatial_merge_size) ** 2  # most patches in a window
    windowed = [blk.attn for i, blk in enumerate(visual.blocks)
                if i not in visual.fullatt_block_indexes]
    for attn in windowed:
        attn.forward = functools.partial(batched_window_attention, attn, window_patches)
    try:
        yield
    finally:
        for attn in windowed:
            del attn.forward  # the instance attribute; the class's forward shows again


class Qwen25VLVision(Qwen2VLVision):
    """Qwen2VLVision plus window_index (num_patches / merge^2,) int64 and
    cu_window_seqlens (num_window_edges = windows + 1,) int32; the windowed
    blocks attend through batched_window_attention (module docstring)."""

    def forward(self, pixel_values, vision_position_ids, window_index, cu_window_seqlens):
        with batched_windows(self.visual):
            out = self.visual(pixel_values, grid_thw=None, position_ids=vision_position_ids,
                              cu_seqlens=_one_segment(pixel_values), window_index=window_index,
                              cu_window_seqlens=cu_window_seqlens)
        return out.pooler_output[None]


def _image_only(processor_class):
    """`processor_class` constructible without a video processor: transformers'
    video processors need torchvision, which an export machine may lack, and
    images never reach them."""

    class ImageOnlyProcessor(processor_class):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    ImageOnlyProcessor.__name__ = processor_class.__name__
    return ImageOnlyProcessor


def _chat_template(path: Path, tokenizer) -> str | None:
    """The chat template where ProcessorMixin.from_pretrained looks for it."""
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text()
    if (path / "chat_template.json").is_file():
        return json.loads((path / "chat_template.json").read_text()).get("chat_template")
    return getattr(tokenizer, "chat_template", None)


class Qwen2VL(Family):
    name = "qwen2_vl"
    architectures = ("Qwen2VLForConditionalGeneration",)
    model_types = ("qwen2_vl",)
    vision_module = Qwen2VLVision
    # Vision inputs after pixel_values, computed on the host from the grid.
    grid_inputs = ("vision_position_ids",)

    def processor_class(self):
        from transformers import Qwen2VLProcessor
        return Qwen2VLProcessor

    def load_processor(self, path, trust_remote_code: bool = False):
        from transformers import AutoImageProcessor, AutoTokenizer

        path = Path(path)
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        ip = AutoImageProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
        return _image_only(self.processor_class())(
            image_processor=ip, tokenizer=tok, video_processor=None,
            chat_template=_chat_template(path, tok))

    # -- graphs ----------------------------------------------------------
    def position_ids_sample(self, batch: int, seq: int, past: int):
        # (3, B, S): rows differ as they do after an image (t, h, w sections).
        base = torch.arange(past, past + seq)
        rows = torch.stack([base, base + 1, base + 2])
        return rows[:, None, :].expand(3, batch, seq).contiguous()

    def _merge(self, model) -> int:
        return int(model.config.vision_config.spatial_merge_size)

    def trace_grid(self, model, processor) -> tuple[int, int, int]:
        return _TRACE_GRID

    def _grid_facts(self, model) -> dict[str, Any]:
        """What runtime/mrope.py needs to compute the grid inputs."""
        vc = model.config.vision_config
        return {"merge_size": self._merge(model), "patch_size": int(vc.patch_size)}

    def vision_graph(self, model, processor) -> GraphSpec:
        vc = model.config.vision_config
        grid = self.trace_grid(model, processor)
        patch_dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2
        pixels = torch.randn(grid[0] * grid[1] * grid[2], patch_dim)  # (N, C*T*P*P)
        host = mrope.vision_inputs(self.grid_inputs, grid, self._grid_facts(model))
        dims = {"pixel_values": {0: "num_patches"}, "vision_position_ids": {0: "num_patches"},
                "interp_indices": {0: "num_patches"}, "interp_weights": {0: "num_patches"},
                "window_index": {0: "num_image_tokens"},
                "cu_window_seqlens": {0: "num_window_edges"}}
        return GraphSpec("vision", self.vision_module(model),
                         (pixels, *(torch.from_numpy(host[n]) for n in self.grid_inputs)),
                         ["pixel_values", *self.grid_inputs], ["image_features"],
                         {n: d for n, d in dims.items()
                          if n in ("pixel_values",) + self.grid_inputs},
                         {"image_features": {1: "num_image_tokens"}})

    # -- validation inputs ---------------------------------------------------
    def image_grid(self, processor, image, hf_inputs: dict):
        grids = hf_inputs["image_grid_thw"].tolist()
        if len(grids) != 1:  # one image per vision call (one attention segment)
            raise ValueError(f"expected one image, got grids {grids}")
        return tuple(int(v) for v in grids[0])

    def torch_image_features(self, model, hf_inputs: dict):
        out = model.model.get_image_features(hf_inputs["pixel_values"],
                                             hf_inputs["image_grid_thw"])
        return torch.stack(list(out.pooler_output))  # (1, T, D)

    # -- manifest facts ----------------------------------------------------
    def decoder_facts(self, model, context_length: int) -> dict[str, Any]:
        tc = self.text_config(model.config)
        facts = decoder_facts(tc, context_length)
        facts["position_ids"] = "mrope"
        facts["mrope_section"] = [int(v) for v in tc.rope_parameters["mrope_section"]]
        return facts

    def preprocess_config(self, processor) -> dict[str, Any]:
        ip = processor.image_processor
        return {
            **normalization_facts(ip, "bicubic"),
            # Resizing is part of the patching: both sides to multiples of
            # patch * merge with the pixel count in [min_pixels, max_pixels].
            "resize": "none",
            "tiling": {
                "method": "qwen2_vl_patches",
                "patch_size": int(ip.patch_size),
                "temporal_patch_size": int(ip.temporal_patch_size),
                "merge_size": int(ip.merge_size),
                "min_pixels": int(ip.size["shortest_edge"]),
                "max_pixels": int(ip.size["longest_edge"]),
            },
        }

    def image_facts(self, model, processor) -> dict[str, Any]:
        vc = model.config.vision_config
        merge = self._merge(model)
        if int(processor.image_processor.merge_size) != merge or \
                int(processor.image_processor.patch_size) != vc.patch_size:
            raise ModelDirError("the image processor's patch/merge size disagrees with the model",
                                expected=f"patch_size {vc.patch_size}, merge_size {merge}",
                                got=f"{processor.image_processor.patch_size}, "
                                    f"{processor.image_processor.merge_size}")
        hf = self.hf_inputs(processor, self.sample_image(), "describe the image.")
        grid = self.image_grid(processor, None, hf)
        token = processor.image_token
        return {"image_token": token,
                "image_token_id": int(model.config.image_token_id),
                # For the validation image's grid; an image's count is t*h*w / merge^2.
                "tokens_per_image": grid[0] * grid[1] * grid[2] // merge ** 2,
                "validated_grid": list(grid),
                "feature_dim": int(self.text_config(model.config).hidden_size),
                "image_placeholder": token,
                "expand": "qwen2_vl",
                "temporal_patch_size": int(vc.temporal_patch_size),
                # Vision graph inputs computed on the host from the (t, h, w) grid.
                "vision_grid_inputs": list(self.grid_inputs),
                "images_per_vision_call": 1,
                **self._grid_facts(model)}


class Qwen25VL(Qwen2VL):
    name = "qwen2_5_vl"
    architectures = ("Qwen2_5_VLForConditionalGeneration",)
    model_types = ("qwen2_5_vl",)
    vision_module = Qwen25VLVision
    grid_inputs = Qwen2VL.grid_inputs + ("window_index", "cu_window_seqlens")

    def processor_class(self):
        from transformers import Qwen2_5_VLProcessor
        return Qwen2_5_VLProcessor

    def _grid_facts(self, model) -> dict[str, Any]:
        vc = model.config.vision_config
        return {**super()._grid_facts(model), "window_size": int(vc.window_size),
                "fullatt_block_indexes": [int(i) for i in vc.fullatt_block_indexes]}


class Qwen3VLVision(nn.Module):
    """Qwen2VLVision for Qwen3-VL's tower, plus interp_indices (num_patches, 4)
    int64 and interp_weights (num_patches, 4) float32: the bilinear taps that
    resample its learned square position table to the image's grid, computed
    on the host (runtime/mrope.py) and taken by the tower the way transformers'
    vision_utils takes them (popped from kwargs).

    -> image_features (1, T, D * (1 + L)): the merged features, then each of
    the L deepstack mergers' features, side by side on the last axis. The
    decoder splits them again (Qwen3VLDecoderWrapper); carried as one array,
    they pass through the runtime's prompt embedding like any image feature."""

    def __init__(self, model):
        super().__init__()
        self.visual = model.model.visual

    def forward(self, pixel_values, vision_position_ids, interp_indices, interp_weights):
        out = self.visual(pixel_values, grid_thw=None, position_ids=vision_position_ids,
                          cu_seqlens=_one_segment(pixel_values), interp_indices=interp_indices,
                          interp_weights=interp_weights)
        return torch.cat([out.pooler_output, *out.deepstack_features], dim=-1)[None]


@contextlib.contextmanager
def dense_deepstack(language_model):
    """While inside: Qwen3-VL's deepstack adds its (B, S, D) features to every
    position (zeros at text ones) instead of scattering them into the image
    positions by a boolean mask, a data-dependent shape; the same sums."""
    language_model._deepstack_process = lambda hidden, mask, embeds: hidden + embeds
    try:
        yield
    finally:
        del language_model._deepstack_process


class Qwen3VLDecoderWrapper(nn.Module):
    """DecoderWrapper over Qwen3-VL's text model: inputs_embeds (B, S, D * (1 + L))
    holds each token's embedding and, for image tokens, the L deepstack
    features added after the first L decoder layers (zeros for text)."""

    def __init__(self, inner, hidden: int, layers: int):
        super().__init__()
        self.inner, self.hidden, self.layers = inner, hidden, layers

    def forward(self, inputs_embeds, attention_mask, position_ids, past):
        from transformers import DynamicCache

        from .attention import grouped_attention

        b, s = inputs_embeds.shape[:2]
        main = inputs_embeds[..., :self.hidden]
        deep = inputs_embeds[..., self.hidden:].reshape(b, s, self.layers, self.hidden)
        inner = self.inner
        pairs = [(past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2)]
        cache = DynamicCache(pairs, config=inner.config)
        with grouped_attention(inner.config), dense_deepstack(inner.language_model):
            out = inner.language_model(
                inputs_embeds=main, attention_mask=attention_mask, position_ids=position_ids,
                cache=cache, use_cache=True, visual_pos_masks=None,
                deepstack_visual_embeds=[deep[:, :, i] for i in range(self.layers)])
        return inner._outputs(out)


class Qwen3VL(Qwen2VL):
    """Qwen3-VL: Qwen2.5-VL's patching (16 px patches), a learned position table
    resampled to each grid, deepstack features from three tower layers added to
    the first three decoder layers' hidden states, and interleaved mrope."""
    name = "qwen3_vl"
    architectures = ("Qwen3VLForConditionalGeneration",)
    model_types = ("qwen3_vl",)
    vision_module = Qwen3VLVision
    grid_inputs = ("vision_position_ids", "interp_indices", "interp_weights")

    def processor_class(self):
        from transformers import Qwen3VLProcessor
        return Qwen3VLProcessor

    def _layers(self, model) -> int:
        return len(model.config.vision_config.deepstack_visual_indexes)

    def _grid_facts(self, model) -> dict[str, Any]:
        vc = model.config.vision_config
        return {**super()._grid_facts(model),
                "position_grid_side": int(round(vc.num_position_embeddings ** 0.5))}

    def decoder_graph(self, model) -> GraphSpec:
        spec = super().decoder_graph(model)
        hidden, layers = spec.args[0].shape[-1], self._layers(model)
        embeds = torch.randn(*spec.args[0].shape[:2], hidden * (1 + layers))
        spec.module = Qwen3VLDecoderWrapper(spec.module, hidden, layers)
        spec.args = (embeds,) + spec.args[1:]
        return spec

    def decoder_facts(self, model, context_length: int) -> dict[str, Any]:
        return {**super().decoder_facts(model, context_length),
                "deepstack_layers": self._layers(model)}

    def torch_image_features(self, model, hf_inputs: dict):
        out = model.model.get_image_features(hf_inputs["pixel_values"],
                                             hf_inputs["image_grid_thw"])
        def whole(x):  # per-image pieces -> (T, D)
            return torch.cat(list(x)) if isinstance(x, (list, tuple)) else x

        parts = [whole(out.pooler_output)] + [whole(d) for d in out.deepstack_features]
        return torch.cat(parts, dim=-1)[None]                             # (1, T, D(1+L))

    def image_facts(self, model, processor) -> dict[str, Any]:
        facts = super().image_facts(model, processor)
        facts["feature_dim"] *= 1 + self._layers(model)
        return facts
