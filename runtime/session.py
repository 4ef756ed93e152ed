"""VLMSession: load an artifact directory and answer questions about images.

    from vlmedge.runtime import VLMSession
    s = VLMSession("demo-onnx-fp32")
    r = s.generate("frame.jpg", "what color is the circle?")
    r.text, r.token_ids, r.timings["ttft_ms"]

Pipeline per call: image -> pixel_values and image grid (C preprocessing;
the grid is the tile or patch layout where the family has one) -> vision
graph -> image_features (N, T_img, D); prompt ids (chat template, <image>
expanded to the image's tokens, as many as its grid needs) -> embed graph ->
inputs_embeds (1, S, D) with the image tokens' rows replaced by the image
features; decoder prefill with an empty cache, then one-token decode steps
reusing the KV cache.

Opening checks the artifact before anything runs (vlmedge/manifest.py): the
manifest parsed strictly, every file it names inside the directory, listed
and (verify) hashed, the graphs' external weight data among those files, and
the graphs' inputs and outputs equal to what the manifest says.

Threads: a call holds the session lock only while the model runs a stage
(prepare = preprocess + vision + prefill, then each decode step), never while
the caller holds a streamed piece: a half-read stream() blocks nothing, and
every call's state (KV cache, sampler, timings) is its own. Preprocessing
buffers are per thread. With native TensorRT engines each live generation
holds KV-cache slots on the device (runtime/trt_backend.py, at most 4 a
session): more generations at once than that is a clear TensorRTError, so
use one session per concurrent stream there.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from vlmedge import containment
from vlmedge import manifest as manifest_mod
from vlmedge import precision as precision_mod
from vlmedge.errors import ArtifactError, ContextOverflowError, UserInputError

from . import grounding, sampling
from .adapters.base import MAX_IMAGES
from .backends import OrtBackend, check_threads, resolve_providers, warn
from .chat import ChatTokenizer, StreamDecoder
from .decoders import open_decoder, pick_flavour
from .kv_cache import KVCache


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    # "stop_token" | "stop_string" | "max_new_tokens" | "constraint_complete"
    stop_reason: str
    timings: dict[str, Any] = field(default_factory=dict)
    # With choices: the choice; with json_schema: the parsed JSON; else None.
    value: Any = None
    # Grounding boxes in the answer (runtime/grounding.py Box, original image
    # pixels): filled where the family has a convention and there is one image.
    boxes: list = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "token_ids": self.token_ids, "prompt_tokens": self.prompt_tokens,
                "stop_reason": self.stop_reason, "timings": self.timings, "value": self.value,
                "boxes": [b.to_dict() for b in self.boxes]}


@dataclass
class EncodedImage:
    """An image run through preprocessing and the vision graph once
    (VLMSession.encode), to be passed where an image goes: generate(),
    stream() and the watch loop then skip both stages, and the KV cache of
    each prompt prefix up to and including the image tokens is kept, so a
    further question prefills only its own tokens."""
    features: np.ndarray          # (N, T_img, D) image_features
    grid: Any                     # the tile/patch grid (None for fixed-size families)
    timings: dict[str, float]     # preprocess_ms, vision_ms
    owner: int                    # id() of the session that made it
    prefixes: dict = field(default_factory=dict, repr=False)  # prefix ids -> KVCache
    image_size: tuple[int, int] | None = None  # (w, h) of the original image (grounding boxes)

    # Distinct prompt prefixes kept. With native TensorRT engines each kept
    # prefix holds a device KV slot (4 a session) until the EncodedImage goes.
    MAX_PREFIXES = 8


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000.0


class VLMSession:
    """An artifact directory opened for inference.

    provider: "auto" (CUDA if onnxruntime-gpu has it, else CPU), "cpu", "cuda"
    or "trt": native TensorRT engines where `vlm-export build-engines` built
    them (also picked by "auto" where TensorRT imports), else onnxruntime's
    TensorRT EP. An unavailable explicit provider is an error unless
    allow_fallback=True, which uses CPU and warns.
    threads: intra-op threads per graph (None: onnxruntime's default).
    verify: check every file's sha256 against the manifest before loading
    (sizes and containment are always checked).
    manifest: the manifest as a dict or Manifest instead of the directory's
    manifest.json: the exporter opens its staged artifact this way, before it
    writes manifest.json (last, after validation).
    max_image_tokens: this session's default image-token budget (None: the
    manifest's image.max_image_tokens, else the artifact's own preprocessing);
    each call can set its own (image_budget.py).
    decoder_flavour: "portable" | "ort" | None (the artifact's best for the
    provider: an artifact exported with --decoder-flavour both runs its ort
    decoder on onnxruntime's CPU provider, its portable one elsewhere,
    CUDA included; runtime/decoders.py pick_flavour). The flavour run is
    `session.decoder_flavour`.
    A session is safe to use from several threads (see the module docstring;
    use one session per thread for parallel throughput)."""

    def __init__(self, artifact_dir: str | Path, provider: str = "auto",
                 threads: int | None = None, allow_fallback: bool = False, verify: bool = True,
                 manifest: "manifest_mod.Manifest | dict | None" = None,
                 max_image_tokens: int | None = None, decoder_flavour: str | None = None):
        check_threads(threads)
        if not isinstance(provider, str):
            raise UserInputError("provider must be a string", got=type(provider).__name__)
        self.directory = Path(artifact_dir)
        if manifest is None:
            m = manifest_mod.load(self.directory, verify=verify)
        else:
            if not isinstance(manifest, manifest_mod.Manifest):
                manifest = manifest_mod.Manifest.from_dict(manifest, where="the given manifest")
            m = manifest
            manifest_mod.check_files(self.directory, m, verify)
        self.manifest = m
        if m.source.random_weights:
            warn(f"{self.directory} was exported with random weights: answers are "
                 f"meaningless (use it for latency planning only)")
        if _native_trt(m, provider):  # engines built on the device (runtime/trt_backend.py)
            from .trt_backend import open_engines
            self.decoder_flavour = pick_flavour(m, ["TensorrtExecutionProvider"],
                                                decoder_flavour)
            engines = open_engines(self.directory, m)
            self.vision, self.embed, self.decoder = (engines[c] for c in ("vision", "embed",
                                                                          "decoder"))
        else:
            providers, note = resolve_providers(provider, allow_fallback)
            if note:
                warn(note)
            if m.quantization is not None and m.quantization.cpu_only and \
                    providers[0] != "CPUExecutionProvider":
                warn("this artifact is int8-dynamic (CPU-only); running on CPU")
                providers = ["CPUExecutionProvider"]
            # which decoder graph: the flavour this provider runs best (or the caller's)
            self.decoder_flavour = pick_flavour(m, providers, decoder_flavour)
            # the flavour's graphs: its decoder and, beside the ort one, the fused vision
            roles = m.flavour_components(self.decoder_flavour)
            # The embedding is a row gather: one thread does it, and a thread pool
            # of its own woken between decoder steps cost ~50 us a token (2 cores).
            self.vision, self.embed, self.decoder = (
                OrtBackend(self._graph_path(roles[r]), providers,
                           1 if r == "embed" and providers[0] == "CPUExecutionProvider"
                           else threads)
                for r in ("vision", "embed", "decoder"))
        self._check_graph_io()
        self.providers = self.decoder.providers
        self.facts = m.decoder            # typed: vlmedge.manifest.Decoder
        self.image_facts = m.image        # typed: vlmedge.manifest.ImageFacts
        self.chat = ChatTokenizer(self.directory, m.tokenizer, m.image, m.files)
        self.context_length = self.facts.context_length
        self._lock = threading.Lock()
        # A prompt's prefill may start from a cached prefix (ask, an EncodedImage's
        # reuse) unless the whole prompt is one block attending both ways
        # (PaliGemma's prefix-LM): its prefix's keys depend on every later token.
        self._prefix_reuse = self.facts.attention_groups != "prompt"
        self._local = threading.local()  # per-thread preprocessing buffers
        self._dtype = _float_dtype(m, self.decoder_flavour)  # the graphs' floats
        # The decoder flavour's runner (runtime/decoders.py); positions are the
        # family adapter's: 1-D (Llama) or mrope (Qwen, 3 rows from the image grid).
        self.adapter = self.chat.adapter  # picked once from the manifest (runtime/adapters/)
        self._runner = open_decoder(self.decoder, m, self.adapter.positions(self.facts),
                                    self._dtype, self.decoder_flavour)
        self.preprocessor  # the manifest's preprocess config checked now, not on first image
        if max_image_tokens is not None and (not isinstance(max_image_tokens, int) or
                                             isinstance(max_image_tokens, bool) or
                                             max_image_tokens < 1):
            raise UserInputError("max_image_tokens must be a positive integer",
                                 got=repr(max_image_tokens)[:40])
        # the caller's budget, else the artifact's default (vlm-export --max-image-tokens)
        self.max_image_tokens = max_image_tokens if max_image_tokens is not None \
            else m.image.max_image_tokens
        self.last_timings: dict[str, Any] = {}

    def _graph_path(self, comp: str) -> Path:
        """The checked path of a component's graph: listed, inside, and its
        external weight data only the component's own listed data file."""
        c = self.manifest.components[comp]
        return containment.checked_graph(self.directory, c.file, f"components.{comp}.file",
                                         self.manifest.files,
                                         allowed={c.data_file} if c.data_file else set())

    def _check_graph_io(self) -> None:
        """The graphs' inputs/outputs are the ones the manifest describes: a
        manifest that disagrees (num_layers, name templates) fails here, not
        with a KeyError after the prefill."""
        f = self.manifest.decoder
        want = {
            "vision": ({"pixel_values", *self.manifest.image.vision_grid_inputs},
                       {"image_features"}),
            "embed": ({"input_ids"}, {"inputs_embeds"}),
            "decoder": ({"inputs_embeds", "attention_mask", *f.past_names()} |
                        ({"position_ids"} if self.decoder_flavour == "portable" else set()) |
                        ({"attention_groups"} if f.attention_groups else set()),
                        {"logits", *f.present_names()}),
        }
        for comp, (inputs, outputs) in want.items():
            backend = getattr(self, comp)
            got_in, got_out = set(backend.input_names), set(backend.output_names)
            if got_in != inputs or not outputs <= got_out:
                missing = sorted((inputs - got_in) | (outputs - got_out))
                extra = sorted(got_in - inputs)
                raise ArtifactError(
                    f"the {comp} graph's inputs/outputs disagree with the manifest (decoder."
                    f"num_layers={f.num_layers}, name templates, image.vision_grid_inputs)",
                    expected=f"missing {missing[:4]}" if missing else "no extra inputs",
                    got=f"graph lacks {missing[:4]}, has unexpected inputs {extra[:4]}",
                    hint="re-export the artifact")

    # -- stages ------------------------------------------------------------
    @property
    def preprocessor(self):
        """This thread's C image preprocessing pipeline for this artifact
        (its output buffers are reused by the next call in the same thread)."""
        pre = getattr(self._local, "pre", None)
        if pre is None:
            from .preprocess import ImagePreprocessor
            try:
                pre = ImagePreprocessor(self.manifest.preprocess)
            except UserInputError as e:
                raise ArtifactError(f"manifest preprocess section: {e}",
                                    hint="re-export the artifact") from None
            self._local.pre = pre
        return pre

    def _preprocess(self, image, layout: str, max_image_tokens: int | None = None,
                    several: bool = False) -> tuple[np.ndarray, Any]:
        """preprocess() without the copy: the buffer is consumed by the caller's
        stage. max_image_tokens: the budget (None: the session's default);
        several: the image shares its prompt with others (the adapter's tiling
        for that: LLaVA-OneVision's differs)."""
        from .image_io import load_image
        rgb = load_image(image, layout=layout)
        budget = max_image_tokens if max_image_tokens is not None else self.max_image_tokens
        tiling = own = self.preprocessor.config["tiling"]
        if several:
            tiling = self.adapter.several_tiling(tiling)
        if budget is not None:
            from .image_budget import budget_tiling
            tiling = budget_tiling(tiling, self.image_facts, rgb.shape[:2], budget)
        pixels, grid = self.preprocessor.preprocess(rgb, tiling=None if tiling is own else tiling)
        # The original (w, h) and grid of this thread's last image: generate()
        # reads grounding boxes back into its pixels (_boxes).
        self._local.seen = ((int(rgb.shape[1]), int(rgb.shape[0])), grid)
        return pixels, grid

    def preprocess(self, image, layout: str = "RGB", copy: bool = True
                   ) -> tuple[np.ndarray, Any]:
        """Any supported image -> (pixel_values float32, image_grid), the inputs
        of encode_image, chat.prompt_ids and prefill for this artifact:
        (1, 3, H, W) and None (llava); (N, 3, S, S) tiles and (rows, cols)
        (idefics3); (num_patches, 3*T*P*P) and (t, h, w) patches (qwen2_vl).
        The array is the caller's own (a copy of this thread's reused buffer;
        copy=False hands out the buffer itself, valid until this thread's next
        call: for timing loops). See ImagePreprocessor.preprocess."""
        _check_single_image(image, "preprocess()")
        pixels, grid = self._preprocess(image, layout)
        return (pixels.copy() if copy else pixels), grid

    def pixel_values(self, image, layout: str = "RGB") -> np.ndarray:
        """Any supported image -> float32 pixel_values ((1, 3, H, W) for llava;
        preprocess() gives the shapes of the other families, and their grid)."""
        return self.preprocess(image, layout)[0]

    def encode(self, image, layout: str = "RGB", max_image_tokens: int | None = None,
               several: bool = False) -> EncodedImage:
        """Preprocess and encode `image` once, for several questions or for
        frames that did not change (see EncodedImage); several images: one
        encode() each, passed to generate() as a list, with several=True
        (LLaVA-OneVision encodes an image beside others differently; other
        families ignore it)."""
        _check_single_image(image, "encode()")
        if isinstance(image, EncodedImage):
            return image
        timings: dict[str, float] = {}
        with self._lock:
            t = time.perf_counter()
            pixels, grid = self._preprocess(image, layout, max_image_tokens, several)
            timings["preprocess_ms"] = _ms(t)
            t = time.perf_counter()
            feats = self.encode_image(pixels, grid)
            timings["vision_ms"] = _ms(t)
        return EncodedImage(feats, grid, timings, id(self), image_size=self._local.seen[0])

    def encode_image(self, pixel_values: np.ndarray, image_grid=None) -> np.ndarray:
        """pixel_values -> image_features (N, T_img, D).

        pixel_values is (N, 3, H, W) images or tiles, except for qwen2_vl:
        (num_patches, 3 * temporal_patch * patch * patch) flattened patches of
        one image, whose (t, h, w) patch grid `image_grid` gives the patches'
        coordinates (computed here, on the host)."""
        # The family's adapter feeds the graph (tiles one at a time, or one call
        # with host-computed grid inputs) and turns its output into the prompt's
        # features (anyres: packed by the image size). runtime/adapters/
        vision = self.manifest.components[self.manifest.vision_component(self.decoder_flavour)]
        shapes = {t.name: list(t.shape) for t in vision.inputs}
        return self.adapter.encode(self._vision, list(self.vision.input_names), pixel_values,
                                   image_grid, shapes)

    def _vision(self, feeds: dict) -> np.ndarray:
        """One vision graph call: image_features (N, T_img, D). Every float
        input takes the graphs' dtype: the pixels, and the host-computed
        grid inputs that are floats (Qwen3-VL's bilinear tap weights)."""
        for name, value in feeds.items():
            if value.dtype.kind == "f":
                feeds[name] = value.astype(self._dtype, copy=False)
        return self.vision.run(feeds)["image_features"]

    def embed_prompt(self, ids: list[int], image_features: np.ndarray | None) -> np.ndarray:
        """ids (S,) -> inputs_embeds (1, S, D), image token rows replaced by
        the image features in order (as LlavaModel's masked_scatter does)."""
        arr = np.asarray(ids, np.int64)[None, :]
        is_image = arr[0] == self.chat.image_token_id
        # The image token id can lie outside the embedding table (some checkpoints
        # add it after training); its rows are overwritten anyway.
        safe = np.where(arr == self.chat.image_token_id, 0, arr) if is_image.any() else arr
        embeds = self._widen(self.embed.run({"input_ids": safe})["inputs_embeds"])
        if is_image.any():
            if image_features is None:
                raise UserInputError("the prompt has image tokens but no image was given")
            feats = image_features.reshape(-1, image_features.shape[-1])
            if feats.shape[0] != int(is_image.sum()):
                raise ArtifactError("image tokens and image features disagree",
                                    expected=f"{feats.shape[0]} image tokens",
                                    got=str(int(is_image.sum())))
            embeds = embeds.copy() if not embeds.flags.writeable else embeds
            embeds[0, is_image] = feats.astype(embeds.dtype, copy=False)
        return embeds

    def step(self, inputs_embeds: np.ndarray, cache: KVCache, ids: list[int] | None = None,
             image_grid=None) -> tuple[np.ndarray, KVCache]:
        """One decoder call: inputs_embeds (1, S, D) after `cache` -> (logits (V,), new cache).

        ids (the S token ids of inputs_embeds) and image_grid are needed only
        where positions follow the image layout (mrope) and the chunk holds
        image tokens; `prefill` passes them."""
        return self._runner.step(self.decoder, inputs_embeds, cache, ids, image_grid)

    def prefill(self, ids: list[int], image_features: np.ndarray | None, cache: KVCache,
                image_grid=None) -> tuple[np.ndarray, KVCache]:
        """Prompt ids (S,) after `cache` -> (logits (V,), new cache): embeds
        them (image tokens replaced by `image_features`) and runs the decoder.
        image_grid: the image's grid where the artifact needs it (qwen2_vl)."""
        return self.step(self.embed_prompt(ids, image_features), cache, ids, image_grid)

    def empty_cache(self) -> KVCache:
        return self._runner.empty_cache()

    def embed_token(self, token: int) -> np.ndarray:
        return self._widen(self.embed.run({"input_ids": np.array([[token]], np.int64)})
                           ["inputs_embeds"])

    def _widen(self, embeds: np.ndarray) -> np.ndarray:
        """(1, S, D) text embeddings -> (1, S, decoder.inputs_width): zeros where a
        deepstack decoder (Qwen3-VL) takes image tokens' extra features."""
        width = self.facts.inputs_width
        if embeds.shape[-1] == width:
            return embeds
        out = np.zeros(embeds.shape[:-1] + (width,), embeds.dtype)
        out[..., :embeds.shape[-1]] = embeds
        return out

    # -- generation ----------------------------------------------------------
    def _check_context(self, prompt_tokens: int, max_new_tokens: int) -> None:
        if prompt_tokens + max_new_tokens > self.context_length:
            raise ContextOverflowError(
                "prompt + image tokens + max_new_tokens exceed the context length",
                expected=f"<= {self.context_length}",
                got=f"{prompt_tokens} prompt (incl. image) + {max_new_tokens} new",
                hint="shorten the prompt, lower max_new_tokens, or re-export with --max-context"
                     + (f" (this model's sliding window is {self.facts.sliding_window})"
                        if self.facts.sliding_window else ""))

    def decode(self, logits: np.ndarray, cache: KVCache, max_new_tokens: int, *,
               temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
               repetition_penalty: float | None = None, seed: int | None = None,
               stop: list[str] | None = None, constraint=None, force_length: bool = False,
               ignore_stop_tokens: bool = False, timings: dict | None = None,
               t_start: float | None = None) -> Iterator[int]:
        """The decode primitive, public: tokens from a prefill's `logits` (V,)
        and `cache` (see prefill). force_length: stop tokens masked, exactly
        max_new_tokens tokens (benchmarks); ignore_stop_tokens: stop tokens
        may be chosen but do not stop (validation against a reference that
        ignores them). `timings`, if given, receives decode_ms (per token),
        ttft_ms (from t_start), tokens_per_s, stop_reason, kv_cache_bytes
        (the final cache's size), kv_cache_rows (the positions those bytes
        hold room for) and last_logits (the model's logits the
        last token was chosen from; with force_length, its stop tokens masked)."""
        sampling.check(temperature, top_k, top_p, repetition_penalty)
        opts = dict(temperature=temperature, top_k=top_k, top_p=top_p,
                    repetition_penalty=repetition_penalty)
        timings = {} if timings is None else timings
        return self._decode(logits, cache, max_new_tokens, np.random.default_rng(seed), opts,
                            stop, timings, time.perf_counter() if t_start is None else t_start,
                            constraint, force_length, ignore_stop_tokens, state=timings)

    def _decode(self, logits, cache, max_new_tokens, rng, opts, stop, timings, t_start,
                constraint=None, force_length=False, ignore_stop_tokens=False, state=None,
                cancel=None):
        """The decode loop every generation path uses (generate, stream, ask,
        the watch loop, vlm-bench): yields tokens from the prefill's `logits`
        and `cache` until a stop token, a stop string, a constraint's whole
        answer or max_new_tokens. `constraint` (runtime/constrained.py) masks
        the logits before each token. The lock is taken per decoder step and
        released before each yield."""
        history: list[int] = []
        decode_ms: list[float] = []
        timings["decode_ms"] = decode_ms
        stop_ids = set(self.chat.stop_token_ids)
        stop_list = [t for t in stop_ids if t < logits.shape[0]]
        # decode_ms[i]: sampling token i plus the decoder step that yields the
        # logits for token i+1; the consumer's time between tokens is excluded.
        for i in range(max_new_tokens):
            if cancel is not None and cancel.is_set():
                timings["stop_reason"] = "cancelled"
                break
            t = time.perf_counter()
            if state is not None:  # decode()'s callers: the model's logits (before any
                state["last_logits"] = logits  # mask but force_length's, applied in place)
            if constraint is not None:
                if constraint.must_stop():
                    timings["stop_reason"] = "constraint_complete"
                    break
                allowed = constraint.allowed()[:logits.shape[0]]
                if constraint.complete():
                    allowed[stop_list] = True
                logits = np.where(allowed, logits, -np.inf).astype(np.float32)
            if force_length:  # a benchmark's forced length: never stop early
                if i == 0:  # a prefill's logits may be a cached prefix's: not ours to mask
                    logits = logits.copy()
                # every decoder's step() returns a new array (runtime/decoders.py), so
                # a step's logits are this loop's alone
                logits[stop_list] = -np.inf
            token = sampling.next_token(logits, history, rng, **opts)
            sample_ms = _ms(t)
            if i == 0:
                timings["ttft_ms"] = _ms(t_start)
            if token in stop_ids and not ignore_stop_tokens:
                timings["stop_reason"] = "stop_token"
                break
            if constraint is not None:
                constraint.advance(token)
            history.append(token)
            yield token
            if i + 1 == max_new_tokens:
                break
            if stop and any(s in self.chat.decode(history) for s in stop):
                timings["stop_reason"] = "stop_string"
                break
            t = time.perf_counter()
            with self._lock:
                logits, cache = self.step(self.embed_token(token), cache)
            decode_ms.append(sample_ms + _ms(t))
        timings.setdefault("stop_reason", "max_new_tokens")
        timings["new_tokens"] = len(history)
        if constraint is not None and constraint.must_stop():
            timings["stop_reason"] = "constraint_complete"
        timings["kv_cache_bytes"] = cache.nbytes
        # the rows that memory holds: a shared buffer's capacity, else the length
        timings["kv_cache_rows"] = cache.buffer.capacity if cache.buffer is not None \
            else cache.length
        n = len(decode_ms)
        timings["tokens_per_s"] = n / (sum(decode_ms) / 1000.0) if n else 0.0

    def _prepare(self, image, prompt: str, max_new_tokens: int, layout: str, timings: dict,
                 max_image_tokens: int | None = None):
        """Preprocess, vision and prefill for one request (under the lock)."""
        if isinstance(image, (list, tuple)):  # several images; one keeps the one-image path
            if len(image) > 1:
                return self._prepare_several(image, prompt, max_new_tokens, layout, timings,
                                             max_image_tokens)
            image = image[0] if image else None
        if isinstance(image, EncodedImage):
            return self._prepare_encoded(image, prompt, max_new_tokens, timings)
        pixels = grid = feats = None
        with self._lock:
            if image is not None:
                t = time.perf_counter()
                pixels, grid = self._preprocess(image, layout, max_image_tokens)
                timings["preprocess_ms"] = _ms(t)
            # The image's token count follows its grid (idefics3 tiles, qwen2_vl patches).
            ids = self.chat.prompt_ids(prompt, with_image=image is not None, image_grid=grid)
            self._check_context(len(ids), max_new_tokens)  # before the model runs
            if pixels is not None:
                t = time.perf_counter()
                feats = self.encode_image(pixels, grid)
                timings["vision_ms"] = _ms(t)
            t = time.perf_counter()
            logits, cache = self.prefill(ids, feats, self.empty_cache(), grid)
            timings["prefill_ms"] = _ms(t)
        return ids, logits, cache

    def _constraint(self, choices, json_schema):
        from .constrained import constraint_for
        return constraint_for(self.chat, self.facts.vocab_size, self.chat.stop_token_ids,
                              choices=choices, json_schema=json_schema)

    def _prepare_encoded(self, enc: EncodedImage, prompt: str, max_new_tokens: int,
                         timings: dict):
        """_prepare for an EncodedImage: no preprocessing or vision; the prompt
        prefix through the image tokens from its cache where it was seen."""
        if enc.owner != id(self):
            raise UserInputError("this EncodedImage was made by another session",
                                 hint="encode the image with the session that answers")
        timings.update(enc.timings, image_reused=True)
        ids = self.chat.prompt_ids(prompt, with_image=True, image_grid=enc.grid)
        self._check_context(len(ids), max_new_tokens)
        image_at = np.flatnonzero(np.asarray(ids) == self.chat.image_token_id)
        cut = int(image_at[-1]) + 1 if image_at.size else 0
        t = time.perf_counter()
        with self._lock:
            if cut == 0 or cut >= len(ids) or not self._prefix_reuse:
                # no image tokens, nothing after them, or a prompt that is one block
                logits, cache = self.prefill(ids, enc.features, self.empty_cache(), enc.grid)
                timings["prefix_reused"] = False
            else:
                key = tuple(ids[:cut])
                prefix = enc.prefixes.get(key)
                timings["prefix_reused"] = prefix is not None
                if prefix is None:
                    _, prefix = self.prefill(ids[:cut], enc.features, self.empty_cache(),
                                             enc.grid)
                    if len(enc.prefixes) < EncodedImage.MAX_PREFIXES:
                        enc.prefixes[key] = prefix
                logits, cache = self.prefill(ids[cut:], None, prefix, enc.grid)
        timings["prefill_ms"] = _ms(t)
        return ids, logits, cache

    def _prepare_several(self, images, prompt: str, max_new_tokens: int, layout: str,
                         timings: dict, max_image_tokens: int | None = None):
        """_prepare for several images in one prompt: each preprocessed (within
        its own image-token budget) or taken encoded, the prompt expanded with
        each image's grid, the context checked over all of them before any
        vision runs, then their features concatenated in prompt order (embed_prompt
        fills the image rows in order) and one prefill; no prefix cache."""
        self.chat.check_image_count(len(images))  # one line before any work
        for im in images:
            if isinstance(im, EncodedImage) and im.owner != id(self):
                raise UserInputError("this EncodedImage was made by another session",
                                     hint="encode the images with the session that answers")
        staged = []  # (pixels, grid, EncodedImage or None) per image
        with self._lock:
            t = time.perf_counter()
            for im in images:
                if isinstance(im, EncodedImage):
                    staged.append((None, im.grid, im))
                    continue
                pixels, grid = self._preprocess(im, layout, max_image_tokens,
                                                several=len(images) > 1)
                staged.append((pixels.copy(), grid, None))  # the next image reuses the buffer
            timings["preprocess_ms"] = _ms(t)
            grids = [g for _, g, _ in staged]
            ids = self.chat.prompt_ids(prompt, image_grids=grids)
            self._check_context(len(ids), max_new_tokens)
            t = time.perf_counter()
            feats = [enc.features if enc is not None else self.encode_image(px, g)
                     for px, g, enc in staged]
            timings["vision_ms"] = _ms(t)
            feats = np.concatenate([f.reshape(-1, f.shape[-1]) for f in feats])  # (T_all, D)
            t = time.perf_counter()
            # grids in prompt order: mrope positions take the next grid per image run
            logits, cache = self.prefill(ids, feats, self.empty_cache(), grids)
            timings["prefill_ms"] = _ms(t)
        timings["images"] = len(images)
        return ids, logits, cache

    def _run(self, image, prompt, max_new_tokens, temperature, top_k, top_p,
             repetition_penalty, stop, seed, layout, constraint=None, cancel=None,
             max_image_tokens=None) -> Iterator[tuple[int, dict, list[int]]]:
        """One request, checked first, then prepared and decoded: yields
        (token, timings, prompt ids) and finally (-1, timings, ids)."""
        _check_request(image, prompt, max_new_tokens, stop, seed)
        sampling.check(temperature, top_k, top_p, repetition_penalty)
        self.chat.check_text(prompt)
        self.chat.check_images(prompt, _image_count(image))
        timings: dict[str, Any] = {}
        t_start = time.perf_counter()
        ids, logits, cache = self._prepare(image, prompt, max_new_tokens, layout, timings,
                                           max_image_tokens)
        timings["prompt_tokens"] = len(ids)
        timings["image_tokens"] = ids.count(self.chat.image_token_id)
        rng = np.random.default_rng(seed)
        opts = dict(temperature=temperature, top_k=top_k, top_p=top_p,
                    repetition_penalty=repetition_penalty)
        tokens = self._decode(logits, cache, max_new_tokens, rng, opts, stop, timings, t_start,
                              constraint, cancel=cancel)
        # The decode loop owns the prefill cache now: holding it here too would
        # keep its buffers (a TensorRT KV slot) alive for the whole generation.
        del logits, cache
        for token in tokens:
            yield token, timings, ids
        timings["total_ms"] = _ms(t_start)
        yield -1, timings, ids

    def generate(self, image, prompt: str, max_new_tokens: int = 32, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None,
                 repetition_penalty: float | None = None, stop: list[str] | None = None,
                 seed: int | None = None, layout: str = "RGB",
                 choices: list[str] | None = None,
                 json_schema: dict | None = None,
                 cancel: threading.Event | None = None,
                 max_image_tokens: int | None = None) -> GenerationResult:
        """Answer `prompt` about `image`.

        image: a path, encoded bytes (JPEG/PNG/...), a PIL image, or a numpy
        (H, W, 3) uint8 array whose channel order is `layout` ("RGB", or "BGR"
        for OpenCV camera frames), or an EncodedImage; None for a text-only
        prompt. A list of them puts several images in one prompt (every
        family, each packed as its processor does; at most MAX_IMAGES): each
        goes at its "<image>" marker in the prompt ("is
        <image> the same scene as <image>?", one marker per image), or with
        no marker they all come first, as the model's chat template does.
        Greedy when temperature == 0; `seed` makes sampling repeatable.
        Stops at any of the manifest's stop token ids or any `stop` string.
        Structured answers: `choices` (the answer is exactly one of them; the
        result's .value) or `json_schema` (the answer is JSON matching it,
        parsed in .value; needs llguidance). An answer that max_new_tokens
        cuts before it is whole raises IncompleteAnswerError.
        Timings (ms): preprocess_ms, vision_ms, prefill_ms, ttft_ms,
        decode_ms (per token), total_ms; tokens_per_s over the decode steps."""
        constraint = self._constraint(choices, json_schema)
        tokens: list[int] = []
        for token, timings, ids in self._run(image, prompt, max_new_tokens, temperature, top_k,
                                             top_p, repetition_penalty, stop, seed, layout,
                                             constraint, cancel, max_image_tokens):
            if token >= 0:
                tokens.append(token)
        text = _cut_at_stop(self.chat.decode(tokens), stop)
        reason = timings.pop("stop_reason")
        value = None if reason == "cancelled" else \
            _structured_value(constraint, text, max_new_tokens)
        return GenerationResult(text, tokens, len(ids), reason, timings, value,
                                self._boxes(image, tokens, stop))

    def _boxes(self, image, tokens: list[int], stop=None) -> list:
        """The answer's grounding boxes in the original image's pixels, where
        the family has a convention and the request had exactly one image
        (several: which image a box is on is not said). The tokens are decoded
        with special tokens kept, so labels between grounding markers that
        are special tokens (<ref>...</ref>, <|object_ref_start|>...) survive;
        like the answer text, it ends at the first `stop` string. Reads what
        _preprocess recorded in this thread for this request (or the
        EncodedImage's)."""
        conv = grounding.convention_for(self.manifest.family)
        if conv is None or _image_count(image) != 1:
            return []
        text = _cut_at_stop(self.chat.decode(tokens, keep_special=True), stop)
        image = image[0] if isinstance(image, (list, tuple)) else image
        if isinstance(image, EncodedImage):
            size, grid = image.image_size, image.grid
        else:
            size, grid = getattr(self._local, "seen", (None, None))
        if size is None:
            return []
        model_size = grounding.model_size_from_grid(grid, self.manifest.image.patch_size)
        region = self.preprocessor.seen_region(size[1], size[0])
        return grounding.parse_boxes(text, conv, size, model_size, region)

    def stream(self, image, prompt: str, max_new_tokens: int = 32, **kw) -> Iterator[str]:
        """Like generate(), yielding text pieces as tokens arrive; every piece
        is complete UTF-8 (a character split across tokens is held back).
        The request is checked when stream() is called; a stream that is
        not read to the end holds no lock. `last_timings` holds the timings
        of the last stream to finish."""
        opts = dict(temperature=0.0, top_k=None, top_p=None, repetition_penalty=None, stop=None,
                    seed=None, layout="RGB")
        structured = {k: kw.pop(k, None) for k in ("choices", "json_schema")}
        cancel = kw.pop("cancel", None)
        budget = kw.pop("max_image_tokens", None)
        unknown = set(kw) - set(opts)
        if unknown:
            raise UserInputError(f"unknown option(s) {sorted(unknown)}",
                                 expected=", ".join(sorted(opts) + sorted(structured)))
        opts.update(kw)
        _check_request(image, prompt, max_new_tokens, opts["stop"], opts["seed"])
        sampling.check(opts["temperature"], opts["top_k"], opts["top_p"],
                       opts["repetition_penalty"])
        self.chat.check_text(prompt)
        self.chat.check_images(prompt, _image_count(image))
        constraint = self._constraint(**structured)
        return self._stream(image, prompt, max_new_tokens, opts, constraint, cancel, budget)

    def _stream(self, image, prompt, max_new_tokens, opts, constraint, cancel, budget
                ) -> Iterator[str]:
        dec = StreamDecoder(self.chat)
        timings: dict[str, Any] = {}
        for token, timings, _ in self._run(image, prompt, max_new_tokens, **opts,
                                           constraint=constraint, cancel=cancel,
                                           max_image_tokens=budget):
            if token >= 0:
                piece = dec.push(token)
                if piece:
                    yield piece
        tail = dec.flush()
        if tail:
            yield tail
        self.last_timings = timings
        if timings.get("stop_reason") != "cancelled":
            _structured_value(constraint, self.chat.decode(dec.ids), max_new_tokens)

    def ask(self, image, questions: list[str], max_new_tokens: int = 32,
            layout: str = "RGB") -> list[GenerationResult]:
        """Greedy answers to several questions about one image: the image is
        encoded once, and the prompt prefix shared by all questions (up to and
        including the image tokens) is prefilled once and its KV cache reused.
        A list of several images: each encoded once, each question prefilled
        whole."""
        if isinstance(questions, str) or not isinstance(questions, (list, tuple)) or not questions:
            raise UserInputError("ask() needs a list of questions", expected="a non-empty list "
                                 "of str", got=repr(questions)[:60])
        for q in questions:
            _check_request(image, q, max_new_tokens, None, None)
            self.chat.check_text(q)
            self.chat.check_images(q, _image_count(image))
        if isinstance(image, (list, tuple)) and len(image) == 1:
            image = image[0]
        if image is None or (isinstance(image, (list, tuple)) and not image):
            raise UserInputError("ask() needs an image", hint="use generate(None, q) for text")
        if isinstance(image, (list, tuple)):  # several: encoded once, no shared prefix cache
            self.chat.check_image_count(len(image))
            encoded = [self.encode(im, layout, several=len(image) > 1) for im in image]
            return [self.generate(encoded, q, max_new_tokens=max_new_tokens, layout=layout)
                    for q in questions]
        with self._lock:
            t0 = time.perf_counter()
            pixels, grid = self._preprocess(image, layout)
            preprocess_ms = _ms(t0)
            prompts = [self.chat.prompt_ids(q, image_grid=grid) for q in questions]
            for p in prompts:
                self._check_context(len(p), max_new_tokens)
            shared = _common_prefix(prompts)
            shared = min(shared, min(len(p) for p in prompts) - 1)  # each keeps >= 1 own token
            if any(self.chat.image_token_id in p[shared:] for p in prompts) \
                    or not self._prefix_reuse:
                shared = 0  # an <image> marker after text that differs, or one-block prompts
            t = time.perf_counter()
            feats = self.encode_image(pixels, grid)
            vision_ms = _ms(t)
            t = time.perf_counter()
            # The shared prefix holds all the image's tokens (else it is empty, above).
            _, prefix = self.prefill(prompts[0][:shared], feats, self.empty_cache(), grid) \
                if shared else (None, self.empty_cache())
            shared_ms = _ms(t)
        results = []
        for p in prompts:
            timings: dict[str, Any] = {"preprocess_ms": preprocess_ms, "vision_ms": vision_ms,
                                       "shared_prefix_ms": shared_ms, "shared_tokens": shared}
            t = time.perf_counter()
            with self._lock:
                logits, cache = self.prefill(p[shared:], feats if shared == 0 else None, prefix,
                                             grid)
            timings["prefill_ms"] = _ms(t)
            tokens = list(self._decode(logits, cache, max_new_tokens, np.random.default_rng(0),
                                       dict(temperature=0.0), None, timings, t))
            reason = timings.pop("stop_reason")
            results.append(GenerationResult(self.chat.decode(tokens), tokens, len(p), reason,
                                            timings))
        return results


def _check_request(image, prompt, max_new_tokens, stop, seed) -> None:
    """The request's own arguments, each refused in one line when malformed."""
    if not isinstance(prompt, str):
        raise UserInputError("the prompt must be text", expected="a str",
                             got=type(prompt).__name__,
                             hint="decode bytes first: prompt.decode('utf-8')"
                             if isinstance(prompt, (bytes, bytearray)) else None)
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) \
            or max_new_tokens < 1:
        raise UserInputError("max_new_tokens must be an integer >= 1",
                             got=repr(max_new_tokens)[:40])
    if stop is not None and (isinstance(stop, str) or not isinstance(stop, (list, tuple))
                             or not all(isinstance(s, str) and s for s in stop)):
        raise UserInputError("stop must be a list of non-empty strings", got=repr(stop)[:60])
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
        raise UserInputError("seed must be an integer >= 0", got=repr(seed)[:40])
    if isinstance(image, (list, tuple)):
        if len(image) > MAX_IMAGES:  # each is preprocessed before the context check
            raise UserInputError("too many images in one prompt", expected=f"<= {MAX_IMAGES}",
                                 got=str(len(image)))
        for im in image:
            if im is None or isinstance(im, (list, tuple)):
                raise UserInputError("each image of a list must be an image",
                                     expected="a path, bytes, PIL image, array or EncodedImage",
                                     got=type(im).__name__)


def _cut_at_stop(text: str, stop) -> str:
    """`text` up to the first occurrence of each `stop` string in turn."""
    for s in stop or ():
        if s in text:
            text = text[: text.index(s)]
    return text


def _image_count(image) -> int:
    """Images in a request's `image` argument: None, one, or a list."""
    if image is None:
        return 0
    return len(image) if isinstance(image, (list, tuple)) else 1


def _check_single_image(image, what: str) -> None:
    if isinstance(image, (list, tuple)):
        raise UserInputError(f"{what} takes one image", got=f"a {type(image).__name__} of "
                             f"{len(image)} images", hint="call it once per image")


def _structured_value(constraint, text: str, max_new_tokens: int):
    """The structured answer's value, or IncompleteAnswerError when the
    token budget ended it before it was whole."""
    if constraint is None:
        return None
    if not constraint.complete():
        from vlmedge.errors import IncompleteAnswerError
        raise IncompleteAnswerError(
            f"the {constraint.kind} answer was cut by max_new_tokens={max_new_tokens} before it "
            f"was whole", got=repr(text)[:80], hint="raise max_new_tokens")
    return constraint.value(text.strip())


def _float_dtype(m: "manifest_mod.Manifest", flavour: str) -> np.dtype:
    """The graphs' float dtype: the decoder graph's inputs_embeds as the
    manifest records it, else the precision's. They agree in a finished
    artifact; while an int4-fp16 export gates its int4 weights, the graphs
    are still fp32 (export/weight_only.py) and say so."""
    spec = m.components[m.decoder_component(flavour)].input("inputs_embeds")
    if spec is not None and spec.dtype in ("float32", "float16"):
        return np.dtype(spec.dtype)
    return np.dtype(precision_mod.get(m.precision).io_dtype)


def _native_trt(m: "manifest_mod.Manifest", provider: str) -> bool:
    """Native TensorRT engines for this session? provider "trt" on an artifact
    whose manifest records engines: yes (a missing tensorrt is an error);
    "auto": yes where TensorRT imports, else the ONNX graphs via onnxruntime.
    Without recorded engines "trt" means onnxruntime's TensorRT EP."""
    if m.target != "trt" or not (m.trt or {}).get("engines"):
        return False
    if provider == "trt":
        return True
    if provider == "auto":
        from .trt_backend import tensorrt_importable
        return tensorrt_importable()
    return False


def _common_prefix(seqs: list[list[int]]) -> int:
    n = min(len(s) for s in seqs)
    for i in range(n):
        if any(s[i] != seqs[0][i] for s in seqs[1:]):
            return i
    return n
