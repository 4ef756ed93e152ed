"""runtime/cuda_rt.py on a real CUDA GPU (marker `gpu`: skipped where no
nvidia-smi is found; also skipped where cuda-python is not installed).

These are the CUDA calls the TensorRT backend makes around an engine: device
facts for the preflight, one stream, device buffers allocated once and
reused for the KV cache, and host <-> device copies. They need no TensorRT,
so they run on any CUDA machine with cuda-python.
"""
from __future__ import annotations

import re
import subprocess

import numpy as np
import pytest

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def cuda_rt():
    pytest.importorskip("cuda.bindings.runtime", reason="cuda-python is not installed")
    from vlmedge.runtime import cuda_rt
    return cuda_rt


def test_device_facts_match_nvidia_smi(cuda_rt):
    cc, name = cuda_rt.device_facts(0)
    assert re.fullmatch(r"\d+\.\d+", cc), cc
    smi = subprocess.run(["nvidia-smi", "--query-gpu=compute_cap,name", "--format=csv,noheader"],
                         capture_output=True, text=True, check=True).stdout.splitlines()[0]
    smi_cc, smi_name = (s.strip() for s in smi.split(",", 1))
    assert cc == smi_cc
    assert name == smi_name


def test_buffer_round_trip_on_a_stream(cuda_rt):
    stream = cuda_rt.Stream()
    x = np.random.default_rng(0).standard_normal((2, 4, 37, 32)).astype(np.float32)
    buf = cuda_rt.DeviceBuffer(x.nbytes + 1024)  # sized for a larger maximum, as the KV cache is
    buf.upload(x, stream)
    back = buf.download(np.empty_like(x), stream)
    stream.synchronize()
    np.testing.assert_array_equal(back, x)
    # A second, smaller write reuses the same allocation: the pointer does not move.
    ptr = buf.ptr
    y = x[:1].copy() * 2
    buf.upload(y, stream)
    back_y = buf.download(np.empty_like(y), stream)
    stream.synchronize()
    np.testing.assert_array_equal(back_y, y)
    assert buf.ptr == ptr
    buf.free()
    buf.free()  # idempotent
    assert buf.ptr == 0
    stream.close()


def test_oversized_upload_is_refused(cuda_rt):
    stream = cuda_rt.Stream()
    buf = cuda_rt.DeviceBuffer(64)
    with pytest.raises(ValueError, match="do not fit"):
        buf.upload(np.zeros(32, np.float32), stream)
    stream.close()


def test_zero_byte_buffer_has_a_valid_address(cuda_rt):
    buf = cuda_rt.DeviceBuffer(0)
    assert buf.nbytes == 1 and buf.ptr != 0


def test_kv_slot_pool_reuses_device_buffers(cuda_rt):
    """The pool allocates each slot's device buffers once; a slot whose lease
    is dropped is handed out again with the same pointers."""
    import gc

    from vlmedge.runtime.trt_backend import KVSlotPool

    pool = KVSlotPool({"present.0.key": 4096, "present.0.value": 4096}, cuda_rt.DeviceBuffer,
                      max_slots=2)
    a = pool.acquire()
    b = pool.acquire()
    ptrs_a = {n: buf.ptr for n, buf in a.buffers.items()}
    assert set(ptrs_a.values()).isdisjoint(buf.ptr for buf in b.buffers.values())
    assert pool.allocated_bytes == 2 * 8192
    del a
    gc.collect()
    c = pool.acquire()
    assert {n: buf.ptr for n, buf in c.buffers.items()} == ptrs_a
    assert pool.allocated_bytes == 2 * 8192


def test_a_cuda_error_is_a_clear_error(cuda_rt):
    """An impossible allocation is a TensorRTError with a hint, not a crash."""
    from vlmedge.errors import TensorRTError

    with pytest.raises(TensorRTError, match="a CUDA call failed"):
        cuda_rt.DeviceBuffer(1 << 60)
