"""The two decoder flavours behind VLMSession.step (DESIGN.md, "The artifact directory").

    portable  standard ONNX ops (TensorRT, every EP). Feeds inputs_embeds (1, S, D),
              attention_mask (1, P + S), position_ids (1-D or mrope, from the host)
              and past_key_values.{i}.key|value (1, kv_heads, P, head_dim) (and
              attention_groups (1, S) where the manifest says so); returns
              present = concat(past, new) (1, kv_heads, P + S, head_dim), a new array
              each step that the next KVCache holds by reference.
    ort       onnxruntime's fused contrib ops (GroupQueryAttention with rotary inside,
              SkipSimplifiedLayerNormalization, MatMulNBits weights), built by
              onnxruntime-genai's model builder (export/ort_decoder.py). No
              position_ids: GQA takes each row's position from the attention mask's
              sum. One preallocated buffer per layer and kind, (1, kv_heads,
              capacity, head_dim), is bound with IOBinding as both past and present,
              so a step writes only its S new rows, in place: no per-step copy of
              the cache.

Both return the last position's logits (V,), a new array each step that the caller
may change (the decode loop masks a forced length's stop tokens in place), and the
next KVCache; a KVCache stays
valid after it was extended (see KVBuffer), so one prefix seeds several answers.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

from vlmedge.errors import ArtifactError
from vlmedge.lazy import require
from vlmedge.manifest import FLAVOURS

from .kv_cache import KVBuffer, KVCache

# Rows a new KV buffer holds beyond what the step needs: room for an answer
# before the first growth (growth doubles, so its copies cost O(tokens) in all).
HEADROOM = 128


class PortableDecoder:
    """The standard-op decoder graph (a Backend: onnxruntime or TensorRT)."""

    flavour = "portable"

    def __init__(self, facts, positions: Callable, dtype, image_token_id: int | None = None):
        self.facts, self.positions, self.dtype = facts, positions, dtype
        self.image_token_id = image_token_id

    def empty_cache(self) -> KVCache:
        f = self.facts
        return KVCache.empty(f.num_layers, f.num_kv_heads, f.head_dim, dtype=self.dtype)

    def step(self, backend, inputs_embeds: np.ndarray, cache: KVCache, ids, image_grid
             ) -> tuple[np.ndarray, KVCache]:
        """backend: the session's decoder Backend now (calibration swaps it)."""
        f = self.facts
        s = inputs_embeds.shape[1]
        positions, offset = self.positions(cache.length, cache.position_offset, s, ids,
                                           image_grid)
        feeds = {"inputs_embeds": inputs_embeds.astype(self.dtype, copy=False),
                 "attention_mask": np.ones((1, cache.length + s), np.int64),
                 "position_ids": positions,
                 **cache.feeds(f.past_key, f.past_value)}
        if f.attention_groups:
            feeds["attention_groups"] = attention_groups(f.attention_groups, ids, s,
                                                         cache.length, self.image_token_id)
        out = backend.run(feeds)
        logits = out["logits"][0, -1].astype(np.float32, copy=False)
        return logits, KVCache.from_outputs(out, f.num_layers, f.present_key, f.present_value,
                                            cache.length + s, offset)


class OrtDecoder:
    """The onnxruntime-native decoder graph over shared, preallocated KV buffers.

    device: "cpu", or "cuda" for onnxruntime's CUDA execution provider, where
    the buffers live on the device (OrtValues) so the cache never crosses PCIe."""

    flavour = "ort"

    def __init__(self, facts, dtype, context_length: int, device: str):
        self.ort = require("onnxruntime", "running an artifact")
        self.facts, self.dtype, self.context_length, self.device = \
            facts, dtype, context_length, device
        self._layout: tuple = (None, None)  # (session, its logits layout): _logits_layout

    def empty_cache(self) -> KVCache:
        return KVCache((), 0)

    def _allocate(self, capacity: int) -> KVBuffer:
        f = self.facts
        shape = (1, f.num_kv_heads, capacity, f.head_dim)
        arrays = tuple(_aligned_zeros(shape, self.dtype) for _ in range(2 * f.num_layers))
        if self.device == "cpu":  # OrtValues over the numpy memory: no copy
            values = tuple(self.ort.OrtValue.ortvalue_from_numpy(a) for a in arrays)
        else:
            values = tuple(self.ort.OrtValue.ortvalue_from_numpy(a, "cuda", 0) for a in arrays)
            arrays = ()  # the device copy is the buffer
        return KVBuffer(arrays, values, capacity)

    def _buffer_for(self, cache: KVCache, need: int) -> KVBuffer:
        """The buffer a step from `cache` to `need` rows writes into: the cache's
        own when the step extends its newest rows in place and fits, else a new
        one holding a copy of the cache's rows (a second answer from one prefix,
        or growth past the capacity)."""
        buf = cache.buffer
        if buf is not None and cache.length == buf.frontier and need <= buf.capacity:
            return buf
        if buf is None:  # the first step of a generation
            want = need + HEADROOM
        elif need > buf.capacity:  # growth doubles: O(tokens) copying in all
            want = max(need + HEADROOM, 2 * buf.capacity)
        else:  # a fork from a shared prefix: the same room
            want = buf.capacity
        capacity = min(self.context_length, -(-want // 64) * 64)
        new = self._allocate(max(capacity, need))
        if buf is not None and cache.length:
            n = cache.length
            for src, dst, val in zip(buf.host(), new.arrays or [None] * len(new.values),
                                     new.values):
                if dst is not None:
                    dst[:, :, :n] = src[:, :, :n]
                else:  # device buffer: write the prefix through a host staging copy
                    host = val.numpy()
                    host[:, :, :n] = src[:, :, :n]
                    val.update_inplace(host)
        new.frontier = cache.length
        return new

    def _binding(self, session, buf: KVBuffer):
        """The IOBinding of `session` with every layer's KV buffer bound as both
        past and present: made once per buffer (and session), then reused."""
        if buf.binding is not None and buf.binding[0] is session:
            return buf.binding[1]
        f = self.facts
        io = session.io_binding()
        for i in range(f.num_layers):
            for j, (past, present) in enumerate(((f.past_key, f.present_key),
                                                 (f.past_value, f.present_value))):
                value = buf.values[2 * i + j]
                io.bind_ortvalue_input(past.format(i=i), value)
                io.bind_ortvalue_output(present.format(i=i), value)
        buf.binding = (session, io)
        return io

    def step(self, backend, inputs_embeds: np.ndarray, cache: KVCache, ids=None,
             image_grid=None) -> tuple[np.ndarray, KVCache]:
        """backend: the session's decoder OrtBackend now."""
        need = cache.length + inputs_embeds.shape[1]
        buf = self._buffer_for(cache, need)
        io = self._binding(backend.session, buf)
        io.bind_cpu_input("inputs_embeds", np.ascontiguousarray(inputs_embeds, self.dtype))
        io.bind_cpu_input("attention_mask", np.ones((1, need), np.int64))
        layout = self._logits_layout(backend.session) if self.device == "cpu" else None
        if layout is not None:
            # the logits (1, 1, V) straight into a new array of ours: no
            # get_outputs(), which wraps every bound output (2 x layers + 1
            # OrtValues: ~65 us a step on SmolVLM-256M)
            logits = np.empty(*layout)
            io.bind_ortvalue_output("logits", self.ort.OrtValue.ortvalue_from_numpy(logits))
        else:
            io.bind_output("logits")
        backend.run_bound(io)
        buf.frontier = need
        if layout is None:
            logits = io.get_outputs()[-1].numpy()
        return logits[0, -1].astype(np.float32, copy=False), KVCache(buf.arrays, need, 0, buf)

    def _logits_layout(self, session) -> tuple | None:
        """((1, 1, V), dtype) of the graph's logits output (float16 for an fp16
        graph), read once per session; None unless the graph declares one
        position and a fixed vocabulary (the builder's pruned LM head does)."""
        if self._layout[0] is not session:
            out = next((o for o in session.get_outputs() if o.name == "logits"), None)
            fixed = out is not None and len(out.shape) == 3 and out.shape[1] == 1 and \
                isinstance(out.shape[2], int)
            dtype = np.float16 if fixed and out.type == "tensor(float16)" else np.float32
            self._layout = (session, ((1, 1, out.shape[2]), dtype) if fixed else None)
        return self._layout[1]


def _aligned_zeros(shape: tuple, dtype, align: int = 64) -> np.ndarray:
    """Zeros whose first byte is on a cache line (numpy gives 16 bytes): the
    attention kernels read and write each layer's cache with 64-byte vectors,
    and a misaligned buffer splits every one of them over two lines (as
    onnxruntime's own allocations are; on SmolVLM-256M int4 a bare decode loop
    over its allocations ran 0-4% faster than over numpy's, within this
    machine's noise)."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = np.zeros(nbytes + align, np.uint8)
    start = (-raw.ctypes.data) % align
    return raw[start:start + nbytes].view(dtype).reshape(shape)


def attention_groups(rule: str, ids, s: int, past: int, image_token_id: int | None
                     ) -> np.ndarray:
    """attention_groups (1, s) int64 for a step of s tokens after `past` cached
    ones, by the manifest's rule: tokens of one group (>= 0) attend to each
    other both ways, -1 is causal. A step without ids (a generated token) is
    all -1.

      images  each run of image tokens in `ids` is a group (0, 1, ... in
              order), as Gemma 3's image blocks. An image's run is never split
              across steps: a prompt is prefilled whole, and a shared prefix
              (ask, the watch loop) ends after the image tokens.
      prompt  the first prefill (past 0) is one group: PaliGemma's prefix-LM
              (the session never splits such a prompt's prefill)."""
    out = np.full((1, s), -1, np.int64)
    if ids is None:
        return out
    if rule == "prompt":
        if past == 0:
            out[:] = 0
        return out
    if image_token_id is None:
        return out
    image = np.asarray(ids, np.int64)[-s:] == image_token_id          # (s,)
    starts = image & ~np.concatenate(([False], image[:-1]))           # first token of a run
    out[0, image] = (np.cumsum(starts) - 1)[image]
    return out


# The providers whose onnxruntime kernels run the ort flavour's contrib ops
# (GroupQueryAttention, MatMulNBits, SkipSimplifiedLayerNormalization).
ORT_FLAVOUR_PROVIDERS = ("CPUExecutionProvider", "CUDAExecutionProvider")
# Where an artifact holding both flavours runs the ort one unasked: the CPU
# only. The export builds the ort graph for onnxruntime's CPU kernels at fp32
# activations, and onnxruntime's CUDA GroupQueryAttention takes fp16/bf16
# only, so on CUDA the portable graph is the one known to run (ort there is
# the caller's choice, as with an ort-only artifact).
ORT_BY_DEFAULT = ("CPUExecutionProvider",)


def pick_flavour(manifest, providers: list[str], requested: str | None = None) -> str:
    """The decoder flavour a session runs: `requested` if the artifact holds it
    (else one ArtifactError line); otherwise the ort flavour where the
    artifact holds it and the first provider is onnxruntime's CPU (fused
    attention over a shared KV buffer, MatMulNBits), and the portable one
    everywhere else (CUDA, TensorRT, other execution providers)."""
    have = manifest.decoder_flavours
    if requested is not None:
        if requested not in FLAVOURS:  # the manifest's (vlmedge/manifest.py)
            from vlmedge.errors import UserInputError
            raise UserInputError("unknown decoder flavour", expected=" | ".join(FLAVOURS),
                                 got=repr(requested)[:40])
        if requested not in have:
            raise ArtifactError(f"this artifact has no {requested} decoder",
                                expected=" | ".join(have), got=requested,
                                hint="re-export with --decoder-flavour both to have both")
        return requested
    if "ort" in have and providers[:1] and providers[0] in ORT_BY_DEFAULT:
        return "ort"
    return "portable" if "portable" in have else have[0]


def open_decoder(backend, manifest, positions: Callable, dtype, flavour: str | None = None
                 ) -> Any:
    """The decoder runner for `flavour` (the manifest's decoder.flavour by
    default), checked against the backend: the ort flavour needs
    onnxruntime's CPU or CUDA provider."""
    facts = manifest.decoder
    flavour = flavour or facts.flavour
    if flavour == "portable":
        return PortableDecoder(facts, positions, dtype, manifest.image.image_token_id)
    providers = getattr(backend, "providers", None) or []
    if not hasattr(backend, "run_bound") or not providers or \
            providers[0] not in ORT_FLAVOUR_PROVIDERS:
        both = "portable" in manifest.decoder_flavours
        raise ArtifactError(
            "the onnxruntime-native ('ort') decoder runs on onnxruntime's CPU or CUDA "
            "execution provider only",
            got=f"provider {providers[0] if providers else getattr(backend, 'name', '?')}",
            hint="this artifact has a portable decoder too: leave decoder_flavour unset or "
                 "choose 'portable'" if both else
                 "use provider='cpu' or 'cuda', or re-export with --decoder-flavour portable "
                 "for TensorRT")
    device = "cuda" if providers[0] == "CUDAExecutionProvider" else "cpu"
    return OrtDecoder(facts, dtype, facts.context_length, device)
