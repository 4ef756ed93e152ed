"""vlm-bench's peer: onnxruntime-genai running its own model of the same
language model, side by side with the ort-flavour artifacts (--peer
onnxruntime-genai).

Issue 16 asks for decode faster than every peer at the same bit width. Of
those peers, onnxruntime-genai is the one that installs here, and its model
builder is the one the ort flavour is built with (export/ort_decoder.py), so
the peer is exact: the same weights (the artifact's source model; random
weights from the same seed), the same precision and block size, the same
onnxruntime kernels, its own C++ generation loop and its own graph (input_ids
in, the embedding table inside). The comparison is then about what vlmedge
adds or loses around the kernels: the decode loop, the KV buffer, the graph.

A GPTQ artifact's peer is round-to-nearest in the same format (the same
kernels and bytes read; decode speed does not depend on the values).

It is a language model alone (no image): vision and preprocessing are not
measured, and it reads a text prompt as long as its partner artifact's whole
prompt (image tokens included), so each decode step attends over the same
number of positions.

Models are built once per (source, precision, block, onnxruntime-genai
version) into a cache directory (default ~/.cache/vlmedge/genai-peers) and
reused by later runs.
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

PEERS = ("onnxruntime-genai",)
PEER_KIND = "genai"


def default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "vlmedge" / "genai-peers"


def graph_file(folder: Path) -> Path:
    """The peer model's decoder graph, as its genai_config.json names it."""
    config = json.loads((Path(folder) / "genai_config.json").read_text())
    return Path(folder) / Path(config["model"]["decoder"]["filename"]).name


def _format(spec: Spec) -> tuple[str, int | None]:
    """(precision, MatMulNBits block or None) of an ort-flavour artifact's decoder."""
    m = spec.manifest
    precision = m.precision if m.precision in ("fp32", "int8", "int4") else None
    if precision is None:
        raise UserInputError(f"--peer onnxruntime-genai has no model for {spec.name}'s "
                             f"precision {m.precision!r}", expected="fp32 | int8 | int4")
    block = None
    if precision != "fp32":
        block = (m.quantization.report.get("block_size") if m.quantization else None) or 32
    return precision, block


def peer_name(precision: str, block: int | None) -> str:
    """genai-int4, genai-int4-b128 (a block other than the builder's 32)."""
    return f"{PEER_KIND}-{precision}" + (f"-b{block}" if block not in (None, 32) else "")


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


def peer_specs(specs: list[Spec], cache: Path, log: Callable[[str], None]) -> list[Spec]:
    """One peer Spec per distinct (source, precision, block) among the
    ort-flavour systems, partnered with the first of them; building any model
    not in `cache` yet."""
    peers: dict[tuple, Spec] = {}
    for spec in specs:
        if spec.kind != "onnx" or spec.decoder_flavour != "ort":
            continue
        precision, block = _format(spec)
        path, random_weights, ident = _source(spec)
        key = (ident, precision, block)
        if key in peers:
            continue
        folder = _built(path, random_weights, ident, precision, block, cache, log)
        name = peer_name(precision, block)
        if any(p.name == name for p in peers.values()):
            name = f"{name}:{spec.name}"
        peers[key] = Spec(name, PEER_KIND, folder, None, random_weights,
                          precision=precision, partner=spec.name)
    if not peers:
        raise UserInputError("--peer onnxruntime-genai needs an ort-flavour artifact to "
                             "pair with", hint="export one with vlm-export --decoder-flavour ort")
    return list(peers.values())


def _built(path: Path, random_weights: bool, ident: str, precision: str, block: int | None,
           cache: Path, log: Callable[[str], None]) -> Path:
    """The peer model's folder in `cache`, built now if missing. A build goes
    to a scratch folder beside it and is renamed into place when whole."""
    from vlmedge.lazy import require

    og = require("onnxruntime_genai", "--peer onnxruntime-genai")
    key = json.dumps([ident, precision, block, og.__version__])
    folder = cache / hashlib.sha256(key.encode()).hexdigest()[:16]
    if (folder / "genai_config.json").is_file():
        log(f"peer {peer_name(precision, block)}: {folder} (built before)")
        return folder
    log(f"building the onnxruntime-genai peer {peer_name(precision, block)} from {path} "
        f"(its model builder, once; cached in {cache}) ...")
    from vlmedge.export import loading, ort_decoder

    cache.mkdir(parents=True, exist_ok=True)
    scratch = cache / f".building-{folder.name}-{os.getpid()}"
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        loaded = loading.load(path, random_weights=random_weights)
        ort_decoder.build_text_model(loaded, scratch, precision, block or ort_decoder.BLOCK_SIZE)
        (scratch / "vlmedge-peer.json").write_text(key + "\n")
        os.replace(scratch, folder)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return folder
