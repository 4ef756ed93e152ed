"""Native TensorRT engines as runtime backends (provider="trt").

    engines = open_engines(artifact_dir, manifest)   # {"vision"|"embed"|"decoder": TrtBackend}
    out = engines["decoder"].run(feeds)               # same contract as OrtBackend.run

One execution context per engine, one CUDA stream per session. Device
buffers are allocated once, at open, for each tensor's largest shape over the
engine's optimization profiles (the plan's max_context, max_batch,
max_images), and reused by every call.

KV cache: the decoder's present.{i}.key|value outputs never come back to the
host. They are written into a KV slot (one device buffer per output, sized
for the maximum context) and returned as DeviceTensor views; the next step
feeds those views back as past_key_values by address. A slot is busy while
any view of it is alive (a KVCache holds them), so decoding ping-pongs
between slots and a prefix cache (VLMSession.ask) keeps its own. Slots are
allocated on first use, at most `max_kv_slots` (generate uses 3: the
prefill cache held by the caller plus two that alternate; ask 4).

Preflight before any engine is deserialized: the TensorRT version and GPU
compute capability the engines were built for must be this device's
("rebuild on this device with: ..."), and every engine file's sha256 must
match the manifest (an engine is executable code; the bytes hashed are the
bytes deserialized). A deserialization that returns nothing is an error.
"""
from __future__ import annotations

import hashlib
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from vlmedge.errors import ArtifactError, MissingDependencyError, TensorRTError
from vlmedge.lazy import require

from .backends import Backend

MAX_KV_SLOTS = 4


@dataclass(frozen=True)
class DeviceTensor:
    """A C-contiguous tensor in device memory: a view into a KV slot.
    `lease` keeps the slot busy for as long as the view lives."""
    ptr: int
    shape: tuple[int, ...]
    dtype: np.dtype
    lease: Any

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize

    @property
    def ndim(self) -> int:
        return len(self.shape)


class _Lease:
    """Holds one KV slot; the slot returns to the pool when the lease is collected."""

    def __init__(self, slot: int, buffers: dict[str, Any]):
        self.slot = slot
        self.buffers = buffers


class KVSlotPool:
    """Up to `max_slots` sets of device buffers for the KV outputs, each
    buffer `sizes[name]` bytes (its largest shape). `alloc(nbytes)` returns an
    object with .ptr (a DeviceBuffer on the device; tests pass a fake)."""

    def __init__(self, sizes: dict[str, int], alloc: Callable[[int], Any],
                 max_slots: int = MAX_KV_SLOTS):
        self.sizes, self.alloc, self.max_slots = dict(sizes), alloc, max_slots
        self.slots: list[dict[str, Any]] = []  # allocated once, reused
        self.busy: set[int] = set()

    def acquire(self) -> _Lease:
        free = [i for i in range(len(self.slots)) if i not in self.busy]
        if free:
            i = free[0]
        elif len(self.slots) < self.max_slots:
            self.slots.append({n: self.alloc(b) for n, b in self.sizes.items()})
            i = len(self.slots) - 1
        else:
            raise TensorRTError(f"all {self.max_slots} KV-cache slots are in use",
                                hint="drop KVCache objects you no longer need (each one holds a "
                                     "device buffer for the full context)")
        self.busy.add(i)
        lease = _Lease(i, self.slots[i])
        weakref.finalize(lease, self.busy.discard, i)
        return lease

    @property
    def allocated_bytes(self) -> int:
        return len(self.slots) * sum(self.sizes.values())


# -- preflight -----------------------------------------------------------------

def preflight(trt_section: dict[str, Any], tensorrt_version: str, compute_capability: str,
              directory: Path) -> None:
    """Refuses engines built by another TensorRT or for another GPU: either
    fails to deserialize or, worse, misbehaves (DESIGN: never a segfault)."""
    rebuild = f"rebuild on this device with: vlm-export build-engines {directory}"
    built_v = trt_section.get("tensorrt_version")
    built_cc = trt_section.get("compute_capability")
    if not trt_section.get("engines") or not built_v or not built_cc:
        raise ArtifactError(f"{directory} has no TensorRT engines recorded in its manifest",
                            hint=f"build them on this device with: vlm-export build-engines "
                                 f"{directory}")
    if built_v != tensorrt_version:
        raise ArtifactError(f"the engines in {directory} were built with TensorRT {built_v}",
                            expected=f"TensorRT {built_v}", got=f"TensorRT {tensorrt_version} here",
                            hint=rebuild)
    if built_cc != compute_capability:
        raise ArtifactError(
            f"the engines in {directory} were built for a GPU of compute capability {built_cc} "
            f"({trt_section.get('gpu_name', 'unknown GPU')})",
            expected=f"compute capability {built_cc}", got=f"{compute_capability} here",
            hint=rebuild)


def read_verified(directory: Path, name: str, files: dict[str, dict]) -> bytes:
    """The bytes of engine `name`, refused unless their sha256 is the manifest's."""
    entry = files.get(name)
    if entry is None:
        raise ArtifactError(f"engine {name} is not recorded in {directory}/manifest.json",
                            hint=f"engines built with build_engines.sh are recorded with: "
                                 f"vlm-export build-engines {directory} --adopt")
    from vlmedge import containment
    path = containment.resolve_inside(directory, name, f"engine {name}")  # never outside
    data = path.read_bytes()
    got = hashlib.sha256(data).hexdigest()
    want = entry.sha256 if hasattr(entry, "sha256") else entry["sha256"]
    if got != want:
        raise ArtifactError(f"engine {name} does not match its manifest sha256 (corrupt or "
                            f"tampered); refusing to deserialize it",
                            expected=want[:16] + "...", got=got[:16] + "...",
                            hint=f"rebuild: vlm-export build-engines {directory}")
    return data


def tensorrt_importable() -> bool:
    """Whether tensorrt and the CUDA bindings both import here."""
    from . import cuda_rt
    try:
        require("tensorrt", "running TensorRT engines")
        cuda_rt.cudart()
        return True
    except MissingDependencyError:
        return False


def make_logger(trt, keep: int = 20):
    """A trt.ILogger that keeps the last warnings/errors for our messages."""
    class _Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.messages: list[str] = []

        def log(self, severity, msg):
            if int(severity) <= int(trt.ILogger.Severity.WARNING):
                self.messages = (self.messages + [str(msg)])[-keep:]

        def last(self, n: int = 3) -> str:
            return " | ".join(self.messages[-n:]) or "no message from TensorRT"
    return _Logger()


# -- the backend -----------------------------------------------------------------

class TrtBackend(Backend):
    """One deserialized engine with its execution context and buffers."""

    name = "tensorrt"
    providers = ["TensorRT"]

    def __init__(self, path: Path, engine_bytes: bytes, trt, runtime, logger, stream,
                 profile_names: list[str], kv_outputs: tuple[str, ...] = (),
                 max_kv_slots: int = MAX_KV_SLOTS):
        from . import cuda_rt

        # The runtime and logger must outlive the engine deserialized with them.
        self.trt, self.runtime, self.stream, self.logger = trt, runtime, stream, logger
        self.engine = runtime.deserialize_cuda_engine(engine_bytes)
        if self.engine is None:
            raise ArtifactError(f"TensorRT could not deserialize {path.name}: {logger.last()}",
                                hint=f"rebuild on this device with: vlm-export build-engines "
                                     f"{path.parent}")
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise TensorRTError(f"TensorRT could not create an execution context for {path.name}: "
                                f"{logger.last()}",
                                hint="out of device memory? lower --max-context")
        e = self.engine
        names = [e.get_tensor_name(i) for i in range(e.num_io_tensors)]
        inputs = [n for n in names if e.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if n not in inputs]
        super().__init__(path, inputs, outputs)
        self.dtypes = {n: np.dtype(trt.nptype(e.get_tensor_dtype(n))) for n in names}
        self.profile_names = profile_names
        if e.num_optimization_profiles != len(profile_names):
            raise ArtifactError(f"{path.name} has {e.num_optimization_profiles} optimization "
                                f"profiles; the manifest plan has {len(profile_names)}",
                                hint=f"rebuild: vlm-export build-engines {path.parent}")
        in_max, out_max = self._max_bytes()
        self.in_bufs = {n: cuda_rt.DeviceBuffer(b) for n, b in in_max.items()}
        self.kv_outputs = set(kv_outputs)
        self.out_bufs = {n: cuda_rt.DeviceBuffer(b) for n, b in out_max.items()
                         if n not in self.kv_outputs}
        self.pool = KVSlotPool({n: out_max[n] for n in kv_outputs}, cuda_rt.DeviceBuffer,
                               max_kv_slots) if kv_outputs else None

    def _max_bytes(self) -> tuple[dict[str, int], dict[str, int]]:
        """Largest byte size of every input and output over all profiles:
        inputs from the profiles' max shapes, outputs by setting those shapes."""
        e, ctx = self.engine, self.context
        in_max: dict[str, int] = {}
        out_max: dict[str, int] = {}
        for p in range(e.num_optimization_profiles):
            self._set_profile(p)
            for n in self.input_names:
                shape = tuple(e.get_tensor_profile_shape(n, p)[2])
                in_max[n] = max(in_max.get(n, 0), _volume(shape) * self.dtypes[n].itemsize)
                ctx.set_input_shape(n, shape)
            for n in self.output_names:
                shape = tuple(ctx.get_tensor_shape(n))
                if any(d < 0 for d in shape):
                    raise TensorRTError(f"{self.path.name}: output {n} has a data-dependent shape "
                                        f"{shape}", hint="vlm-export check-trt lists the cause")
                out_max[n] = max(out_max.get(n, 0), _volume(shape) * self.dtypes[n].itemsize)
        self.stream.synchronize()
        return in_max, out_max

    def _set_profile(self, index: int) -> None:
        if not self.context.set_optimization_profile_async(index, self.stream.handle):
            raise TensorRTError(f"{self.path.name}: cannot select optimization profile {index}")
        self.profile = index

    def _profile_for(self, feeds) -> int:
        """decode (one-token steps) or the first profile (prefill / only one)."""
        first = feeds.get("inputs_embeds", feeds.get("input_ids"))
        if first is not None and first.shape[1] == 1 and "decode" in self.profile_names:
            return self.profile_names.index("decode")
        return 0

    def _bind_input(self, name: str, value, keep: list) -> None:
        ctx = self.context
        if isinstance(value, DeviceTensor):  # a KV view: bind by address, no copy
            if np.dtype(value.dtype) != self.dtypes[name]:
                raise TensorRTError(f"{name}: device tensor of {value.dtype}, engine wants "
                                    f"{self.dtypes[name]}")
            shape, ptr = value.shape, value.ptr
        else:
            array = np.ascontiguousarray(value, dtype=self.dtypes[name])
            keep.append(array)  # alive until the stream is synchronized
            shape, buf = array.shape, self.in_bufs[name]
            buf.upload(array, self.stream)
            ptr = buf.ptr
        if not ctx.set_input_shape(name, tuple(int(d) for d in shape)):
            lo, _, hi = self.engine.get_tensor_profile_shape(name, self.profile)
            raise TensorRTError(f"{self.path.name}: input {name} of shape {tuple(shape)} is "
                                f"outside the engine's profile",
                                expected=f"{tuple(lo)} to {tuple(hi)}",
                                hint="re-export with larger --max-context/--max-batch/--max-images")
        ctx.set_tensor_address(name, ptr)

    def _run(self, feeds):
        p = self._profile_for(feeds)
        if p != self.profile:
            self._set_profile(p)
        keep: list = []
        for n in self.input_names:
            self._bind_input(n, feeds[n], keep)
        lease = self.pool.acquire() if self.pool else None
        results, downloads = {}, []
        for n in self.output_names:
            shape = tuple(int(d) for d in self.context.get_tensor_shape(n))
            if n in self.kv_outputs:  # stays on the device, in this call's KV slot
                buf = lease.buffers[n]
                results[n] = DeviceTensor(buf.ptr, shape, self.dtypes[n], lease)
            else:
                buf = self.out_bufs[n]
                results[n] = np.empty(shape, self.dtypes[n])
                downloads.append((buf, results[n]))
            self.context.set_tensor_address(n, buf.ptr)
        if not self.context.execute_async_v3(self.stream.handle):
            raise TensorRTError(f"TensorRT failed to run {self.path.name}: {self.logger.last()}")
        for buf, host in downloads:
            buf.download(host, self.stream)
        self.stream.synchronize()
        return results


def _volume(shape) -> int:
    return int(np.prod([max(int(d), 0) for d in shape], dtype=np.int64))


def open_engines(directory: Path, m, device: int = 0,
                 max_kv_slots: int = MAX_KV_SLOTS) -> dict[str, TrtBackend]:
    """The artifact's engines as backends, after the preflight checks
    (m: the typed vlmedge.manifest.Manifest)."""
    from . import cuda_rt

    trt = require("tensorrt", "running TensorRT engines (provider='trt')")
    directory = Path(directory)
    t = m.trt or {}
    cc, _ = cuda_rt.device_facts(device)
    preflight(t, trt.__version__, cc, directory)
    logger = make_logger(trt)
    runtime = trt.Runtime(logger)
    stream = cuda_rt.Stream()
    kv = tuple(m.decoder.present_names())
    out = {}
    for comp, e in t["engines"].items():
        names = [p["name"] for p in t["plan"]["components"][comp]["profiles"]]
        blob = read_verified(directory, e["file"], m.files)  # hashed, then deserialized
        out[comp] = TrtBackend(directory / e["file"], blob, trt, runtime, logger, stream,
                               names, kv if comp == "decoder" else (), max_kv_slots)
        del blob  # one engine's bytes in host memory at a time (8 GB shared on an Orin Nano)
    return out
