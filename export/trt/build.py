"""`vlm-export build-engines`: one TensorRT engine per component, on the device.

Uses the TensorRT Python API (imported lazily) with what the manifest's
`trt` section says: the optimization profiles of the plan, a strongly typed
network (precision from the graphs; see trtexec.py for why), a workspace
limit and a timing cache kept between builds. Records in the manifest, last
and atomically: the engines (file, sha256), the TensorRT version, the GPU's
compute capability and name, the builder settings, and the build's peak host
memory (an Orin Nano shares 8 GB between CPU and GPU, so it matters).

`adopt=True` records engines that build_engines.sh (trtexec) already wrote,
after checking that each deserializes here with the plan's profile count.
"""
from __future__ import annotations

import os
import resource
import sys
import time
from pathlib import Path
from typing import Any, Callable

from vlmedge import containment, manifest
from vlmedge.errors import ArtifactError, TensorRTError, UserInputError
from vlmedge.lazy import require

from .trtexec import DEFAULT_WORKSPACE_MB, TIMING_CACHE, engine_file

MIN_TENSORRT = (10, 0)  # strongly typed networks, --profile in trtexec, name-based I/O API


def peak_host_mb() -> float:
    """This process's peak resident memory so far (the builder runs in-process)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024.0 if sys.platform != "darwin" else rss / 2**20  # kB on Linux, B on macOS


def _load_trt_manifest(directory: Path) -> dict[str, Any]:
    """The artifact's manifest, checked as the runtime checks it (strict parse,
    containment, every file's sha256) before anything is built, as a dict
    that the build then edits."""
    m = manifest.load(directory).to_dict()
    t = m.get("trt") or {}
    if m["target"] != "trt" or not t.get("plan"):
        raise ArtifactError(f"{directory} was not exported for TensorRT (target "
                            f"{m['target']!r}, no trt plan in its manifest)",
                            hint="export it with: vlm-export --target trt --precision fp16")
    return m


def _tensorrt():
    trt = require("tensorrt", "building TensorRT engines")
    version = tuple(int(x) for x in trt.__version__.split(".")[:2])
    if version < MIN_TENSORRT:
        raise TensorRTError(f"TensorRT {trt.__version__} is too old for these engines",
                            expected=f">= {'.'.join(map(str, MIN_TENSORRT))}",
                            hint="upgrade TensorRT (JetPack 6 or later on a Jetson)")
    return trt


def _timing_cache(trt, config, path: Path, log) -> Any:
    data = path.read_bytes() if path.is_file() else b""
    cache = config.create_timing_cache(data)
    if not config.set_timing_cache(cache, ignore_mismatch=False):
        log(f"[build] timing cache {path} is from another device or TensorRT; starting a new one")
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, ignore_mismatch=True)
    return cache


def _save_atomic(path: Path, data) -> None:
    tmp = path.with_name(path.name + f".partial-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
    tmp.replace(path)


def build_one(trt, onnx_path: Path, plan_component: dict[str, Any], *, workspace_mb: int | None,
              cache_path: Path, log: Callable[[str], None]):
    """Parses one ONNX graph and builds its serialized engine (IHostMemory)."""
    from vlmedge.runtime.trt_backend import make_logger

    logger = make_logger(trt)
    builder = trt.Builder(logger)
    # Strongly typed: layer precisions follow the ONNX types (required in TensorRT 11).
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # external weight data resolves beside it
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise TensorRTError(f"TensorRT's ONNX parser rejected {onnx_path.name}: "
                            f"{errors[0] if errors else logger.last()}",
                            got=f"{len(errors)} parser error(s)",
                            hint=f"vlm-export check-trt {onnx_path.parent} lists unsupported nodes")
    config = builder.create_builder_config()
    if workspace_mb:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
    for prof in plan_component["profiles"]:
        p = builder.create_optimization_profile()
        for name, s in prof["shapes"].items():
            p.set_shape(name, s["min"], s["opt"], s["max"])
        config.add_optimization_profile(p)
    _timing_cache(trt, config, cache_path, log)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise TensorRTError(f"TensorRT could not build {onnx_path.name}: {logger.last()}",
                            hint="out of memory? lower --workspace, or re-export with a smaller "
                                 "--max-context")
    _save_atomic(cache_path, config.get_timing_cache().serialize())
    return engine


def _check_deserializes(trt, path: Path, n_profiles: int) -> None:
    from vlmedge.runtime.trt_backend import make_logger

    logger = make_logger(trt)
    engine = trt.Runtime(logger).deserialize_cuda_engine(path.read_bytes())
    if engine is None:
        raise ArtifactError(f"{path.name} does not deserialize with TensorRT {trt.__version__} "
                            f"here: {logger.last()}",
                            hint=f"rebuild it here: vlm-export build-engines {path.parent}")
    if engine.num_optimization_profiles != n_profiles:
        raise ArtifactError(f"{path.name} has {engine.num_optimization_profiles} optimization "
                            f"profiles, the plan {n_profiles}",
                            hint=f"rebuild it: vlm-export build-engines {path.parent}")


def build_engines(directory: Path | str, *, workspace_mb: int | None = DEFAULT_WORKSPACE_MB,
                  timing_cache: Path | str | None = None, adopt: bool = False,
                  log: Callable[[str], None] = print) -> dict[str, Any]:
    """Builds (or adopts) every component's engine and records them in the manifest."""
    directory = Path(directory)
    if workspace_mb is not None and workspace_mb <= 0:
        raise UserInputError("--workspace must be a positive number of MB", got=str(workspace_mb))
    m = _load_trt_manifest(directory)
    trt = _tensorrt()
    from vlmedge.runtime import cuda_rt
    cc, gpu = cuda_rt.device_facts()
    t = m["trt"]
    if t.get("engines"):  # un-record old engines first: a crash mid-build leaves a valid artifact
        for e in t["engines"].values():
            m["files"].pop(e["file"], None)
        t.update(engines=None, tensorrt_version=None, compute_capability=None)
        manifest.write(directory, m)
    if timing_cache:
        cache_path = Path(timing_cache)  # the user's own
    else:
        # A cache that came with the artifact is unlisted bytes TensorRT would
        # deserialize: start a fresh one instead (this build writes it).
        cache_path = directory / TIMING_CACHE
        cache_path.unlink(missing_ok=True)
    engines, seconds = {}, {}
    for comp, spec in m["components"].items():
        pc = t["plan"]["components"][comp]
        path = directory / engine_file(comp)
        t0 = time.perf_counter()
        if adopt:
            if not os.path.lexists(path):
                raise ArtifactError(f"--adopt: {path.name} is missing from {directory}",
                                    hint="run build_engines.sh first, or build without --adopt")
            real = containment.resolve_inside(directory, path.name, f"--adopt {path.name}")
            _check_deserializes(trt, real, len(pc["profiles"]))
        else:
            log(f"[build] {comp}: {len(pc['profiles'])} profile(s) "
                f"({', '.join(p['name'] for p in pc['profiles'])}) ...")
            graph = containment.checked_graph(
                directory, spec["file"], f"components.{comp}.file", m["files"],
                allowed={spec["data_file"]} if spec.get("data_file") else set())
            engine = build_one(trt, graph, pc, workspace_mb=workspace_mb,
                               cache_path=cache_path, log=log)
            _save_atomic(path, engine)
            del engine  # the serialized engine's host copy
        seconds[comp] = round(time.perf_counter() - t0, 1)
        m["files"][path.name] = manifest.file_entry(path)
        engines[comp] = {"file": path.name, "sha256": m["files"][path.name]["sha256"],
                         "bytes": m["files"][path.name]["bytes"],
                         "profiles": [p["name"] for p in pc["profiles"]]}
        log(f"[build] {comp}: {path.name} {engines[comp]['bytes'] / 1e6:.1f} MB in "
            f"{seconds[comp]:.1f}s; peak host memory {peak_host_mb():.0f} MB")
    t.update(engines=engines, tensorrt_version=trt.__version__, compute_capability=cc,
             gpu_name=gpu)
    t["builder"] = {"strongly_typed": True, "network_flags": ["STRONGLY_TYPED"],
                    "builder_flags": [], "workspace_mb": workspace_mb,
                    "timing_cache": str(cache_path), "adopted": adopt,
                    "tool": "trtexec (build_engines.sh)" if adopt else "tensorrt python API"}
    t["build"] = {"seconds": seconds, "peak_host_mb": round(peak_host_mb(), 1)}
    manifest.write(directory, m)  # last: the engines count only once recorded
    return {"engines": engines, "tensorrt_version": trt.__version__, "compute_capability": cc,
            "gpu_name": gpu, "peak_host_mb": t["build"]["peak_host_mb"], "seconds": seconds}
