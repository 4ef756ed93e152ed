"""Activation ranges for static INT8: collected with onnxruntime's
calibrators, cached on disk.

Collection runs onnxruntime's calibrator (its graph augmented with range
reductions or histogram outputs) on feeds that a generator produces lazily
(feeds.py), in chunks, so a large model's KV caches never pile up in memory.

The cache (one JSON file per graph, in onnxruntime's own calibration-cache
format plus a "vlmedge" block) is keyed by a sha256 over:

    model          the fp32 graph file and its weights (sha256 from the manifest)
    preprocessing  the manifest's preprocess, image and tokenizer sections and
                   the vlmedge version (the code that turns images and prompts
                   into feeds)
    data           the calibration split's hash (dataset.py)
    method         calibration method, decode steps, calibrated op types,
                   onnxruntime version

A hit skips collection; anything else (no file, another key, a file that
does not parse or lacks a tensor the graph needs) recollects and says why.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from vlmedge.lazy import require

METHODS = ("minmax", "entropy", "percentile")
CHUNK = 32  # feeds per collect_data call: bounds the calibrator's buffered outputs


def default_cache_dir() -> Path:
    env = os.environ.get("VLMEDGE_CACHE_DIR")
    if env:
        return Path(env).expanduser() / "calibration"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "vlmedge" / "calibration"


def method_enum(method: str):
    q = require("onnxruntime.quantization", "INT8 calibration")
    return {"minmax": q.CalibrationMethod.MinMax, "entropy": q.CalibrationMethod.Entropy,
            "percentile": q.CalibrationMethod.Percentile}[method]


def cache_key(fields: dict) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()


@dataclass
class CacheResult:
    path: Path  # the ranges file quantize_static reads
    status: str  # "hit" | "miss" | "off"
    reason: str  # why it missed


def lookup(cache_dir: Path | None, graph: str, key: str, needed: set[str],
           scratch: Path) -> CacheResult:
    """The cached ranges for `key` if present and complete."""
    if cache_dir is None:
        return CacheResult(scratch / f"{graph}-ranges.json", "off", "cache disabled")
    path = cache_dir / f"{graph}-{key[:24]}.json"
    if not path.is_file():
        return CacheResult(path, "miss", "no entry")
    try:
        payload = json.loads(path.read_text())
        stored_key = payload["vlmedge"]["key"]
        stored = set(payload["data"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        return CacheResult(path, "miss", f"unreadable entry ({type(e).__name__})")
    if stored_key != key:  # a 24-hex prefix collision, in practice never
        return CacheResult(path, "miss", "entry has another key")
    missing = needed - stored
    if missing:
        return CacheResult(path, "miss", f"entry lacks {len(missing)} tensor(s), e.g. "
                                         f"{sorted(missing)[0]}")
    return CacheResult(path, "hit", "")


def store(path: Path, tensors, key: str, fields: dict) -> None:
    """Writes onnxruntime's calibration-cache JSON plus our key (temp + rename)."""
    from onnxruntime.quantization.calibrate import CalibrationCacheEncoder

    payload = tensors.to_dict()
    payload["smooth_quant"] = False  # quantize_static checks it on load
    payload["vlmedge"] = {"key": key, "fields": fields}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(payload, cls=CalibrationCacheEncoder))
    tmp.replace(path)


def collect(model_path: Path, op_types: list[str], method: str, feeds: Iterator[dict],
            scratch: Path, threads: int | None):
    """Runs onnxruntime's calibrator for `method` over `feeds` -> TensorsData."""
    q = require("onnxruntime.quantization", "INT8 calibration")
    scratch.mkdir(parents=True, exist_ok=True)
    # Each collect_data call reduces and frees its chunk's outputs (MinMax
    # merges ranges, the histogram methods merge histograms), so chunks of
    # CHUNK feeds bound memory. (MinMax's own max_intermediate_outputs drops
    # data in onnxruntime 1.32 rather than merging it: not used.)
    with quiet_ort_logging():
        calibrator = q.create_calibrator(
            model_path, op_types, augmented_model_path=str(scratch / "augmented.onnx"),
            calibrate_method=method_enum(method), use_external_data_format=True)
    _reopen_session(calibrator, threads)
    # The histogram methods stack a chunk's outputs with np.asarray, which
    # needs equal shapes: decoder feeds differ in length, so they go one by one.
    chunks = _Chunks(feeds, CHUNK if method == "minmax" else 1)
    with contextlib.redirect_stdout(io.StringIO()):  # the histogram collector prints progress
        while chunks.more():
            calibrator.collect_data(chunks)
            chunks.next_chunk()
        tensors = calibrator.compute_data()
    del calibrator
    return tensors


def _reopen_session(calibrator, threads: int | None) -> None:
    """Reopens the calibrator's session over its augmented graph so that a
    pass holds a few activations at a time, not all of them.

    The augmented graph gives every calibrated tensor a reduction (or a
    histogram output). In onnxruntime's default execution order those nodes
    ran after the whole forward pass, so every activation stayed alive until
    the end, and the memory pattern then reserved that whole set again: 7.4
    GB for SmolVLM-256M's 370 MB vision tower at 512 px. The priority-based
    order runs each reduction as soon as its input exists (peak 0.7 GB, and
    2.6x faster). Also: `threads` intra-op threads (onnxruntime's default is
    one per core)."""
    ort = require("onnxruntime", "INT8 calibration")
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    opts.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    calibrator.infer_session = None  # the calibrator's own session goes first
    calibrator.infer_session = ort.InferenceSession(
        calibrator.augmented_model_path, sess_options=opts, providers=["CPUExecutionProvider"])


class _Chunks:
    """A CalibrationDataReader that hands out `size` feeds at a time
    (get_next returns None at the end of each chunk)."""

    def __init__(self, feeds: Iterator[dict], size: int):
        self.feeds, self.size, self.given = feeds, size, 0
        self._peek = next(feeds, None)

    def more(self) -> bool:
        return self._peek is not None

    def next_chunk(self) -> None:
        self.given = 0

    def get_next(self):
        if self.given >= self.size or self._peek is None:
            return None
        item, self._peek = self._peek, next(self.feeds, None)
        self.given += 1
        return item

    def __iter__(self):
        return iter(self.get_next, None)


@contextmanager
def quiet_ort_logging():
    """onnxruntime.quantization logs advice on the root logger ("consider
    pre-processing", per-tensor notes); keep the export's output to ours."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def needed_tensors(model, nodes: list[str]) -> set[str]:
    """Float activation inputs of `nodes` (not initializers): the ranges a
    QDQ quantization of those nodes reads."""
    inits = {i.name for i in model.graph.initializer}
    wanted = set(nodes)
    return {x for n in model.graph.node if n.name in wanted for x in n.input[:1]
            if x and x not in inits}


Log = Callable[[str], None]
