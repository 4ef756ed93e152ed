"""The decoder's KV cache between steps.

The decoder graph takes past_key_values.{i}.key|value (B, kv_heads, past, head_dim)
and returns present.{i}.key|value (B, kv_heads, past + S, head_dim); a window
layer (decoder.window_layers) keeps at most decoder.window_cache of those rows. The
present arrays of one step are the past of the next, handed over by
reference: Python never copies the cache per token (the concatenation
happens once, inside the graph). A cache is immutable once made, so one
prefix cache can seed several continuations (`VLMSession.ask`).

The onnxruntime-native decoder flavour (runtime/decoders.py) writes into one
preallocated KVBuffer in place instead; its caches are views of a buffer's
first `length` rows, and stay valid in the same way (see KVBuffer).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(eq=False)
class KVBuffer:
    """Preallocated KV memory of the ort decoder flavour: per layer k, v arrays of
    (1, kv_heads, capacity, head_dim), bound as both past and present.

    `frontier` is the number of rows written by the last step. A step from a
    cache of `length == frontier` rows extends the buffer in place; a step from
    a shorter cache (someone already wrote past its end: a second answer from
    one prefix) copies that cache's rows into a new buffer first. Rows below a
    cache's length are never written again, so every KVCache stays valid.
    Steps run under the session lock, which makes check-and-extend atomic."""
    arrays: tuple  # numpy arrays (host buffers); () when the buffer is on a device
    values: tuple  # onnxruntime OrtValues over the same memory, bound to the graph
    capacity: int
    frontier: int = 0
    # (session, IOBinding) with every past/present bound to `values`: built on
    # the buffer's first step and reused, so a decode step rebinds only its
    # inputs_embeds, attention_mask and logits (2 x layers binds saved a step).
    binding: Any = field(default=None, compare=False, repr=False)

    def host(self) -> list[np.ndarray]:
        """The buffers as host arrays (a device buffer is copied)."""
        return list(self.arrays) if self.arrays else [v.numpy() for v in self.values]

    @property
    def nbytes(self) -> int:
        if self.arrays:
            return sum(a.nbytes for a in self.arrays)
        return sum(int(np.prod(v.shape())) * 4 for v in self.values)


@dataclass(frozen=True)
class KVCache:
    arrays: tuple[np.ndarray, ...]  # k0, v0, k1, v1, ...: (B, kv_heads, length, head_dim)
    length: int
    # Next position = length + position_offset; nonzero only where positions
    # do not count tokens one by one (mrope: an image takes fewer positions).
    position_offset: int = 0
    # The ort flavour's shared buffer (arrays are then its full-capacity arrays,
    # of which the first `length` rows are this cache's).
    buffer: Any = field(default=None, compare=False)

    @classmethod
    def empty(cls, num_layers: int, num_kv_heads: int, head_dim: int, batch: int = 1,
              dtype=np.float32) -> "KVCache":
        # Zero-length past for the prefill step (onnxruntime accepts 0-sized dims).
        z = np.zeros((batch, num_kv_heads, 0, head_dim), dtype)
        return cls(tuple(z for _ in range(2 * num_layers)), 0)

    def feeds(self, past_key: str, past_value: str) -> dict[str, np.ndarray]:
        out = {}
        for i in range(len(self.arrays) // 2):
            out[past_key.format(i=i)] = self.arrays[2 * i]
            out[past_value.format(i=i)] = self.arrays[2 * i + 1]
        return out

    @classmethod
    def from_outputs(cls, outputs: dict[str, np.ndarray], num_layers: int, present_key: str,
                     present_value: str, length: int, position_offset: int = 0) -> "KVCache":
        """length: the positions the cache now covers (past + step). A window
        layer's arrays hold fewer rows (decoder.window_layers), so it is not
        read off an array's shape."""
        arrays = []
        for i in range(num_layers):
            arrays += [outputs[present_key.format(i=i)], outputs[present_value.format(i=i)]]
        return cls(tuple(arrays), length, position_offset)

    @property
    def nbytes(self) -> int:
        """Memory the cache holds (a shared buffer: its whole capacity)."""
        if self.buffer is not None:
            return self.buffer.nbytes
        return sum(a.nbytes for a in self.arrays)
