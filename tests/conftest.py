import importlib.util
import os
import shutil

import pytest


def _has(mod: str) -> bool:
    try:
        return importlib.util.find_spec(mod) is not None
    except (ImportError, ValueError):
        return False


def pytest_collection_modifyitems(config, items):
    skip_trt = pytest.mark.skip(reason="TensorRT is not importable here")
    skip_gpu = pytest.mark.skip(reason="no CUDA GPU here")
    has_gpu = shutil.which("nvidia-smi") is not None
    for item in items:
        if "trt" in item.keywords and not _has("tensorrt"):
            item.add_marker(skip_trt)
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(skip_gpu)
        if "slow" in item.keywords and not os.environ.get("VLMEDGE_SLOW") \
                and "slow" not in (config.getoption("-m") or ""):
            item.add_marker(pytest.mark.skip(reason="slow: run with -m slow or VLMEDGE_SLOW=1"))


@pytest.fixture(scope="session")
def demo_dir():
    from vlmedge.models import demo_model_dir
    return demo_model_dir()
