"""manifest.json: the versioned contract between vlm-export and the runtime,
parsed strictly into typed sections before anything runs.

An artifact directory holds ONNX files (and their external weight data), the
tokenizer and this manifest, written last (after validation). An artifact is
untrusted input, so `load` checks everything here, in one place:

- the JSON is an object of at most MAX_MANIFEST_BYTES with a known
  schema_version (older ones are migrated, newer ones refused);
- every section is parsed by `Manifest.from_dict` into the dataclasses below:
  an unknown, missing or mistyped key is one ArtifactError naming the key
  (`decoder.num_layers`), with bounds on every number a loader would
  allocate by;
- every file name is a relative path inside the artifact
  (vlmedge/containment.py), every file a component or the tokenizer opens is
  listed in `files`, and every listed file is a regular file inside the
  directory with the recorded size and (with verify) sha256.

Sections (schema 2):

    schema_version   int; older versions are migrated (MIGRATIONS), newer refused
    vlmedge_version  exporter version
    family           "llava" | "idefics3" | "smolvlm" | "qwen2_vl" | "qwen2_5_vl"
                     | "llava_next" | "llava_onevision" | "internvl" | "gemma3"
                     | "paligemma" | "qwen3_vl"
    target           "onnx" | "trt";  precision "fp32" | "fp16" | "int8" | "int8-dynamic"
                     | "int4" (weight-only: MatMulNBits in the ort flavour, int4
                     DequantizeLinear blocks in the portable one) | "int4-fp16"
                     (those blocks with fp16 scales and activations: TensorRT)
    source           Source: path, architecture, content_hash, random_weights
    files            {name: FileEntry(sha256, bytes)} for every file the runtime opens
    components       {vision|embed|decoder: Component(file, data_file, precision,
                     inputs, outputs)}, and optionally decoder_ort: a second
                     decoder graph in the ort flavour beside a portable
                     "decoder" (vlm-export --decoder-flavour both; the runtime
                     picks one by provider), with vision_ort beside it: the
                     vision graph with onnxruntime's fused attention/GELU,
                     reading the weights file of "vision" (the same tensors,
                     other nodes); inputs/outputs are TensorSpec(name,
                     dtype, shape) with ints or named dynamic dims ("batch", ...)
    decoder          Decoder: layers, heads, sizes, context_length (the most
                     tokens served: a sliding-window model's window), past/present
                     name templates with "{i}", logits "last", position_ids "1d" |
                     "mrope" (+ mrope_section), sliding_window, attention_groups
                     (None, "images" or "prompt": an extra input, the tokens that
                     attend both ways in the prefill), deepstack_layers (Qwen3-VL:
                     inputs_embeds is hidden_size x (1 + L) wide), window_layers
                     and window_cache (layers whose cache keeps only the last
                     window_cache rows: sliding-window layers); flavour
                     "portable" (standard ops: position_ids input, present =
                     concat(past, new)) | "ort" (onnxruntime's GroupQueryAttention
                     with rotary inside, no position_ids, one preallocated KV
                     buffer per layer shared by past and present: runtime/decoders.py)
    image            ImageFacts: the image token, tokens per image, feature size,
                     how the placeholder expands ("repeat" | "idefics3" |
                     "qwen2_vl" | "anyres" | "internvl" | "wrap", runtime/chat.py) and that
                     expansion's facts (anyres: grid pinpoints, anyres_max_tiles
                     and the learned image_newline vector the host packs with;
                     internvl: the <img> / </img> tokens around its tiles; wrap:
                     the text around one image's tokens, Gemma 3's; qwen2_vl:
                     the vision graph's host inputs, Qwen3-VL's position_grid_side);
                     max_image_tokens, the default image-token budget (optional)
    preprocess       the runtime's ImagePreprocessor config (resize rule, size,
                     resample, rescale, mean/std, crop, tiling); its keys are
                     checked by runtime/preprocess.py when a session opens
    tokenizer        TokenizerFacts: file, chat_template, special tokens,
                     stop_token_ids (a list), add_special_tokens
    quantization     None or Quantization(method, cpu_only) + the gate's report
                     (calibration/report.py; more in calibration_report.json)
    validation       None or the parity report (max |d logits|, tokens_match, ...)
    trt              None or the TensorRT plan and, after `vlm-export
                     build-engines`, engines {component: {file, sha256, bytes,
                     profiles}}, tensorrt_version, compute_capability

The report sections (quantization's details, validation, trt) are kept as
JSON objects: they record what was measured and the runtime reads only the
typed fields named above.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from . import containment
from . import precision as precision_mod
from .errors import ArtifactError

SCHEMA_VERSION = 2
MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 16 << 20  # a chat template is kilobytes; 16 MiB is not a manifest
MAX_DEPTH = 32  # JSON nesting (a real manifest nests 7 deep; deeper is hostile)

FAMILIES = ("llava", "idefics3", "smolvlm", "qwen2_vl", "qwen2_5_vl", "llava_next",
            "llava_onevision", "internvl", "gemma3", "paligemma", "qwen3_vl")
TARGETS = ("onnx", "trt")
PRECISIONS = precision_mod.NAMES  # vlmedge/precision.py says what each means
FLAVOURS = ("portable", "ort")
COMPONENTS = ("vision", "embed", "decoder")
# A second decoder graph, in the ort flavour, beside a portable "decoder"
# (--decoder-flavour both): each provider runs the flavour it runs best.
ORT_DECODER = "decoder_ort"
# Beside it, the vision graph with onnxruntime's fused ops for that flavour
# (export/vision_fusion.py): it reads the weights file of "vision", which keeps
# the standard ops TensorRT and the other providers run.
ORT_VISION = "vision_ort"
OPTIONAL_COMPONENTS = (ORT_DECODER, ORT_VISION)
# Which prefill tokens attend to each other both ways (decoder.attention_groups):
# each image's tokens (Gemma 3), or the whole prompt, a prefix-LM (PaliGemma).
GROUP_RULES = ("images", "prompt")
EXPANDS = ("repeat", "idefics3", "qwen2_vl", "anyres", "internvl", "wrap")
GRID_INPUTS = ("vision_position_ids", "cu_seqlens", "window_index", "cu_window_seqlens",
               "interp_indices", "interp_weights")
# Upper bounds on what a loader sizes memory by: far above any real model, far
# below what would make a hostile manifest allocate terabytes.
MAX_CONTEXT = 1 << 22
MAX_VOCAB = 1 << 24
MAX_DIM = 1 << 20

_REQUIRED = object()
_HINT = "re-export the artifact with this vlmedge, or upgrade vlmedge"


# -- the typed sections ------------------------------------------------------------

@dataclass(frozen=True)
class FileEntry:
    sha256: str
    bytes: int


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple  # ints (fixed) or strings (named dynamic dims)


@dataclass(frozen=True)
class Component:
    file: str
    data_file: str | None
    precision: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def input(self, name: str) -> TensorSpec | None:
        return next((t for t in self.inputs if t.name == name), None)


@dataclass(frozen=True)
class Source:
    path: str
    architecture: str
    content_hash: str
    random_weights: bool


@dataclass(frozen=True)
class Decoder:
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    context_length: int
    past_key: str
    past_value: str
    present_key: str
    present_value: str
    logits: str
    position_ids: str
    mrope_section: tuple[int, ...] | None
    sliding_window: int | None
    flavour: str = "portable"  # FLAVOURS; absent in older manifests: portable
    # None, or the decoder takes attention_groups (batch, sequence_length) int64:
    # tokens of one group attend to each other both ways, the rest causally;
    # GROUP_RULES says which tokens form a group (runtime/decoders.py).
    attention_groups: str | None = None
    # Qwen3-VL's deepstack: inputs_embeds is (batch, S, hidden_size * (1 +
    # deepstack_layers)), each image token's features for the first layers'
    # hidden states beside its embedding (zeros for text).
    deepstack_layers: int = 0
    # Layers whose cache keeps only the last `window_cache` rows: the
    # sliding-window layers of a grouped decoder (Gemma 2/3), whose present is
    # cut to the window in the graph, so context past the window costs them
    # no memory. Their past/present take the dims past_window_length /
    # present_window_length. () and None: every layer keeps its whole past.
    window_layers: tuple[int, ...] = ()
    window_cache: int | None = None

    @property
    def inputs_width(self) -> int:
        return self.hidden_size * (1 + self.deepstack_layers)

    def past_names(self) -> list[str]:
        return [t.format(i=i) for i in range(self.num_layers)
                for t in (self.past_key, self.past_value)]

    def present_names(self) -> list[str]:
        return [t.format(i=i) for i in range(self.num_layers)
                for t in (self.present_key, self.present_value)]


@dataclass(frozen=True)
class ImageFacts:
    image_token: str
    image_token_id: int
    tokens_per_image: int
    feature_dim: int
    image_placeholder: str
    expand: str
    # idefics3
    image_seq_len: int | None = None
    fake_image_token: str | None = None
    global_image_token: str | None = None
    tile_token: str | None = None
    tile_size: int | None = None
    do_image_splitting: bool | None = None
    # qwen2_vl / qwen2_5_vl
    merge_size: int | None = None
    patch_size: int | None = None
    temporal_patch_size: int | None = None
    validated_grid: tuple[int, ...] | None = None
    vision_grid_inputs: tuple[str, ...] = ()
    images_per_vision_call: int | None = None
    window_size: int | None = None
    fullatt_block_indexes: tuple[int, ...] | None = None
    window_count: int | None = None
    position_grid_side: int | None = None  # qwen3_vl: side of its learned position table
    # anyres (llava_next, llava_onevision; tile_size and patch_size too): the
    # [height, width] resolutions an image is tiled at, OneVision's K of
    # "anyres_max_K" (None: no shrinking), the newline vector (feature_dim,)
    grid_pinpoints: tuple[tuple[int, int], ...] | None = None
    anyres_max_tiles: int | None = None
    image_newline: tuple[float, ...] | None = None
    # internvl (image_seq_len and tile_size too): the tokens around an image's
    # tiles' context tokens, <img> ... </img>
    image_start_token: str | None = None
    image_end_token: str | None = None
    # the artifact's default image-token budget (vlm-export --max-image-tokens)
    max_image_tokens: int | None = None


@dataclass(frozen=True)
class TokenizerFacts:
    file: str
    chat_template: str
    bos_token: str | None
    eos_token: str | None
    pad_token: str | None
    stop_token_ids: tuple[int, ...]
    add_special_tokens: bool

    def special_tokens(self) -> dict[str, str | None]:
        return {"bos_token": self.bos_token, "eos_token": self.eos_token,
                "pad_token": self.pad_token}


@dataclass(frozen=True)
class Quantization:
    method: str
    cpu_only: bool
    report: dict  # the rest of the section as written (calibration/report.py)


@dataclass(frozen=True)
class Manifest:
    schema_version: int
    vlmedge_version: str
    family: str
    target: str
    precision: str
    source: Source
    files: dict[str, FileEntry]
    components: dict[str, Component]
    decoder: Decoder
    image: ImageFacts
    preprocess: dict
    tokenizer: TokenizerFacts
    quantization: Quantization | None
    validation: dict | None
    trt: dict | None
    raw: dict = field(repr=False, compare=False)

    @classmethod
    def from_dict(cls, d: Any, where: str = MANIFEST) -> "Manifest":
        """Strict parse (after migrating an older schema) -> Manifest, or an
        ArtifactError naming the first bad key."""
        d = migrate(d, where)
        r = _Obj(d, "", where)
        files = {containment.check_name(k, f"files[{k!r}]"): _file_entry(v, f"files.{k}", where)
                 for k, v in r.get("files", _type(dict)).items()}
        m = cls(
            schema_version=r.get("schema_version", int),
            vlmedge_version=r.get("vlmedge_version", str),
            family=r.get("family", _enum(FAMILIES)),
            target=r.get("target", _enum(TARGETS)),
            precision=r.get("precision", _enum(PRECISIONS)),
            source=_source(r.obj("source")),
            files=files,
            components=_components(r.obj("components"), files),
            decoder=_decoder(r.obj("decoder")),
            image=_image(r.obj("image")),
            preprocess=r.get("preprocess", _type(dict)),
            tokenizer=_tokenizer(r.obj("tokenizer"), files),
            quantization=_quantization(r.obj("quantization", optional=True)),
            validation=r.get("validation", _optional(_type(dict))),
            trt=_trt(r.obj("trt", optional=True), files),
            raw=d,
        )
        r.end()
        _cross_check(m, where)
        for tid in m.tokenizer.stop_token_ids:
            if tid >= m.decoder.vocab_size:
                raise _bad(where, "tokenizer.stop_token_ids", f"ids < vocab_size "
                           f"{m.decoder.vocab_size}", tid)
        return m

    def to_dict(self) -> dict:
        return copy.deepcopy(self.raw)

    @property
    def decoder_flavours(self) -> tuple[str, ...]:
        """The decoder flavours this artifact holds: decoder.flavour's graph
        ("decoder"), then the ort flavour's second graph where there is one."""
        return (self.decoder.flavour,) + (("ort",) if ORT_DECODER in self.components else ())

    def decoder_component(self, flavour: str) -> str:
        """The component holding `flavour`'s decoder graph."""
        return "decoder" if flavour == self.decoder.flavour else ORT_DECODER

    def vision_component(self, flavour: str) -> str:
        """The component holding the vision graph that `flavour`'s decoder runs
        beside: the fused one for the ort flavour where the artifact has it."""
        return ORT_VISION if flavour == "ort" and ORT_VISION in self.components else "vision"

    def flavour_components(self, flavour: str) -> dict[str, str]:
        """{vision|embed|decoder: the component that role loads} for `flavour`."""
        return {"vision": self.vision_component(flavour), "embed": "embed",
                "decoder": self.decoder_component(flavour)}

    def component_files(self, component: str) -> tuple[str, ...]:
        """The files of one component: its graph and its weights file, if any."""
        c = self.components[component]
        return (c.file,) + ((c.data_file,) if c.data_file else ())


# How each image expansion may be preprocessed (runtime/adapters/, runtime/
# preprocess.py): the tiling methods its adapter takes (None: one resized view).
_EXPAND_TILING = {"repeat": (None,), "idefics3": ("idefics3",),
                  "qwen2_vl": ("qwen2_vl_patches",), "anyres": ("anyres",),
                  "internvl": ("internvl",), "wrap": (None, "pan_and_scan")}


def _ort_blame(m: "Manifest", expected: str) -> tuple[str, str, str]:
    """(key, expected, got) for _bad where the ort flavour may not be: the key
    that holds it is decoder.flavour 'ort', or the second decoder component."""
    if m.decoder.flavour == "ort":
        return "decoder.flavour", expected, "ort"
    return f"components.{ORT_DECODER}", expected, "a second decoder in the ort flavour"


def _cross_check(m: "Manifest", where: str) -> None:
    """Sections that must agree with each other, checked here rather than
    failing deep inside the runtime."""
    tiling = m.preprocess.get("tiling")
    method = tiling.get("method") if isinstance(tiling, dict) else tiling
    want = _EXPAND_TILING[m.image.expand]
    if method not in want:
        raise _bad(where, "preprocess.tiling", f"tiling {' or '.join(map(repr, want))} for "
                   f"image expansion {m.image.expand!r}", method)
    if (m.decoder.position_ids == "mrope") != (m.image.expand == "qwen2_vl"):
        raise _bad(where, "decoder.position_ids", "'mrope' exactly for image expansion "
                   "'qwen2_vl'", m.decoder.position_ids)
    if ORT_VISION in m.components and ORT_DECODER not in m.components:
        raise _bad(where, f"components.{ORT_VISION}", f"only beside a {ORT_DECODER} component "
                   f"(the fused vision graph of --decoder-flavour both)", "no second decoder")
    if ORT_DECODER in m.components and m.decoder.flavour != "portable":
        raise _bad(where, "decoder.flavour", f"'portable' beside a {ORT_DECODER} component "
                   f"(the second decoder is the ort flavour)", m.decoder.flavour)
    if "ort" in m.decoder_flavours and m.decoder.position_ids != "1d":
        raise _bad(where, *_ort_blame(m, "the portable decoder flavour alone for mrope "
                   "positions (the ort flavour computes 1-D rotary positions inside its "
                   "attention)"))
    if m.image.feature_dim != m.decoder.inputs_width:
        raise _bad(where, "image.feature_dim", f"decoder.hidden_size x (1 + deepstack_layers) "
                   f"= {m.decoder.inputs_width}", m.image.feature_dim)
    if "ort" in m.decoder_flavours and m.decoder.attention_groups:
        raise _bad(where, *_ort_blame(m, "the portable decoder flavour alone for a decoder "
                   "with attention groups (the ort flavour's attention is causal only)"))
    if "ort" in m.decoder_flavours and m.target == "trt":
        raise _bad(where, *_ort_blame(m, "the portable decoder flavour alone for target "
                   "'trt' (TensorRT has no onnxruntime contrib ops)"))
    if m.image.image_token_id >= m.decoder.vocab_size and m.image.expand != "repeat":
        raise _bad(where, "image.image_token_id", f"< vocab_size {m.decoder.vocab_size}",
                   m.image.image_token_id)


# -- reading JSON strictly -----------------------------------------------------------

def _bad(where: str, key: str, expected: str, got: Any) -> ArtifactError:
    text = repr(got)
    return ArtifactError(f"{where}: bad manifest key {key}", expected=expected,
                         got=text if len(text) <= 80 else text[:77] + "...", hint=_HINT)


class _Obj:
    """A JSON object read key by key; `end()` refuses keys nobody read."""

    def __init__(self, value: Any, prefix: str, where: str):
        if not isinstance(value, dict):
            raise _bad(where, prefix.rstrip(".") or "(top level)", "a JSON object", value)
        self.d, self.prefix, self.where, self.seen = value, prefix, where, set()

    def get(self, key: str, check: Callable, default: Any = _REQUIRED) -> Any:
        self.seen.add(key)
        name = self.prefix + key
        if key not in self.d:
            if default is _REQUIRED:
                raise ArtifactError(f"{self.where}: manifest key {name} is missing", hint=_HINT)
            return default
        try:
            return check(self.d[key])
        except _Mismatch as e:
            raise _bad(self.where, name, e.expected, self.d[key]) from None

    def obj(self, key: str, optional: bool = False) -> "_Obj | None":
        value = self.get(key, lambda v: v)
        if value is None and optional:
            return None
        return _Obj(value, self.prefix + key + ".", self.where)

    def end(self) -> None:
        unknown = sorted(set(self.d) - self.seen)
        if unknown:
            key = unknown[0] if unknown[0].isidentifier() else repr(unknown[0])
            raise ArtifactError(f"{self.where}: unknown manifest key {self.prefix}{key}",
                                expected="the keys of manifest schema "
                                         f"{SCHEMA_VERSION} (vlmedge/manifest.py)", hint=_HINT)


class _Mismatch(Exception):
    def __init__(self, expected: str):
        self.expected = expected


def _type(kind, expected: str | None = None):
    def check(v):
        # bool is an int in Python but never a count in a manifest
        if isinstance(v, kind) and not (kind in (int, float) and isinstance(v, bool)):
            return v
        raise _Mismatch(expected or f"a JSON {kind.__name__}")
    return check


def _int(lo: int = 0, hi: int = MAX_DIM):
    def check(v):
        if isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi:
            return v
        raise _Mismatch(f"an integer in {lo}..{hi}")
    return check


def _enum(values):
    def check(v):
        if v in values:
            return v
        raise _Mismatch(" | ".join(map(repr, values)))
    return check


def _optional(check):
    def opt(v):
        return None if v is None else check(v)
    return opt


def _list(check, min_len: int = 0, max_len: int = 4096):
    def lst(v):
        if not isinstance(v, list) or not min_len <= len(v) <= max_len:
            raise _Mismatch(f"a list of {min_len}..{max_len} items")
        return tuple(check(x) for x in v)
    return lst


def _template(*placeholders: str):
    """A name template whose only fields are `placeholders` ("{i}")."""
    def check(v):
        if not isinstance(v, str) or not v or len(v) > 256:
            raise _Mismatch("a name template string")
        rest = v
        for p in placeholders:
            if p not in rest:
                raise _Mismatch(f"a template containing {p}")
            rest = rest.replace(p, "")
        if "{" in rest or "}" in rest:
            raise _Mismatch(f"a template whose only fields are {', '.join(placeholders)}")
        return v
    return check


_str = _type(str)
_bool = _type(bool)


def _sha256(v):
    if isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v):
        return v
    raise _Mismatch("a sha256 hex digest (64 lowercase hex digits)")


def _file_entry(v: Any, prefix: str, where: str) -> FileEntry:
    r = _Obj(v, prefix + ".", where)
    e = FileEntry(r.get("sha256", _sha256), r.get("bytes", _int(0, 1 << 50)))
    r.end()
    return e


def _listed(files: dict, key: str):
    def check(v):
        containment.check_name(v, key)
        if v not in files:
            raise ArtifactError(f"manifest {key} names {v!r}, which is not listed (and so not "
                                f"hashed) in the manifest's files", hint=_HINT)
        return v
    return check


# -- sections -------------------------------------------------------------------------

def _source(r: _Obj) -> Source:
    s = Source(r.get("path", _str), r.get("architecture", _str), r.get("content_hash", _str),
               r.get("random_weights", _bool))
    r.end()
    return s


def _tensor_specs(v) -> tuple[TensorSpec, ...]:
    if not isinstance(v, list) or len(v) > 4096:
        raise _Mismatch("a list of {name, dtype, shape}")
    out = []
    for item in v:
        if not isinstance(item, dict) or set(item) != {"name", "dtype", "shape"}:
            raise _Mismatch("a list of {name, dtype, shape} objects")
        name, dtype, shape = item["name"], item["dtype"], item["shape"]
        if not isinstance(name, str) or not isinstance(dtype, str) or not isinstance(shape, list) \
                or len(shape) > 8 or not all(
                    (isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= MAX_CONTEXT * 64)
                    or (isinstance(d, str) and 0 < len(d) <= 64) for d in shape):
            raise _Mismatch("{name: str, dtype: str, shape: [int >= 0 or dim name]}")
        out.append(TensorSpec(name, dtype, tuple(shape)))
    return tuple(out)


def _components(r: _Obj, files: dict) -> dict[str, Component]:
    out = {}
    for comp in COMPONENTS + OPTIONAL_COMPONENTS:
        if comp in OPTIONAL_COMPONENTS and comp not in r.d:
            continue
        c = r.obj(comp)
        out[comp] = Component(
            file=c.get("file", _listed(files, f"components.{comp}.file")),
            data_file=c.get("data_file", _optional(_listed(files, f"components.{comp}.data_file"))),
            precision=c.get("precision", _str),
            inputs=c.get("inputs", _tensor_specs),
            outputs=c.get("outputs", _tensor_specs))
        c.end()
    r.end()
    return out


def _decoder(r: _Obj) -> Decoder:
    position_ids = r.get("position_ids", _enum(("1d", "mrope")))
    d = Decoder(
        num_layers=r.get("num_layers", _int(1, 1024)),
        num_attention_heads=r.get("num_attention_heads", _int(1, 4096)),
        num_kv_heads=r.get("num_kv_heads", _int(1, 4096)),
        head_dim=r.get("head_dim", _int(1, 1 << 16)),
        hidden_size=r.get("hidden_size", _int(1, MAX_DIM)),
        vocab_size=r.get("vocab_size", _int(1, MAX_VOCAB)),
        context_length=r.get("context_length", _int(2, MAX_CONTEXT)),
        past_key=r.get("past_key", _template("{i}")),
        past_value=r.get("past_value", _template("{i}")),
        present_key=r.get("present_key", _template("{i}")),
        present_value=r.get("present_value", _template("{i}")),
        logits=r.get("logits", _enum(("last",))),
        position_ids=position_ids,
        mrope_section=r.get("mrope_section", _optional(_list(_int(0, 1 << 16), 3, 3)), None),
        sliding_window=r.get("sliding_window", _optional(_int(1, MAX_CONTEXT))),
        flavour=r.get("flavour", _enum(FLAVOURS), "portable"),
        attention_groups=r.get("attention_groups", _optional(_enum(GROUP_RULES)), None),
        deepstack_layers=r.get("deepstack_layers", _int(0, 64), 0),
        window_layers=r.get("window_layers", _list(_int(0, 1023), 0, 1024), ()),
        window_cache=r.get("window_cache", _optional(_int(1, MAX_CONTEXT)), None),
    )
    r.end()
    if (d.window_cache is None) != (not d.window_layers):
        raise _bad(r.where, "decoder.window_cache", "an integer exactly when window_layers "
                   "lists layers", d.window_cache)
    if len(set(d.window_layers)) != len(d.window_layers) or \
            any(i >= d.num_layers for i in d.window_layers):
        raise _bad(r.where, "decoder.window_layers", f"distinct layer indices < num_layers "
                   f"{d.num_layers}", list(d.window_layers))
    if d.window_layers and not d.attention_groups:
        raise _bad(r.where, "decoder.window_layers", "none without attention_groups (only the "
                   "grouped decoder graph cuts a layer's cache to its window)",
                   list(d.window_layers))
    if position_ids == "mrope" and d.mrope_section is None:
        raise _bad(r.where, "decoder.mrope_section", "3 integers for position_ids 'mrope'", None)
    if d.sliding_window is not None and d.context_length > d.sliding_window:
        raise _bad(r.where, "decoder.context_length", f"<= sliding_window {d.sliding_window} "
                   "(the exported decoder attends fully)", d.context_length)
    return d


_IMAGE_NEEDS = {
    "idefics3": ("image_seq_len", "fake_image_token", "global_image_token", "tile_token",
                 "tile_size", "do_image_splitting"),
    "qwen2_vl": ("merge_size", "patch_size", "temporal_patch_size", "vision_grid_inputs",
                 "images_per_vision_call"),
    "anyres": ("tile_size", "patch_size", "grid_pinpoints", "image_newline"),
    "internvl": ("image_seq_len", "tile_size", "image_start_token", "image_end_token"),
    "wrap": ("image_start_token", "image_end_token"),
}


def _finite(v):
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
        return float(v)
    raise _Mismatch("a finite number")


def _image(r: _Obj) -> ImageFacts:
    expand = r.get("expand", _enum(EXPANDS))
    opt_int = _optional(_int(1, MAX_DIM))
    facts = ImageFacts(
        image_token=r.get("image_token", _str),
        image_token_id=r.get("image_token_id", _int(0, MAX_VOCAB)),
        tokens_per_image=r.get("tokens_per_image", _int(1, MAX_CONTEXT)),
        feature_dim=r.get("feature_dim", _int(1, MAX_DIM)),
        image_placeholder=r.get("image_placeholder", _str),
        expand=expand,
        image_seq_len=r.get("image_seq_len", opt_int, None),
        fake_image_token=r.get("fake_image_token", _optional(_str), None),
        global_image_token=r.get("global_image_token", _optional(_str), None),
        tile_token=r.get("tile_token", _optional(_template("{row}", "{col}")), None),
        tile_size=r.get("tile_size", _optional(_int(1, 8192)), None),
        do_image_splitting=r.get("do_image_splitting", _optional(_bool), None),
        merge_size=r.get("merge_size", _optional(_int(1, 64)), None),
        patch_size=r.get("patch_size", _optional(_int(1, 1024)), None),
        temporal_patch_size=r.get("temporal_patch_size", _optional(_int(1, 64)), None),
        validated_grid=r.get("validated_grid", _optional(_list(_int(1, 1 << 16), 3, 3)), None),
        vision_grid_inputs=r.get("vision_grid_inputs", _list(_enum(GRID_INPUTS), 0, 4), ()),
        images_per_vision_call=r.get("images_per_vision_call", opt_int, None),
        window_size=r.get("window_size", opt_int, None),
        fullatt_block_indexes=r.get("fullatt_block_indexes", _optional(_list(_int(0, 4096))),
                                    None),
        window_count=r.get("window_count", opt_int, None),
        position_grid_side=r.get("position_grid_side", opt_int, None),
        grid_pinpoints=r.get("grid_pinpoints", _optional(_list(_list(_int(1, 1 << 16), 2, 2),
                                                                1, 256)), None),
        anyres_max_tiles=r.get("anyres_max_tiles", _optional(_int(1, 4096)), None),
        image_newline=r.get("image_newline", _optional(_list(_finite, 1, MAX_DIM)), None),
        image_start_token=r.get("image_start_token", _optional(_str), None),
        image_end_token=r.get("image_end_token", _optional(_str), None),
        max_image_tokens=r.get("max_image_tokens", _optional(_int(1, MAX_CONTEXT)), None),
    )
    r.end()
    for key in _IMAGE_NEEDS.get(expand, ()):
        if getattr(facts, key) in (None, ()) and key != "vision_grid_inputs":
            raise ArtifactError(f"{r.where}: manifest key image.{key} is missing (needed by "
                                f"image expansion {expand!r})", hint=_HINT)
    if facts.image_newline is not None and len(facts.image_newline) != facts.feature_dim:
        raise _bad(r.where, "image.image_newline", f"{facts.feature_dim} numbers (feature_dim)",
                   f"{len(facts.image_newline)} numbers")
    if "interp_indices" in facts.vision_grid_inputs and facts.position_grid_side is None:
        raise ArtifactError(f"{r.where}: manifest key image.position_grid_side is missing "
                            f"(needed by the vision input interp_indices)", hint=_HINT)
    if ("window_index" in facts.vision_grid_inputs
            and (facts.window_size is None or facts.patch_size is None)):
        raise ArtifactError(f"{r.where}: manifest key image.window_size is missing (needed by "
                            f"the vision input window_index)", hint=_HINT)
    return facts


def _tokenizer(r: _Obj, files: dict) -> TokenizerFacts:
    t = TokenizerFacts(
        file=r.get("file", _listed(files, "tokenizer.file")),
        chat_template=r.get("chat_template", _type(str, "the chat template (a string)")),
        bos_token=r.get("bos_token", _optional(_str)),
        eos_token=r.get("eos_token", _optional(_str)),
        pad_token=r.get("pad_token", _optional(_str)),
        stop_token_ids=r.get("stop_token_ids", _list(_int(0, MAX_VOCAB), 1, 64)),
        add_special_tokens=r.get("add_special_tokens", _bool))
    r.end()
    return t


def _quantization(r: _Obj | None) -> Quantization | None:
    if r is None:
        return None
    q = Quantization(method=r.get("method", _str), cpu_only=r.get("cpu_only", _bool),
                     report=r.d)
    # The rest is the gate's report (calibration/report.py): recorded, not acted on.
    r.seen |= set(r.d)
    return q


def _trt(r: _Obj | None, files: dict) -> dict | None:
    if r is None:
        return None
    engines = r.get("engines", _optional(_type(dict)), None) or {}
    if engines and set(engines) != set(COMPONENTS):
        raise _bad(r.where, "trt.engines", f"an engine for each of {', '.join(COMPONENTS)}",
                   sorted(engines))
    for comp, e in engines.items():
        er = _Obj(e, f"trt.engines.{comp}.", r.where)
        er.get("file", _listed(files, f"trt.engines.{comp}.file"))
        er.get("sha256", _sha256)
        er.seen |= set(er.d)  # bytes, profiles: build facts
        # The runtime reads each engine's optimization-profile names from the plan.
        plan = r.get("plan", _type(dict))
        pc = plan.get("components", {}).get(comp) if isinstance(plan.get("components"),
                                                                dict) else None
        profiles = pc.get("profiles") if isinstance(pc, dict) else None
        if not isinstance(profiles, list) or not profiles or not all(
                isinstance(p, dict) and isinstance(p.get("name"), str) for p in profiles):
            raise _bad(r.where, f"trt.plan.components.{comp}.profiles",
                       "a list of {name, ...} profiles", profiles)
    # The plan, compat report and build facts are recorded for people and tools.
    r.seen |= set(r.d)
    return r.d


# -- schema migrations ------------------------------------------------------------------

def _v1_to_v2(d: dict) -> dict:
    """Schema 1 left optional what schema 2 spells out: defaults made explicit."""
    for key in ("quantization", "validation", "trt"):
        d.setdefault(key, None)
    if isinstance(d.get("decoder"), dict):
        dec = d["decoder"]
        dec.setdefault("logits", "last")
        dec.setdefault("position_ids", "1d")
        dec.setdefault("sliding_window", None)
        dec.setdefault("num_attention_heads", dec.get("num_kv_heads"))
    if isinstance(d.get("image"), dict):
        d["image"].setdefault("expand", "repeat")
    if isinstance(d.get("tokenizer"), dict):
        d["tokenizer"].setdefault("add_special_tokens", False)
    if isinstance(d.get("components"), dict):
        for c in d["components"].values():
            if isinstance(c, dict):
                c.setdefault("data_file", None)
    d["schema_version"] = 2
    return d


MIGRATIONS: dict[int, Callable[[dict], dict]] = {1: _v1_to_v2}


def migrate(d: Any, where: str = MANIFEST) -> dict:
    """A manifest dict of any known schema -> schema SCHEMA_VERSION (a copy)."""
    if not isinstance(d, dict):
        raise _bad(where, "(top level)", "a JSON object", type(d).__name__)
    if _depth(d) > MAX_DEPTH:
        raise ArtifactError(f"{where} nests deeper than {MAX_DEPTH} levels", hint=_HINT)
    version = d.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise _bad(where, "schema_version", "an integer >= 1", version)
    if version > SCHEMA_VERSION:
        raise ArtifactError(f"{where} uses manifest schema {version}, newer than this runtime",
                            expected=f"schema <= {SCHEMA_VERSION}",
                            hint="upgrade vlmedge (pip install -U vlmedge)")
    d = copy.deepcopy(d)
    while d["schema_version"] < SCHEMA_VERSION:
        d = MIGRATIONS[d["schema_version"]](d)
    return d


# -- files --------------------------------------------------------------------------------

def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_entry(path: Path) -> dict[str, Any]:
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def write(directory: Path, manifest: "dict[str, Any] | Manifest") -> Path:
    """Writes manifest.json atomically (temp file + rename), after the same
    strict parse the runtime applies: an exporter bug fails here, not on the
    device."""
    d = manifest.to_dict() if isinstance(manifest, Manifest) else manifest
    try:
        Manifest.from_dict(d, where="the manifest being written")
    except ArtifactError as e:  # a bug in the writer, not user input
        raise ValueError(f"refusing to write an invalid manifest: {e}") from None
    path = Path(directory) / MANIFEST
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(d, indent=2, sort_keys=False, allow_nan=False) + "\n")
    tmp.replace(path)
    return path


def read_json(directory: Path | str) -> dict:
    """manifest.json of `directory` as a dict (no checks beyond JSON): for
    tools that edit an artifact they made. The runtime uses `load`."""
    return _read(Path(directory))[0]


def _read(directory: Path) -> tuple[Any, Path]:
    if not directory.exists():
        raise ArtifactError(f"artifact directory {directory} does not exist",
                            hint="export one with: vlm-export --model demo")
    if not directory.is_dir():
        raise ArtifactError(f"artifact path {directory} is a file, not an artifact directory",
                            expected="the directory vlm-export wrote (it holds manifest.json)")
    path = directory / MANIFEST
    if not os.path.lexists(path):
        raise ArtifactError(f"{directory} has no {MANIFEST}",
                            expected="an artifact directory written by vlm-export",
                            hint="an export that failed or was interrupted leaves none; re-export")
    real = containment.resolve_inside(directory, MANIFEST, MANIFEST)
    if real.stat().st_size > MAX_MANIFEST_BYTES:
        raise ArtifactError(f"{path} is too large for a manifest",
                            expected=f"<= {MAX_MANIFEST_BYTES} bytes",
                            got=f"{real.stat().st_size} bytes", hint="re-export the artifact")
    data = containment.read_bytes(real, MANIFEST)
    try:
        d = json.loads(data, parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        # ValueError covers JSONDecodeError, NaN/Infinity and over-long integers
        raise ArtifactError(f"{path} is not valid JSON ({str(e)[:120]})",
                            hint="re-export the artifact") from None
    if _depth(d) > MAX_DEPTH:
        raise ArtifactError(f"{path} nests deeper than {MAX_DEPTH} levels",
                            expected="a manifest written by vlm-export", hint="re-export the artifact")
    return d, path


def _depth(node, level: int = 0) -> int:
    """Nesting depth of a JSON value, without recursing past MAX_DEPTH + 1."""
    if level > MAX_DEPTH or not isinstance(node, (dict, list)):
        return level
    children = node.values() if isinstance(node, dict) else node
    return max((_depth(c, level + 1) for c in children), default=level + 1)


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def load(directory: Path | str, verify: bool = True) -> Manifest:
    """Reads, parses and checks an artifact's manifest -> Manifest.

    Raises ArtifactError for: a missing directory or manifest, a path that is
    a file, invalid JSON, a newer schema, an unknown/missing/mistyped key, a
    file name outside the artifact, a missing or resized file, and (with
    verify) a file whose sha256 differs from the manifest's: tampered or
    corrupt."""
    directory = Path(directory)
    d, path = _read(directory)
    m = Manifest.from_dict(d, where=str(path))
    check_files(directory, m, verify)
    return m


def check_files(directory: Path | str, m: Manifest, verify: bool = True) -> None:
    """Every listed file: inside the artifact, a regular file of the recorded
    size, and (verify) of the recorded sha256."""
    for name, entry in m.files.items():
        real = containment.resolve_inside(directory, name, f"files[{name!r}]")
        size = real.stat().st_size
        if size != entry.bytes:
            raise ArtifactError(f"artifact file {name} has the wrong size (truncated, corrupt or "
                                f"tampered)", expected=f"{entry.bytes} bytes", got=f"{size} bytes",
                                hint="re-export or re-copy the artifact")
        if verify:
            try:
                got = sha256_file(real)
            except OSError as e:
                raise ArtifactError(f"artifact file {name} cannot be read: {e.strerror or e}",
                                    hint="check the artifact directory's permissions") from None
            if got != entry.sha256:
                raise ArtifactError(
                    f"artifact file {name} does not match its manifest sha256 (corrupt or "
                    f"tampered)", expected=entry.sha256[:16] + "...", got=got[:16] + "...",
                    hint="re-export or re-copy the artifact")
