"""manifest.json: the versioned contract between vlm-export and the runtime.

An artifact directory holds ONNX files (and their external weight data),
the tokenizer, and this manifest, written last. The manifest says everything
the runtime needs and nothing it must guess:

    schema_version   int; the runtime refuses a newer one
    vlmedge_version  exporter version
    family           "llava" | "idefics3" | "qwen2_vl"
    target           "onnx" | "trt";  precision "fp32" | "fp16" | "int8" | "int8-dynamic"
    source           {path, architecture, content_hash, random_weights}
    files            {name: {sha256, bytes}} for every file the runtime opens
    components       {vision|embed|decoder: {file, inputs, outputs, precision}}
                     where inputs/outputs are [{name, dtype, shape}] and shape
                     entries are ints or named dynamic dims ("batch", ...)
    decoder          {num_layers, num_kv_heads, head_dim, hidden_size, vocab_size,
                      context_length, past_key/value, present_key/value name
                      templates with "{i}", logits ("last": only the last
                      position's logits are output), position_ids ("1d"|"mrope"),
                      mrope_section for mrope}
    image            {image_token, image_token_id, tokens_per_image, feature_dim,
                      expand: how the prompt's image placeholder becomes tokens
                      ("repeat" | "idefics3" | "qwen2_vl", runtime/chat.py) and
                      what that needs (idefics3: image_seq_len, fake/global/tile
                      tokens; qwen2_vl: merge_size, patch_size, vision inputs
                      computed on the host from the patch grid, window facts)}
    preprocess       the runtime's ImagePreprocessor config (resize rule, size,
                     resample, rescale, mean/std, crop, tiling)
    tokenizer        {file, chat_template, bos_token, stop_token_ids: [...]}
    quantization     null or {precision, method ("static" | "dynamic"), format,
                      weights, activations, embedding, cpu_only (the runtime
                      then uses CPU), calibration {source, hash, samples, method,
                      cache, ...}, excluded_nodes {vision|decoder: [{node, module}]},
                      accuracy {targets, initial, final, passed}, size}
                      (calibration/report.py; more in calibration_report.json)
    validation       null or {max_abs_diff_logits, max_abs_diff_image_features,
                      tokens_match, cached_equals_recompute, ...}
    trt              null or (target "trt", export/trt/): {plan: limits and per
                      component its optimization profiles (min/opt/max shape of
                      every input), compat: the static TensorRT check's result,
                      build_script ("build_engines.sh"), builder settings;
                      after `vlm-export build-engines`: engines {component:
                      {file, sha256, bytes, profiles}}, tensorrt_version,
                      compute_capability, gpu_name, build {seconds, peak_host_mb}}
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from .errors import ArtifactError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
REQUIRED = ("schema_version", "family", "target", "precision", "files", "components",
            "decoder", "image", "preprocess", "tokenizer")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_entry(path: Path) -> dict[str, Any]:
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def write(directory: Path, manifest: dict[str, Any]) -> Path:
    """Writes manifest.json (atomically: temp file + rename)."""
    missing = [k for k in REQUIRED if k not in manifest]
    if missing:
        raise ValueError(f"manifest lacks required keys {missing}")  # a bug, not user input
    path = directory / MANIFEST
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)
    return path


def load(directory: Path | str, verify: bool = True) -> dict[str, Any]:
    """Reads and checks an artifact's manifest.

    Raises ArtifactError for: a missing directory or manifest, unparseable
    JSON, a newer schema, missing keys, a missing file, and (with verify) a
    file whose sha256 differs from the manifest's: tampered or corrupt."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ArtifactError(f"artifact directory {directory} does not exist",
                            hint="export one with: vlm-export --model demo")
    path = directory / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{directory} has no {MANIFEST}",
                            expected="an artifact directory written by vlm-export",
                            hint="an export that failed or was interrupted leaves none; re-export")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path} is not valid JSON ({e})", hint="re-export the artifact") from None
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{path} is not a JSON object", hint="re-export the artifact")
    version = manifest.get("schema_version")
    if not isinstance(version, int):
        raise ArtifactError(f"{path} has no integer schema_version", got=repr(version))
    if version > SCHEMA_VERSION:
        raise ArtifactError(
            f"artifact {directory} uses manifest schema {version}, newer than this runtime",
            expected=f"schema <= {SCHEMA_VERSION}", hint="upgrade vlmedge (pip install -U vlmedge)")
    missing = [k for k in REQUIRED if k not in manifest]
    if missing:
        raise ArtifactError(f"{path} lacks required keys {missing}", hint="re-export the artifact")
    for name, entry in manifest["files"].items():
        f = directory / name
        if not f.is_file():
            raise ArtifactError(f"artifact file {name} is missing from {directory}",
                                hint="copy the whole directory, or re-export")
        if verify:
            got = sha256_file(f)
            if got != entry["sha256"]:
                raise ArtifactError(
                    f"artifact file {name} does not match its manifest sha256 (corrupt or "
                    f"tampered)", expected=entry["sha256"][:16] + "...", got=got[:16] + "...",
                    hint="re-export or re-copy the artifact")
    return manifest
