"""The few CUDA runtime calls the TensorRT path needs, through NVIDIA's
cuda-python bindings (imported lazily: `cuda.bindings.runtime`, or the older
`cuda.cudart`). Device memory, one stream, copies, and the device's compute
capability. Nothing here runs at import time.
"""
from __future__ import annotations

import contextlib
from functools import lru_cache

import numpy as np

from vlmedge.errors import MissingDependencyError, TensorRTError
from vlmedge.lazy import require


@lru_cache(maxsize=1)
def cudart():
    """The CUDA runtime module of cuda-python (12.6+ layout first)."""
    try:
        return require("cuda.bindings.runtime", "running TensorRT engines")
    except MissingDependencyError:
        return require("cuda.cudart", "running TensorRT engines")


def call(result):
    """Unwraps a cuda-python (err, *values) tuple; a CUDA error raises."""
    err, values = result[0], result[1:]
    code = getattr(err, "value", err)
    if code != 0:
        rt = cudart()
        name = rt.cudaGetErrorName(err)[1]
        name = name.decode() if isinstance(name, bytes) else str(name)
        raise TensorRTError(f"a CUDA call failed: {name} (code {code})",
                            hint="check the GPU with nvidia-smi (or tegrastats on a Jetson); "
                                 "out of memory: lower --max-context")
    if not values:
        return None
    return values[0] if len(values) == 1 else values


def device_facts(device: int = 0) -> tuple[str, str]:
    """(compute capability "major.minor", GPU name) of `device`."""
    rt = cudart()
    attr = rt.cudaDeviceAttr
    major = call(rt.cudaDeviceGetAttribute(attr.cudaDevAttrComputeCapabilityMajor, device))
    minor = call(rt.cudaDeviceGetAttribute(attr.cudaDevAttrComputeCapabilityMinor, device))
    props = call(rt.cudaGetDeviceProperties(device))
    name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
    return f"{major}.{minor}", name.rstrip("\x00").strip()


class Stream:
    """One CUDA stream; every copy and engine run of a session goes on it."""

    def __init__(self):
        self.handle = call(cudart().cudaStreamCreate())

    def synchronize(self) -> None:
        call(cudart().cudaStreamSynchronize(self.handle))

    def close(self) -> None:
        if self.handle is not None:
            call(cudart().cudaStreamDestroy(self.handle))
            self.handle = None

    def __del__(self):
        with contextlib.suppress(TensorRTError, MissingDependencyError, AttributeError, TypeError):
            self.close()


class DeviceBuffer:
    """`nbytes` of device memory, allocated once, freed with the object."""

    def __init__(self, nbytes: int):
        self.nbytes = max(int(nbytes), 1)  # a 0-byte tensor still needs a valid address
        self.ptr = int(call(cudart().cudaMalloc(self.nbytes)))

    def upload(self, array: np.ndarray, stream: Stream) -> None:
        """Host -> device (async on `stream`; keep `array` alive until synchronize)."""
        if array.nbytes > self.nbytes:
            # A bug (buffers are sized for the profiles' maximum), not user input.
            raise ValueError(f"{array.nbytes} bytes do not fit a {self.nbytes}-byte buffer")
        if array.nbytes:
            rt = cudart()
            call(rt.cudaMemcpyAsync(self.ptr, array.ctypes.data, array.nbytes,
                                    rt.cudaMemcpyKind.cudaMemcpyHostToDevice, stream.handle))

    def download(self, array: np.ndarray, stream: Stream) -> np.ndarray:
        """Device -> host into `array` (C-contiguous; valid after synchronize)."""
        if array.nbytes:
            rt = cudart()
            call(rt.cudaMemcpyAsync(array.ctypes.data, self.ptr, array.nbytes,
                                    rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream.handle))
        return array

    def free(self) -> None:
        if self.ptr:
            call(cudart().cudaFree(self.ptr))
            self.ptr = 0

    def __del__(self):
        with contextlib.suppress(TensorRTError, MissingDependencyError, AttributeError, TypeError):
            self.free()
