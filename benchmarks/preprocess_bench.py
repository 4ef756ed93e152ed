"""C image preprocessing against the Hugging Face image processor, side by side.

    python -m vlmedge.benchmarks.preprocess_bench [--runs 30] [--json [PATH]]

Times, interleaved in one run and on one thread, the runtime's
ImagePreprocessor (C resize fused with the center crop, C normalize) and
transformers' CLIPImageProcessor (its Pillow backend, which is what runs
without torchvision) on 1920x1080 RGB camera frames (uint8 HWC numpy arrays,
the form a camera delivers), for the demo model's 128 and LLaVA-1.5's 336.
HF is also timed on PIL images, the form it is most often given. Reports
median milliseconds and the ratio; checks on the way that both produce the
same pixel_values.
"""
from __future__ import annotations

import os

# One thread for every library that could spawn more (set before numpy loads).
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from vlmedge.lazy import require  # noqa: E402
from vlmedge.runtime.preprocess import ImagePreprocessor, has_c_extension  # noqa: E402

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TARGETS = {"demo-128": 128, "llava-336": 336}


def camera_frames(n: int, h: int = 1080, w: int = 1920) -> list[np.ndarray]:
    """n distinct uint8 (h, w, 3) RGB frames: gradients plus sensor-like noise."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([xx / w, yy / h, 0.5 + 0.5 * np.sin(xx / 37 + yy / 23)], -1) * 255
    return [np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
            for _ in range(n)]


def hf_processor(short: int):
    transformers = require("transformers", "the preprocessing benchmark's HF baseline")
    transformers.logging.set_verbosity_error()
    return transformers.CLIPImageProcessor(
        size={"shortest_edge": short}, crop_size={"height": short, "width": short},
        resample=3, do_center_crop=True, image_mean=CLIP_MEAN, image_std=CLIP_STD)


def _ms(fn) -> float:
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def bench_target(short: int, frames: list, runs: int, warmup: int) -> dict:
    """Median ms of ours and HF's for one output size, interleaved per frame so
    machine drift hits both alike."""
    from PIL import Image
    hf = hf_processor(short)
    ours = ImagePreprocessor.from_hf_processor_config(hf.to_dict())
    pil_frames = [Image.fromarray(f) for f in frames]
    ours_out = ours(frames[0])
    want = hf(frames[0], return_tensors="np")["pixel_values"]
    max_step = float((np.abs(ours_out - want) * np.asarray(CLIP_STD)[:, None, None] * 255).max())
    cases = {
        "vlmedge_ms": lambda i: ours(frames[i]),
        "hf_numpy_ms": lambda i: hf(frames[i], return_tensors="np"),
        "hf_pil_ms": lambda i: hf(pil_frames[i], return_tensors="np"),
    }
    times = {k: [] for k in cases}
    for r in range(warmup + runs):
        for name, fn in cases.items():
            t = _ms(lambda: fn(r % len(frames)))
            if r >= warmup:
                times[name].append(t)
    med = {k: float(np.median(v)) for k, v in times.items()}
    return {"output": [short, short], **{k: round(v, 3) for k, v in med.items()},
            "speedup_vs_hf_numpy": round(med["hf_numpy_ms"] / med["vlmedge_ms"], 2),
            "speedup_vs_hf_pil": round(med["hf_pil_ms"] / med["vlmedge_ms"], 2),
            "max_uint8_step_difference": round(max_step, 4)}


def print_table(results: dict) -> None:
    head = f"{'target':<11}{'vlmedge ms':>12}{'HF np ms':>10}{'ratio':>7}{'HF PIL ms':>11}" \
           f"{'ratio':>7}{'max diff':>10}"
    print(head)
    print("-" * len(head))
    for name, r in results["targets"].items():
        print(f"{name:<11}{r['vlmedge_ms']:>12.2f}{r['hf_numpy_ms']:>10.2f}"
              f"{r['speedup_vs_hf_numpy']:>6.1f}x{r['hf_pil_ms']:>11.2f}"
              f"{r['speedup_vs_hf_pil']:>6.1f}x{r['max_uint8_step_difference']:>10.3g}")
    print(f"(1920x1080 RGB frames, median of {results['runs']} interleaved runs, 1 thread; "
          "max diff in uint8 steps)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vlmedge.benchmarks.preprocess_bench",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=30, help="timed runs per case (default 30)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--frames", type=int, default=4, help="distinct frames cycled through")
    ap.add_argument("--json", nargs="?", const="-", metavar="PATH",
                    help="write results as JSON to PATH (stdout if no PATH)")
    args = ap.parse_args(argv)
    if not has_c_extension():
        print("warning: C extension not built; timing the numpy reference", file=sys.stderr)
    frames = camera_frames(args.frames)
    results = {"runs": args.runs, "threads": 1, "c_extension": has_c_extension(),
               "frame": [1080, 1920, 3], "targets": {}}
    for name, short in TARGETS.items():
        results["targets"][name] = bench_target(short, frames, args.runs, args.warmup)
    if args.json is None:
        print_table(results)
    elif args.json == "-":
        print(json.dumps(results, indent=2))
    else:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)
        print_table(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
