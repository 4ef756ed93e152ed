"""C image preprocessing against the Hugging Face image processor, side by side.

    python -m vlmedge.benchmarks.preprocess_bench [--runs 30] [--sizes 640x480,...]
        [--pil] [--kernels NAME] [--json [PATH]]

Times, interleaved in one run and on one thread, the runtime's
ImagePreprocessor (C resize fused with the center crop and the normalize)
and transformers' CLIPImageProcessor (its Pillow backend, which is what runs
without torchvision) on RGB camera frames (uint8 HWC numpy arrays, the form a
camera delivers) of 640x480, 1280x720, 1920x1080 and 3840x2160, for the demo
model's 128 and LLaVA-1.5's 336. With --pil, HF is also timed on PIL images.
Reports median milliseconds, the ratio, and the largest difference between
the two pixel_values on every frame, in uint8 steps (|delta| * std * 255;
0 means bit-identical).
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


SIZES = "640x480,1280x720,1920x1080,3840x2160"


def camera_frames(n: int, h: int = 1080, w: int = 1920) -> list[np.ndarray]:
    """n distinct uint8 (h, w, 3) RGB frames: gradients plus sensor-like noise."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([xx / w, yy / h, 0.5 + 0.5 * np.sin(xx / 37 + yy / 23)], -1) * 255
    del yy, xx
    return [np.clip(base + 12 * rng.standard_normal((h, w, 3), np.float32), 0, 255)
            .astype(np.uint8) for _ in range(n)]


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


def max_uint8_steps(ours, hf, frames: list) -> float:
    """Largest |ours - HF| over every frame's pixel_values, in uint8 steps."""
    steps = 0.0
    scale = np.asarray(CLIP_STD, np.float64)[:, None, None] * 255
    for f in frames:
        want = hf(f, return_tensors="np")["pixel_values"][0].astype(np.float64)
        steps = max(steps, float((np.abs(ours(f)[0] - want) * scale).max()))
    return steps


def bench_target(short: int, frames: list, runs: int, warmup: int, pil: bool) -> dict:
    """Median ms of ours and HF's for one output size, interleaved per frame so
    machine drift hits both alike."""
    hf = hf_processor(short)
    ours = ImagePreprocessor.from_hf_processor_config(hf.to_dict())
    cases = {
        "vlmedge_ms": lambda i: ours(frames[i]),
        "hf_numpy_ms": lambda i: hf(frames[i], return_tensors="np"),
    }
    if pil:
        from PIL import Image
        pil_frames = [Image.fromarray(f) for f in frames]
        cases["hf_pil_ms"] = lambda i: hf(pil_frames[i], return_tensors="np")
    max_step = max_uint8_steps(ours, hf, frames)
    times = {k: [] for k in cases}
    for r in range(warmup + runs):
        for name, fn in cases.items():
            t = _ms(lambda: fn(r % len(frames)))
            if r >= warmup:
                times[name].append(t)
    med = {k: float(np.median(v)) for k, v in times.items()}
    out = {"frame": list(frames[0].shape[:2]), "output": [short, short],
           **{k: round(v, 3) for k, v in med.items()},
           "speedup_vs_hf_numpy": round(med["hf_numpy_ms"] / med["vlmedge_ms"], 2)}
    if pil:
        out["speedup_vs_hf_pil"] = round(med["hf_pil_ms"] / med["vlmedge_ms"], 2)
    out["max_uint8_step_difference"] = round(max_step, 4)
    return out


def print_table(results: dict) -> None:
    pil = any("hf_pil_ms" in r for r in results["results"])
    head = f"{'frame':<11}{'target':<11}{'vlmedge ms':>11}{'HF np ms':>10}{'ratio':>8}" + \
        (f"{'HF PIL ms':>11}{'ratio':>8}" if pil else "") + f"{'max diff':>10}"
    print(head)
    print("-" * len(head))
    for r in results["results"]:
        h, w = r["frame"]
        line = f"{f'{w}x{h}':<11}{r['target']:<11}{r['vlmedge_ms']:>11.2f}" \
               f"{r['hf_numpy_ms']:>10.2f}{r['speedup_vs_hf_numpy']:>7.1f}x"
        if pil:
            line += f"{r['hf_pil_ms']:>11.2f}{r['speedup_vs_hf_pil']:>7.1f}x"
        print(line + f"{r['max_uint8_step_difference']:>10.3g}")
    print(f"(RGB uint8 frames, median of {results['runs']} interleaved runs, 1 thread, "
          f"C kernels: {results['kernels']}; max diff in uint8 steps)")


def _sizes(text: str) -> list[tuple[int, int]]:
    """'640x480,1920x1080' -> [(480, 640), (1080, 1920)] as (height, width)."""
    try:
        pairs = [tuple(int(v) for v in item.lower().split("x")) for item in text.split(",")]
    except ValueError:
        pairs = []
    if not pairs or any(len(p) != 2 or min(p) < 1 for p in pairs):
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT[,...]; got {text!r}")
    return [(h, w) for w, h in pairs]


def _set_kernels(name: str | None) -> str:
    """Select the C resize kernels (None: the CPU's best); returns their name."""
    if not has_c_extension():
        return "numpy reference"
    from vlmedge.runtime import _cpreprocess
    if name is not None:
        if name not in _cpreprocess.available_kernels():
            sys.exit(f"preprocess_bench: --kernels must be one of "
                     f"{list(_cpreprocess.available_kernels())}; got {name!r}")
        _cpreprocess.set_kernels(name)
    return _cpreprocess.kernels()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vlmedge.benchmarks.preprocess_bench",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=30, help="timed runs per case (default 30)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--frames", type=int, default=4, help="distinct frames cycled through")
    ap.add_argument("--sizes", type=_sizes, default=_sizes(SIZES),
                    help=f"frame sizes, WIDTHxHEIGHT comma-separated (default {SIZES})")
    ap.add_argument("--pil", action="store_true", help="also time HF on PIL images")
    ap.add_argument("--kernels", default=None,
                    help="C resize kernels: portable | avx2 | avx512vnni (default: the CPU's best)")
    ap.add_argument("--json", nargs="?", const="-", metavar="PATH",
                    help="write results as JSON to PATH (stdout if no PATH)")
    args = ap.parse_args(argv)
    if not has_c_extension():
        print("warning: C extension not built; timing the numpy reference", file=sys.stderr)
    results = {"runs": args.runs, "threads": 1, "c_extension": has_c_extension(),
               "kernels": _set_kernels(args.kernels), "results": []}
    for h, w in args.sizes:
        frames = camera_frames(args.frames, h, w)
        for name, short in TARGETS.items():
            r = bench_target(short, frames, args.runs, args.warmup, args.pil)
            results["results"].append({"target": name, **r})
        del frames
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
