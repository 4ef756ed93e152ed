"""The demo artifact through the runtime equals the PyTorch model token for
token on held-out questions, and runs with torch absent."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from torch_blocker import PRELUDE

pytest.importorskip("torch")

from vlmedge.demo import scenes  # noqa: E402


def test_greedy_tokens_equal_pytorch_on_56_held_out_questions(demo_artifact, demo_dir):
    from vlmedge.benchmarks.torch_answerer import TorchAnswerer
    from vlmedge.runtime import VLMSession

    torch_model = TorchAnswerer(demo_dir, max_new_tokens=24)
    session = VLMSession(demo_artifact, provider="cpu")
    items = scenes.eval_items(56, seed=7)  # 7 of each of the 8 question kinds
    mismatches = []
    for scene, q in items:
        ours = session.generate(scene.image, q.question, max_new_tokens=24).token_ids
        ref = torch_model.generate_ids(scene.image, q.question)
        if ours != ref:
            mismatches.append((scene.seed, q.question, ours, ref))
    assert not mismatches, mismatches[:3]


def test_vlm_run_answers_the_demo_with_torch_absent(demo_artifact, tmp_path):
    """vlm-run in a subprocess where importing torch/transformers fails."""
    code = (PRELUDE +
            "from vlmedge.runtime.cli import app\n"
            f"sys.argv = ['vlm-run', {str(demo_artifact)!r}, '--json', '--prompt', "
            "'how many shapes are there?']\n"
            "app()\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    from vlmedge.demo import show
    scene = scenes.make_scene(show.ASSET_SEED)
    assert out["text"] == scenes.NUMBER_WORDS[len(scene.objects)]
    assert out["timings"]["ttft_ms"] > 0


def test_vlm_eval_artifact_equals_pytorch(demo_artifact):
    exe = str(Path(sys.executable).parent / "vlm-eval")
    a = json.loads(subprocess.run([exe, str(demo_artifact), "--n", "35", "--seed", "9", "--json"],
                                  capture_output=True, text=True, timeout=600).stdout)
    t = json.loads(subprocess.run([exe, "--model", "demo", "--n", "35", "--seed", "9", "--json"],
                                  capture_output=True, text=True, timeout=600).stdout)
    assert a["accuracy"] == t["accuracy"] and a["per_kind"] == t["per_kind"]
    assert a["wrong"] == t["wrong"]
