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


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory):
    """A tiny random-weight LLaVA (demo tokenizer/processor) saved as an HF dir.
    initializer_range 0.2 so greedy output is not a flat-logit cycle."""
    torch = pytest.importorskip("torch")
    from transformers import LlavaForConditionalGeneration

    from vlmedge.demo import build

    torch.manual_seed(0)
    cfg = build.make_config("tiny")
    cfg.text_config.initializer_range = 0.2
    out = tmp_path_factory.mktemp("tiny_llava")
    build.save_model_dir(LlavaForConditionalGeneration(cfg).eval(), out)
    return out


@pytest.fixture(scope="session")
def tiny_llava_artifact(tiny_llava_dir, tmp_path_factory):
    """(artifact dir, export summary) for the tiny LLaVA, exported once."""
    from vlmedge.export import exporter

    out = tmp_path_factory.mktemp("arts") / "tiny-llava-onnx-fp32"
    summary = exporter.run_export(exporter.ExportOptions(model_dir=tiny_llava_dir, output=out),
                                  log=lambda s: None)
    return out, summary


@pytest.fixture(scope="session")
def demo_artifact(tmp_path_factory):
    """The demo model exported (fp32, validated) once per test session."""
    pytest.importorskip("torch")
    from vlmedge.export import exporter
    from vlmedge.models import demo_model_dir

    out = tmp_path_factory.mktemp("demo_art") / "demo-onnx-fp32"
    exporter.run_export(exporter.ExportOptions(model_dir=demo_model_dir(), output=out),
                        log=lambda s: None)
    return out


def pytest_terminal_summary(terminalreporter):
    """The fuzz harness's case counts (tests/test_fuzz.py), when it ran."""
    import fuzz_stats

    for line in fuzz_stats.lines():
        terminalreporter.write_line(line)
