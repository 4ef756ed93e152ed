"""`make demo`: the demo VLM answers questions about a bundled scene image.

Runs the PyTorch model (the `export` extra). Prints each question, the
answer, the expected answer from the scene's ground truth, and timings.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from . import scenes

ASSET = Path(__file__).parent / "assets" / "scene.png"
ASSET_SEED = scenes.EVAL_SEED_BASE + 424_242  # an evaluation seed: never trained on


def main() -> int:
    t0 = time.perf_counter()
    from vlmedge.benchmarks.torch_answerer import TorchAnswerer
    from vlmedge.models import demo_model_dir

    from PIL import Image

    answerer = TorchAnswerer(demo_model_dir())
    load_s = time.perf_counter() - t0
    image = Image.open(ASSET).convert("RGB")
    scene = scenes.make_scene(ASSET_SEED)
    print(f"demo VLM loaded in {load_s:.1f}s from {demo_model_dir()}")
    print(f"image: {ASSET} (scene seed {ASSET_SEED}: {scenes.caption(scene)})")
    right = 0
    qs = scenes.questions(scene)
    for q in qs:
        t = time.perf_counter()
        got = answerer(image, q.question)
        ms = (time.perf_counter() - t) * 1000
        ok = got.strip() == q.answer
        right += ok
        print(f"  Q: {q.question:34s} A: {got:50s} {'ok' if ok else 'expected ' + q.answer}"
              f"  ({ms:.0f} ms)")
    print(f"{right}/{len(qs)} correct")
    return 0


if __name__ == "__main__":
    sys.exit(main())
