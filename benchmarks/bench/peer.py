"""vlm-bench's peers: other runtimes on their own model of the same language
model, side by side with the ort-flavour artifacts (--peer NAME, repeatable).

Issue 16 asks for decode faster than every peer at the same bit width. Two of
its peers install here:

  onnxruntime-genai  its generator on the model its builder makes (the same
                     builder the ort flavour is built with, export/ort_decoder.py):
                     the same weights, precision and MatMulNBits block, the same
                     onnxruntime kernels, its own C++ loop and graph (input_ids in,
                     the embedding table inside). The comparison is about what
                     vlmedge adds or loses around the kernels.
  llama.cpp          llama-cpp-python's C API on a GGUF of the same weights
                     (gguf_model.py), quantized by llama.cpp to the same bit width:
                     q8_0 for int8, q4_0 for int4 (blocks of 32; llama.cpp keeps its
                     output tensor at higher precision by default), f32 for fp32.
                     Its own kernels against onnxruntime's.

The same weights: the artifact's source model (random weights from the same
seed). A GPTQ artifact's peer is round-to-nearest in the same format (decode
speed does not depend on the values).

A peer is a language model alone (no image): vision and preprocessing are not
measured, and it reads a prompt as long as its partner artifact's whole prompt
(image tokens included), so each decode step attends over the same number of
positions.

Models are built once per (peer, source, precision, block, peer version) into
a cache directory (default ~/.cache/vlmedge/peers) and reused by later runs.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable

from vlmedge.errors import UserInputError

from .systems import Spec

# --peer NAME -> the worker kind that runs it (worker.py)
PEERS = {"onnxruntime-genai": "genai", "llama.cpp": "llamacpp"}
KINDS = set(PEERS.values())
_MODULES = {"genai": ("onnxruntime_genai",), "llamacpp": ("llama_cpp", "gguf")}
# Part of every cache key: raised when what this file or gguf_model.py writes
# changes, so a cached model of the old writer is not reused.
PEER_FORMAT = 1


def default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "vlmedge" / "peers"


def _format(spec: Spec) -> tuple[str, int | None]:
    """(precision, MatMulNBits block or None) of an ort-flavour artifact's decoder."""
    m = spec.manifest
    precision = m.precision if m.precision in ("fp32", "int8", "int4") else None
    if precision is None:
        raise UserInputError(f"--peer has no model for {spec.name}'s precision "
                             f"{m.precision!r}", expected="fp32 | int8 | int4")
    block = None
    if precision != "fp32":
        block = (m.quantization.report.get("block_size") if m.quantization else None) or 32
    return precision, block


def peer_name(kind: str, precision: str, block: int | None) -> str:
    """genai-int4, genai-int4-b128 (a block other than the builder's 32), llamacpp-q4_0."""
    if kind == "llamacpp":
        from .gguf_model import FTYPES
        return f"llamacpp-{FTYPES[precision][0]}"
    return f"genai-{precision}" + (f"-b{block}" if block not in (None, 32) else "")


def model_file(kind: str, folder: Path) -> Path:
    """The file a peer runs: the GGUF, or the graph genai_config.json names."""
    if kind == "llamacpp":
        return Path(folder) / "model.gguf"
    config = json.loads((Path(folder) / "genai_config.json").read_text())
    return Path(folder) / Path(config["model"]["decoder"]["filename"]).name


def _source(spec: Spec) -> tuple[Path, bool, str]:
    """(the source model directory, random weights?, its identity for the cache key)."""
    src = spec.manifest.source
    path = Path(src.path)
    if not (path / "config.json").is_file():
        raise UserInputError(
            f"the peer needs {spec.name}'s source model {path}, which is not on this machine",
            hint="benchmark on the machine that exported the artifact, or leave out --peer")
    ident = src.content_hash
    if src.random_weights:  # seeded: the config decides the weights
        ident = "random:" + hashlib.sha256((path / "config.json").read_bytes()).hexdigest()
    return path, bool(src.random_weights), ident


def peer_specs(specs: list[Spec], peers: list[str], cache: Path,
               log: Callable[[str], None]) -> list[Spec]:
    """Per peer, one Spec per distinct (source, precision, block) among the
    ort-flavour systems, partnered with the first of them; building any model
    not in `cache` yet."""
    partners = [s for s in specs if s.kind == "onnx" and s.decoder_flavour == "ort"]
    if not partners:
        raise UserInputError("--peer needs an ort-flavour artifact to pair with",
                             hint="export one with vlm-export --decoder-flavour ort")
    from vlmedge.lazy import require

    out: list[Spec] = []
    for name in peers:
        kind = PEERS[name]
        for module in _MODULES[kind]:  # before any timing: a missing one fails now
            require(module, f"--peer {name}")
        seen: dict[tuple, Spec] = {}
        for spec in partners:
            precision, block = _format(spec)
            path, random_weights, ident = _source(spec)
            key = (ident, precision, block if kind == "genai" else None)
            if key in seen:
                continue
            label = peer_name(kind, precision, block)
            if any(p.name == label for p in seen.values()):
                label = f"{label}:{spec.name}"
            folder = _built(kind, path, random_weights, key, precision, block, cache, log,
                            label)
            seen[key] = Spec(label, kind, folder, None, random_weights,
                             precision=precision, partner=spec.name)
        out += seen.values()
    return out


def _built(kind: str, path: Path, random_weights: bool, key: tuple, precision: str,
           block: int | None, cache: Path, log: Callable[[str], None], label: str) -> Path:
    """The peer model's folder in `cache`, built now if missing. A build goes
    to a scratch folder beside it and is renamed into place when whole."""
    import importlib

    version = getattr(importlib.import_module(_MODULES[kind][0]), "__version__", "?")
    ident = json.dumps([PEER_FORMAT, kind, *key, version])
    folder = cache / hashlib.sha256(ident.encode()).hexdigest()[:16]
    if _whole(folder):
        log(f"peer {label}: {folder} (built before)")
        return folder
    log(f"building the peer {label} from {path} (once; cached in {cache}) ...")
    from vlmedge.export import loading

    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserInputError(f"--peer-cache {cache} cannot be made: {e.strerror}",
                             hint="pass --peer-cache DIR, a writable directory") from None
    _sweep(cache)
    scratch = cache / f".building-{folder.name}-{os.getpid()}"
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        loaded = loading.load(path, random_weights=random_weights)
        if kind == "genai":
            from vlmedge.export import ort_decoder
            ort_decoder.build_text_model(loaded, scratch, precision,
                                         block or ort_decoder.BLOCK_SIZE)
        else:
            from . import gguf_model
            scratch.mkdir(parents=True)
            f32 = scratch / ("model.gguf" if precision == "fp32" else "model-f32.gguf")
            gguf_model.write_f32(loaded, f32)
            del loaded
            if precision != "fp32":
                gguf_model.quantize(f32, scratch / "model.gguf", precision)
                f32.unlink()
        (scratch / "vlmedge-peer.json").write_text(ident + "\n")  # written last: whole
        if folder.exists() and not _whole(folder):
            shutil.rmtree(folder)  # a folder without its marker is no model
        try:
            os.replace(scratch, folder)
        except OSError:  # another vlm-bench built it meanwhile: theirs is as good
            if not _whole(folder):
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return folder


def _whole(folder: Path) -> bool:
    """A peer model folder renamed into place whole (its marker is written last)."""
    return (folder / "vlmedge-peer.json").is_file()


def _sweep(cache: Path) -> None:
    """Removes the scratch folders of builds whose process is gone (killed, out
    of memory): a half-written f32 GGUF is the size of the model."""
    for scratch in cache.glob(".building-*"):
        pid = scratch.name.rsplit("-", 1)[-1]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)  # signal 0: only asks whether the process exists
        except ProcessLookupError:
            shutil.rmtree(scratch, ignore_errors=True)
        except PermissionError:  # alive, another user's
            pass
