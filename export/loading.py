"""Loading a Hugging Face VLM directory safely, for export.

Never runs code from the model directory unless trust_remote_code is given;
takes safetensors; refuses pickle-only checkpoints (a .bin/.pt file can run
arbitrary code when loaded) unless allow_pickle.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmedge.errors import ModelDirError
from vlmedge.lazy import require

from .families import Family, family_for

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass
class LoadedModel:
    path: Path
    family: Family
    model: Any
    processor: Any
    random_weights: bool
    content_hash: str


def content_hash(path: Path) -> str:
    """sha256 over config.json and the weight files (name + bytes), in name order."""
    h = hashlib.sha256()
    files = [path / "config.json"] + sorted(
        p for p in path.iterdir() if p.suffix in (".safetensors",) + PICKLE_SUFFIXES)
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            while block := fh.read(1 << 20):
                h.update(block)
    return h.hexdigest()


def load(path: Path, random_weights: bool = False, trust_remote_code: bool = False,
         allow_pickle: bool = False) -> LoadedModel:
    torch = require("torch", "exporting a model")
    transformers = require("transformers", "exporting a model")
    try:
        config = transformers.AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (ValueError, OSError, KeyError) as e:
        raise ModelDirError(f"cannot read {path / 'config.json'}: {str(e).splitlines()[0]}",
                            hint="is it a Hugging Face model directory?") from None
    family = family_for(config)
    safetensors = sorted(path.glob("*.safetensors"))
    pickles = sorted(p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if not random_weights:
        if not safetensors and not pickles:
            raise ModelDirError(f"{path} has no weights (*.safetensors)",
                                hint="pass --random-weights to export the architecture with "
                                     "random weights for latency planning")
        if not safetensors and not allow_pickle:
            raise ModelDirError(
                f"{path} has only pickle checkpoints ({pickles[0].name}), which can run code "
                f"when loaded", expected="*.safetensors",
                hint="convert to safetensors, or pass --allow-pickle if you trust the source")
    try:
        processor = family.load_processor(path, trust_remote_code=trust_remote_code)
    except (ValueError, OSError, KeyError, TypeError) as e:
        raise ModelDirError(f"cannot build the processor from {path}: {str(e).splitlines()[0]}",
                            hint="the directory needs its tokenizer and processor configs") from None
    if random_weights:
        torch.manual_seed(0)
        model = transformers.AutoModelForImageTextToText.from_config(
            config, trust_remote_code=trust_remote_code)
    else:
        model = transformers.AutoModelForImageTextToText.from_pretrained(
            path, use_safetensors=bool(safetensors), trust_remote_code=trust_remote_code)
    model = model.float().eval()
    return LoadedModel(path, family, model, processor, random_weights,
                       content_hash(path) if not random_weights else "random-weights")
