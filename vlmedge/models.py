"""Where models come from: `demo` names the bundled, trained demo VLM."""
from __future__ import annotations

from importlib import resources
from pathlib import Path

from .errors import ModelDirError

DEMO = "demo"


def demo_model_dir() -> Path:
    """The installed demo model directory (package data of vlmedge.demo)."""
    return Path(str(resources.files("vlmedge.demo") / "model"))


def demo_image() -> Path:
    """The bundled demo scene image (package data of vlmedge.demo), found
    without importing vlmedge.demo: the runtime imports nothing above it."""
    import importlib.util
    spec = importlib.util.find_spec("vlmedge.demo")
    return Path(list(spec.submodule_search_locations)[0]) / "assets" / "scene.png"


def resolve_model_dir(model: str | Path) -> Path:
    """`demo` or a Hugging Face model directory -> a checked directory path.

    Raises ModelDirError when the directory is missing or has no config.json."""
    if str(model) == DEMO:
        path = demo_model_dir()
    else:
        path = Path(model).expanduser()
    if not path.exists():
        raise ModelDirError(f"model directory {path} does not exist",
                            expected="a Hugging Face model directory or 'demo'",
                            hint="check the path, or use --model demo")
    if not path.is_dir():
        raise ModelDirError(f"model path {path} is not a directory",
                            expected="a Hugging Face model directory")
    if not (path / "config.json").is_file():
        raise ModelDirError(f"model directory {path} has no config.json",
                            expected="a Hugging Face model directory (config.json + weights)",
                            got=f"{sorted(p.name for p in path.iterdir())[:6]}")
    return path
