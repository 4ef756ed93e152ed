"""The package installs, imports, and its CLIs answer --help without torch."""
import subprocess
import sys

import pytest

CLIS = ["vlm-export", "vlm-run", "vlm-bench", "vlm-eval", "vlm-watch", "vlm-serve"]


def _bin(name):
    from pathlib import Path
    return str(Path(sys.executable).parent / name)


@pytest.mark.parametrize("cli", CLIS)
def test_cli_help(cli):
    r = subprocess.run([_bin(cli), "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "Usage" in r.stdout and len(r.stdout) > 200


def test_import_packages():
    import vlmedge
    import vlmedge.benchmarks
    import vlmedge.calibration
    import vlmedge.demo
    import vlmedge.export
    import vlmedge.runtime
    assert vlmedge.__version__


def test_runtime_import_leaves_torch_out():
    code = ("import sys, vlmedge.runtime, vlmedge.runtime.preprocess, vlmedge.runtime.cli; "
            "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; "
            "assert not bad, bad; print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


def test_c_extension_is_built():
    from vlmedge.runtime import preprocess
    assert preprocess.has_c_extension(), "the C extension should be built by pip install"


def test_demo_model_is_package_data(demo_dir):
    for name in ("config.json", "model.safetensors", "tokenizer.json",
                 "processor_config.json", "generation_config.json"):
        assert (demo_dir / name).is_file(), name


def _imports(path):
    import ast
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module


def test_imports_point_one_way():
    """runtime/ and vlmedge/ import nothing above them (DESIGN.md): no export,
    calibration, benchmarks or demo code, no torch or transformers, even lazily."""
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    above = ("vlmedge.export", "vlmedge.calibration", "vlmedge.benchmarks", "vlmedge.demo",
             "vlmedge.serve", "torch", "transformers")
    bad = [f"{f.relative_to(root)}: {m}"
           for folder in ("runtime", "vlmedge") for f in sorted((root / folder).glob("*.py"))
           for m in _imports(f) if m.startswith(above)]
    assert not bad, bad


def test_vlm_run_imports_nothing_above_the_runtime():
    """The CLI with its bundled demo image, run to the point of loading: only
    vlmedge, vlmedge.runtime and their modules are imported."""
    code = ("import sys, vlmedge.runtime.cli as c; from vlmedge.models import demo_image; "
            "assert demo_image().is_file(); "
            "above = [m for m in sys.modules if m.startswith(('vlmedge.export', "
            "'vlmedge.calibration', 'vlmedge.benchmarks', 'vlmedge.demo', 'torch'))]; "
            "assert not above, above; print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr
