"""What every architecture family shares, and the hooks a family overrides.

The three graphs of an artifact (DESIGN.md, "The artifact directory"):

    vision   pixel_values (family-specific layout) -> image_features (N, T_img, D)
    embed    input_ids (batch, sequence_length) -> inputs_embeds (batch, sequence_length, D)
    decoder  inputs_embeds (batch, sequence_length, D), attention_mask (batch,
             total_sequence_length), position_ids (batch, sequence_length) [or
             (3, batch, sequence_length) for mrope], past_key_values.{i}.key|value
             (batch, kv_heads, past_sequence_length, head_dim)
             -> logits (batch, 1, vocab) for the LAST position only,
                present.{i}.key|value (batch, kv_heads, total_sequence_length, head_dim)

Only the last position's logits leave the decoder: generation needs nothing
else, and computing the LM head over a 1,000-token prompt would cost as much
as a decoder layer for nothing (vocab 49k x hidden 576 x 1000 ~ 28 GFLOP).

A family declares what differs: how to load, the vision wrapper and its
sample input, the preprocessing config, the image token, tolerances.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vlmedge.errors import UserInputError
from vlmedge.lazy import require

torch = require("torch", "exporting a model")
nn = torch.nn


@dataclass
class GraphSpec:
    """One ONNX graph to export: module, sample args and the I/O contract."""
    name: str  # "vision" | "embed" | "decoder"
    module: Any  # torch.nn.Module
    args: tuple  # sample positional args (dynamic dims traced with sizes >= 2)
    input_names: list[str]
    output_names: list[str]
    # {input name: {axis: dim name}} for dynamic axes; outputs likewise.
    input_dims: dict[str, dict[int, str]] = field(default_factory=dict)
    output_dims: dict[str, dict[int, str]] = field(default_factory=dict)


class EmbedWrapper(nn.Module):
    """input_ids (B, S) int64 -> inputs_embeds (B, S, D)."""

    def __init__(self, embedding):
        super().__init__()
        self.embedding = embedding

    def forward(self, input_ids):
        return self.embedding(input_ids)


class DecoderWrapper(nn.Module):
    """A flat-tensor interface over an HF decoder with a DynamicCache.

    forward(inputs_embeds, attention_mask, position_ids, past) where `past`
    is a list [k0, v0, k1, v1, ...] of (B, kv_heads, past_len, head_dim);
    returns (logits (B, 1, V), present list of (B, kv_heads, past_len + S, head_dim))."""

    first_position = 0  # added to position_ids (Family.first_position)
    window_limits_groups = True  # Family.window_limits_groups
    # Layers whose present keeps only the last window_rows rows (window_cache()).
    window_layers: tuple[int, ...] = ()
    window_rows: int | None = None

    def __init__(self, language_model, lm_head, config):
        super().__init__()
        self.language_model = language_model
        self.lm_head = lm_head
        self.config = config

    def forward(self, inputs_embeds, attention_mask, position_ids, past):
        from transformers import DynamicCache

        from .attention import grouped_attention

        pairs = [(past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2)]
        cache = DynamicCache(pairs, config=self.config)
        with grouped_attention(self.config):  # K/V read once per group, not repeated
            out = self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                      position_ids=self._positions(position_ids),
                                      cache=cache, use_cache=True)
        return self._outputs(out)

    def _positions(self, position_ids):
        return position_ids + self.first_position if self.first_position else position_ids

    def _outputs(self, out):
        hidden = out.last_hidden_state[:, -1:, :]  # (B, 1, D): last position only
        logits = self.lm_head(hidden)
        cap = getattr(self.config, "final_logit_softcapping", None)
        if cap is not None:  # Gemma 2/3: logits squashed into (-cap, cap)
            logits = torch.tanh(logits / cap) * cap
        present = []
        for i, layer in enumerate(out.cache.layers):
            if i in self.window_layers:  # (B, kv, min(past + S, rows), hd): the window's keys
                present += [layer.keys[:, :, -self.window_rows:],
                            layer.values[:, :, -self.window_rows:]]
            else:
                present += [layer.keys, layer.values]
        return logits, present


class GroupedDecoderWrapper(DecoderWrapper):
    """DecoderWrapper + attention_groups (B, S) int64: tokens of one group
    (>= 0; an image's tokens) attend to each other both ways, every other
    pair causally; -1 is a plain causal token (text, generated tokens).

    The masks are built here, not by transformers, so one graph holds every
    rule the model's attention has: the groups (Gemma 3's bidirectional image
    blocks), and the sliding window of the layers that have one, exact at
    any context length. Those layers' cache keeps only the window: their
    past holds the last ps <= window_rows positions, so their mask is the
    last ps + S columns of the full one, and their present is cut to the
    last window_rows rows (window_cache())."""

    def forward(self, inputs_embeds, attention_mask, position_ids, attention_groups, past):
        from transformers import DynamicCache

        from .attention import group_masks, grouped_attention

        pairs = [(past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2)]
        cache = DynamicCache(pairs)  # no config: no layer drops keys past its window
        masks = group_masks(self.config, attention_mask, attention_groups, inputs_embeds.dtype,
                            self.window_limits_groups)
        if "sliding_attention" not in (getattr(self.config, "layer_types", None) or ()):
            masks = masks["full_attention"]  # one mask for every layer (Gemma 1 takes no dict)
        elif self.window_layers:  # keys of those layers: the last ps past ones + this step's
            kept = pairs[self.window_layers[0]][0].shape[2] + inputs_embeds.shape[1]
            masks["sliding_attention"] = masks["sliding_attention"][..., -kept:]
        with grouped_attention(self.config, window_in_mask=True):
            out = self.language_model(inputs_embeds=inputs_embeds, attention_mask=masks,
                                      position_ids=self._positions(position_ids),
                                      cache=cache, use_cache=True)
        return self._outputs(out)


# Pillow's filter numbers, as HF image processors store `resample`.
RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def normalization_facts(ip, default_resample: str) -> dict[str, Any]:
    """The preprocess keys every tiling family reads the same way from its HF
    image processor `ip`: resample filter, rescale, mean/std, RGB conversion."""
    resample = RESAMPLE_NAMES.get(int(ip.resample), default_resample) \
        if ip.resample is not None else default_resample
    return {
        "processor": type(ip).__name__,
        "resample": resample,
        "rescale": float(ip.rescale_factor) if ip.do_rescale else None,
        "mean": [float(x) for x in ip.image_mean] if ip.do_normalize else None,
        "std": [float(x) for x in ip.image_std] if ip.do_normalize else None,
        "convert_rgb": bool(ip.do_convert_rgb),
    }


def sliding_window(text_config) -> int | None:
    """The decoder's effective attention window W, or None for full attention.

    Per-layer `layer_types` decide where a config has them (Gemma2 alternates;
    Qwen2 slides only from max_window_layers on); otherwise `sliding_window`
    counts unless `use_sliding_window` is False (Qwen2 configs carry a window
    they do not use). The exported decoder attends to the whole past, which
    is exact only while a sequence holds at most W tokens (HF's window mask
    lets a query see the W keys up to and including itself)."""
    window = getattr(text_config, "sliding_window", None)
    layer_types = getattr(text_config, "layer_types", None)
    if layer_types is not None:
        sliding = "sliding_attention" in layer_types
    else:
        sliding = getattr(text_config, "use_sliding_window", None) is not False
    return int(window) if sliding and window is not None else None


def window_cache(text_config) -> tuple[tuple[int, ...], int | None]:
    """The sliding-window layers whose cache a grouped decoder cuts to the
    window, and the rows each keeps: W - 1, the past keys a query at the
    window's end still sees (q - k < W). ((), None) without such layers."""
    window = getattr(text_config, "sliding_window", None)
    types = getattr(text_config, "layer_types", None) or ()
    layers = tuple(i for i, t in enumerate(types) if t == "sliding_attention")
    if window is None or int(window) < 2 or not layers:
        return (), None
    return layers, int(window) - 1


def decoder_facts(text_config, context_length: int) -> dict[str, Any]:
    """The manifest's `decoder` section for a Llama/Qwen2-style decoder;
    context_length is at most the sliding window (`Family.max_context`)."""
    heads = text_config.num_attention_heads
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
    return {
        "num_layers": text_config.num_hidden_layers,
        "num_attention_heads": heads,
        "num_kv_heads": getattr(text_config, "num_key_value_heads", None) or heads,
        "head_dim": head_dim,
        "hidden_size": text_config.hidden_size,
        "vocab_size": text_config.vocab_size,
        "context_length": context_length,
        "past_key": "past_key_values.{i}.key",
        "past_value": "past_key_values.{i}.value",
        "present_key": "present.{i}.key",
        "present_value": "present.{i}.value",
        "logits": "last",
        "position_ids": "1d",
        "sliding_window": sliding_window(text_config),  # int, or None: full attention
        "attention_groups": None,
    }


class Family:
    """Base of the registered families. Subclasses set the class attributes
    and implement `vision_graph`, `preprocess_config` and `image_facts`."""

    name: str = ""
    architectures: tuple[str, ...] = ()
    model_types: tuple[str, ...] = ()
    # Per-output tolerances for fp32 validation against PyTorch: absolute for
    # logits; image features x max(1, their largest magnitude) (export/validate.py).
    tolerances = {"image_features": 1e-4, "logits": 1e-4}
    # fp16 graphs (GPU) against the fp32 PyTorch model: rounding of 11-bit mantissas.
    tolerances_fp16 = {"image_features": 5e-2, "logits": 1e-1}
    # None, or the decoder takes attention_groups (GroupedDecoderWrapper) by
    # this rule (manifest.GROUP_RULES: "images" | "prompt"), and its sliding
    # window is a mask in the graph.
    attention_groups: str | None = None
    # Whether a sliding window also limits a group's both-way attention (Gemma 3:
    # AND(window, OR(causal, group))) or a group sees itself whole (PaliGemma 2:
    # OR(window AND causal, group)), as each model's transformers code composes them.
    window_limits_groups: bool = True
    # Where the prompt's positions start (PaliGemma counts from 1): added to
    # position_ids inside the decoder graph, so the runtime's stay 0-based.
    first_position: int = 0
    # The token type transformers gives a generated token (validation's
    # recompute extends token_type_ids with it): text 0; PaliGemma's suffix 1.
    generated_token_type: int = 0

    # -- loading ---------------------------------------------------------
    def check_config(self, config) -> None:
        """Raise UnsupportedArchitectureError for a config this family takes
        by name but cannot export (called before anything is loaded)."""

    def configure_processor(self, processor, pan_and_scan: bool = False) -> None:
        """Set the processor's call options the export asked for (before the
        weights load: a refusal is cheap). Only Gemma 3 crops (pan-and-scan)."""
        if pan_and_scan:
            raise UserInputError("--pan-and-scan applies to Gemma 3 models",
                                 got=f"a {self.name} model",
                                 hint="leave --pan-and-scan out for this model")

    def load_processor(self, path, trust_remote_code: bool = False):
        """The HF processor for a model directory (AutoProcessor by default)."""
        from transformers import AutoProcessor
        return AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)

    def text_config(self, config):
        return config.text_config

    def language_model(self, model):
        return model.model.language_model

    def lm_head(self, model):
        return model.lm_head

    # -- graphs ----------------------------------------------------------
    def embed_graph(self, model) -> GraphSpec:
        ids = torch.randint(0, self.text_config(model.config).vocab_size, (2, 5))
        return GraphSpec("embed", EmbedWrapper(model.get_input_embeddings()), (ids,),
                         ["input_ids"], ["inputs_embeds"],
                         {"input_ids": {0: "batch", 1: "sequence_length"}},
                         {"inputs_embeds": {0: "batch", 1: "sequence_length"}})

    def position_ids_sample(self, batch: int, seq: int, past: int):
        return (torch.arange(past, past + seq)[None, :]).expand(batch, seq).contiguous()

    def decoder_graph(self, model) -> GraphSpec:
        tc = self.text_config(model.config)
        facts = decoder_facts(tc, 0)
        # Trace with batch 2, sequence 3, past 4: 0 and 1 get specialised away.
        b, s, p = 2, 3, 4
        embeds = torch.randn(b, s, tc.hidden_size)
        mask = torch.ones(b, p + s, dtype=torch.long)
        pos = self.position_ids_sample(b, s, p)
        past, in_names, in_dims, out_names, out_dims = [], [], {}, ["logits"], {}
        out_dims["logits"] = {0: "batch"}
        windowed, rows = window_cache(tc) if self.attention_groups else ((), None)
        for i in range(facts["num_layers"]):
            # A window layer's past is traced shorter than the others' (its own dim).
            cut = i in windowed
            rows_i = max(1, min(p - 1, rows)) if cut else p
            for kind in ("key", "value"):
                past.append(torch.randn(b, facts["num_kv_heads"], rows_i, facts["head_dim"]))
                name = f"past_key_values.{i}.{kind}"
                in_names.append(name)
                in_dims[name] = {0: "batch", 2: "past_window_length" if cut
                                 else "past_sequence_length"}
                out = f"present.{i}.{kind}"
                out_names.append(out)
                out_dims[out] = {0: "batch", 2: "present_window_length" if cut
                                 else "total_sequence_length"}
        pos_dims = {0: "batch", 1: "sequence_length"} if pos.dim() == 2 else \
            {1: "batch", 2: "sequence_length"}
        names = ["inputs_embeds", "attention_mask", "position_ids"]
        dims = {"inputs_embeds": {0: "batch", 1: "sequence_length"},
                "attention_mask": {0: "batch", 1: "total_sequence_length"},
                "position_ids": pos_dims}
        wrapper, args = DecoderWrapper, (embeds, mask, pos)
        if self.attention_groups:  # a group of 2 mid-chunk: both-way attention is traced
            groups = torch.tensor([[-1, 0, 0]] * b)
            wrapper, args = GroupedDecoderWrapper, args + (groups,)
            names.append("attention_groups")
            dims["attention_groups"] = {0: "batch", 1: "sequence_length"}
        module = wrapper(self.language_model(model), self.lm_head(model), tc)
        module.first_position = self.first_position
        module.window_limits_groups = self.window_limits_groups
        module.window_layers, module.window_rows = windowed, rows
        return GraphSpec("decoder", module, args + (past,), names + in_names, out_names,
                         {**dims, **in_dims}, out_dims)

    def vision_graph(self, model, processor) -> GraphSpec:
        raise NotImplementedError

    # -- manifest facts ----------------------------------------------------
    def decoder_facts(self, model, context_length: int) -> dict[str, Any]:
        facts = decoder_facts(self.text_config(model.config), context_length)
        if self.attention_groups:  # the window is a mask in the graph: no context cap
            facts.update(attention_groups=self.attention_groups, sliding_window=None)
            layers, rows = window_cache(self.text_config(model.config))
            if layers:
                facts.update(window_layers=list(layers), window_cache=rows)
        return facts

    def preprocess_config(self, processor) -> dict[str, Any]:
        raise NotImplementedError

    def image_facts(self, model, processor) -> dict[str, Any]:
        raise NotImplementedError

    def sliding_window(self, model) -> int | None:
        """The window that caps the context the artifact serves (see
        `sliding_window`); None where the graph applies the window itself."""
        if self.attention_groups:
            return None
        return sliding_window(self.text_config(model.config))

    def max_context(self, model) -> int:
        """The most tokens the artifact serves: the model's position limit, and
        at most its sliding window, past which the exported decoder (full
        attention over the whole past) would answer differently."""
        limit = int(getattr(self.text_config(model.config), "max_position_embeddings", 2048))
        window = self.sliding_window(model)
        return limit if window is None else min(limit, window)

    # -- validation inputs ---------------------------------------------------
    def sample_image(self):
        """A fixed, real-looking image for validation: a demo scene."""
        from vlmedge.demo import scenes
        return scenes.make_scene(scenes.EVAL_SEED_BASE + 777).image

    def hf_inputs(self, processor, image, question: str) -> dict:
        """Processor output (torch tensors) for one image + question, via the
        model's own chat template."""
        messages = [{"role": "user", "content": [{"type": "image"},
                                                 {"type": "text", "text": question}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
        return dict(processor(images=image, text=text, return_tensors="pt"))

    def image_grid(self, processor, image, hf_inputs: dict):
        """The image layout the runtime needs besides pixel_values (passed as
        `image_grid` to ChatTokenizer.prompt_ids and VLMSession.encode_image /
        prefill), as the processor saw it; None where the layout is fixed."""
        return None

    def vision_args(self, hf_inputs: dict) -> tuple:
        """The vision graph's positional inputs taken from the processor output."""
        return (hf_inputs["pixel_values"],)

    def torch_image_features(self, model, hf_inputs: dict):
        """PyTorch reference for the vision graph's output, (N, T_img, D)."""
        raise NotImplementedError


class ImageFeatures(nn.Module):
    """pixel_values (N, 3, H, W) -> image_features (N, T, D_text): the model's own
    get_image_features (tower, pooling, projector), for families whose image is
    one fixed-size view (Gemma 3, PaliGemma)."""

    def __init__(self, model):
        super().__init__()
        self.model = model.model

    def forward(self, pixel_values):
        return self.model.get_image_features(pixel_values).pooler_output


class FixedSizeImages(Family):
    """A family whose image is resized to the processor's (height, width), no
    tiling, and encoded by the model's get_image_features."""

    def image_size(self, processor) -> tuple[int, int]:
        size = processor.image_processor.size
        return int(size["height"]), int(size["width"])

    def vision_graph(self, model, processor) -> GraphSpec:
        pixels = torch.randn(2, 3, *self.image_size(processor))
        return GraphSpec("vision", ImageFeatures(model), (pixels,), ["pixel_values"],
                         ["image_features"], {"pixel_values": {0: "batch"}},
                         {"image_features": {0: "batch"}})

    def torch_image_features(self, model, hf_inputs: dict):
        return model.model.get_image_features(hf_inputs["pixel_values"]).pooler_output

    def preprocess_config(self, processor) -> dict[str, Any]:
        from vlmedge.runtime.preprocess import config_from_hf
        return {**config_from_hf(processor.image_processor.to_dict()), "tiling": None}

    def sample_features(self, model, processor):
        """The vision graph's output for one blank image, (1, T, D)."""
        with torch.no_grad():
            return ImageFeatures(model)(torch.zeros(1, 3, *self.image_size(processor)))

