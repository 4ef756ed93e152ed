"""Loading a Hugging Face VLM directory safely, for export.

Never runs code from the model directory unless trust_remote_code is given;
takes safetensors; refuses pickle-only checkpoints (a .bin/.pt file can run
arbitrary code when loaded) unless allow_pickle.
"""
from __future__ import annotations

import hashlib
import json
import pickle
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from vlmedge.errors import MissingDependencyError, ModelDirError
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
         allow_pickle: bool = False, log: Callable[[str], None] | None = None,
         pan_and_scan: bool = False) -> LoadedModel:
    """The model, its processor and family. `log` takes warnings (one line
    each, "vlmedge: warning: ..."); stderr where None. pan_and_scan: the
    processor crops elongated images (Gemma 3; refused for other families
    before the weights load)."""
    torch = require("torch", "exporting a model")
    transformers = require("transformers", "exporting a model")
    try:
        config = transformers.AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (ValueError, OSError, KeyError) as e:
        raise ModelDirError(f"cannot read {path / 'config.json'}: {str(e).splitlines()[0]}",
                            hint="is it a Hugging Face model directory?") from None
    family = family_for(config)
    family.check_config(config)  # e.g. a llava config with a tower the family cannot export
    if not trust_remote_code:
        _warn_custom_code(path, log or _stderr)
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
    except MissingDependencyError:
        raise
    except ImportError as e:  # a processor class that needs torchvision, or another package
        missing = getattr(e, "name", None)
        raise MissingDependencyError(
            f"building the processor of {path} needs a package that is not installed: "
            f"{_first_line(e)}",
            hint=f"pip install {missing}" if missing else "install the package it names") from None
    family.configure_processor(processor, pan_and_scan=pan_and_scan)
    if random_weights:
        torch.manual_seed(0)
        model = transformers.AutoModelForImageTextToText.from_config(
            config, trust_remote_code=trust_remote_code)
    else:
        model = _from_pretrained(transformers, path, safetensors or pickles, trust_remote_code)
    model = model.float().eval()
    return LoadedModel(path, family, model, processor, random_weights,
                       content_hash(path) if not random_weights else "random-weights")


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    if lines:
        return lines[0]
    return "the file ends early (EOFError)" if isinstance(e, EOFError) else type(e).__name__


# Config files whose "auto_map" names classes from the directory's own code.
_AUTO_MAP_FILES = ("config.json", "processor_config.json", "preprocessor_config.json",
                   "tokenizer_config.json")


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _warn_custom_code(path: Path, log: Callable[[str], None]) -> None:
    """One warning line to `log` naming the directory's custom code (auto_map
    entries, *.py files), which does not run without trust_remote_code:
    transformers then quietly builds its built-in class for the model_type."""
    found = []
    for name in _AUTO_MAP_FILES:
        f = path / name
        if not f.is_file():
            continue
        try:
            auto_map = json.loads(f.read_text()).get("auto_map")
        except (OSError, ValueError, AttributeError):
            continue  # an unreadable config fails with its own error where it is read
        if isinstance(auto_map, dict):
            found += [f"{k} -> {v if isinstance(v, str) else '/'.join(map(str, v))} ({name})"
                      for k, v in auto_map.items()]
    found += sorted(p.name for p in path.glob("*.py"))
    if found:
        log(f"vlmedge: warning: {path} has custom code that will NOT run without "
            f"--trust-remote-code: {', '.join(found)}; transformers' built-in class for the "
            f"model type is used instead (pass --trust-remote-code if you trust the source)")


def _weights_error_types() -> tuple[type[BaseException], ...]:
    """What transformers 5.24's from_pretrained raises for a corrupt checkpoint:
    SafetensorError (a truncated or garbled *.safetensors header/data),
    pickle.UnpicklingError (torch.load's weights-only unpickler on garbage),
    EOFError (an empty pickle), RuntimeError (torch.load on a truncated zip
    archive; also a state dict whose shapes disagree with config.json), and
    OSError for files that cannot be read."""
    types: tuple[type[BaseException], ...] = (OSError, EOFError, RuntimeError,
                                               pickle.UnpicklingError)
    try:
        from safetensors import SafetensorError
    except ImportError:
        return types
    return types + (SafetensorError,)


def _bad_weight_file(files: list[Path]) -> Path | None:
    """The first *.safetensors file whose header does not read, if any."""
    try:
        from safetensors import SafetensorError, safe_open
    except ImportError:
        return None

    for f in files:
        if f.suffix != ".safetensors":
            continue
        try:
            with safe_open(str(f), "pt") as fh:
                fh.keys()
        except (SafetensorError, OSError):
            return f
    return None


def _checkpoint_message(text: str) -> bool:
    """torch.load's and transformers' RuntimeErrors about the file itself."""
    return any(k in text for k in ("PytorchStreamReader", "zip archive", "central directory",
                                   "unpickl", "state_dict", "size mismatch", "storage"))


def _from_pretrained(transformers, path: Path, files: list[Path], trust_remote_code: bool):
    try:
        return transformers.AutoModelForImageTextToText.from_pretrained(
            path, use_safetensors=any(f.suffix == ".safetensors" for f in files),
            trust_remote_code=trust_remote_code)
    except _weights_error_types() as e:
        if type(e) is RuntimeError and not _checkpoint_message(str(e)):
            raise  # out of memory, a transformers bug: not a corrupt file
        bad = _bad_weight_file(files)
        where = bad or (files[0] if len(files) == 1 else
                        f"{path} ({', '.join(f.name for f in files)})")
        # torch.load's message on garbage suggests weights_only=False: not advice to pass on.
        detail = "not a checkpoint torch.load's weights-only unpickler reads (UnpicklingError)" \
            if isinstance(e, pickle.UnpicklingError) else _first_line(e)
        raise ModelDirError(f"cannot load the weights in {where}: {detail}",
                            hint="the file may be truncated or corrupt: copy or download it "
                                 "again") from None
