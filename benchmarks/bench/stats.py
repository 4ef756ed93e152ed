"""From timed runs to the JSON's `systems` records, `ratios` and `targets`."""
from __future__ import annotations

from typing import Any

import numpy as np

STAGES = ("preprocess_ms", "vision_ms", "prefill_ms", "ttft_ms", "total_ms")


def _median(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return float(np.median(xs)) if xs else None


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median per stage over runs; decode percentiles over every decode step
    of every run; tokens/s = 1000 / mean decode step; decode latency per
    position (median over runs) for the plot."""
    out: dict[str, Any] = {k: _median(r[k] for r in runs) for k in STAGES}
    out["end_to_end_ms"] = out.pop("total_ms")
    steps = np.array([d for r in runs for d in r["decode_ms"]], dtype=np.float64)
    if steps.size:
        p50, p90, p99 = np.percentile(steps, [50, 90, 99])
        out.update(decode_ms_p50=float(p50), decode_ms_p90=float(p90), decode_ms_p99=float(p99),
                   decode_ms_mean=float(steps.mean()),
                   decode_tokens_per_s=float(1000.0 / steps.mean()))
    else:
        out.update(decode_ms_p50=None, decode_ms_p90=None, decode_ms_p99=None,
                   decode_ms_mean=None, decode_tokens_per_s=None)
    n = min(len(r["decode_ms"]) for r in runs)
    out["decode_ms_by_position"] = [float(np.median([r["decode_ms"][i] for r in runs]))
                                    for i in range(n)]
    out["prompt_tokens"] = runs[0]["prompt_tokens"]
    out["new_tokens"] = runs[0]["new_tokens"]
    out["runs"] = len(runs)
    return out


_SPEEDUPS = {  # ratio key -> (figure, higher is better)
    "decode_speedup": ("decode_tokens_per_s", True),
    "ttft_speedup": ("ttft_ms", False),
    "preprocess_speedup": ("preprocess_ms", False),
    "vision_speedup": ("vision_ms", False),
    "prefill_speedup": ("prefill_ms", False),
    "end_to_end_speedup": ("end_to_end_ms", False),
}


def ratio(system: dict, reference: dict) -> dict[str, Any]:
    """How `system` compares with `reference`: speedups > 1 mean faster;
    peak_rss_ratio > 1 means more memory."""
    out: dict[str, Any] = {"system": system["name"], "vs": reference["name"]}
    for key, (fig, higher) in _SPEEDUPS.items():
        a, b = system.get(fig), reference.get(fig)
        out[key] = (a / b if higher else b / a) if a and b else None
    a, b = system.get("peak_rss_mb"), reference.get("peak_rss_mb")
    out["peak_rss_ratio"] = a / b if a and b else None
    return out


def ratios(systems: list[dict], baseline: str | None) -> dict[str, Any]:
    """Every system against the baseline (or the first system without one),
    and each int8 system against the fp32 one of the same target."""
    if not systems:
        return {}
    ref = next((s for s in systems if s["name"] == baseline), systems[0])
    out = {f"{s['name']}/{ref['name']}": ratio(s, ref) for s in systems if s is not ref}
    for s in systems:
        fp32 = next((f for f in systems if f.get("precision") == "fp32" and
                     f.get("target") is not None and f.get("target") == s.get("target")), None)
        if str(s.get("precision")).startswith("int8") and fp32 is not None and fp32 is not ref:
            out[f"{s['name']}/{fp32['name']}"] = ratio(s, fp32)
    return out


def _target(what: str, value, goal: float, higher: bool = True) -> dict[str, Any]:
    met = None if value is None else (value >= goal if higher else value <= goal)
    return {"target": what, "value": value, "goal": goal, "higher_is_better": higher,
            "met": met}


def targets(systems: list[dict], rat: dict, baseline: str | None) -> list[dict[str, Any]]:
    """The issue's targets for this CPU (benchmarks/README.md), measured values beside them."""
    out = []
    for key, r in rat.items():
        if r["vs"] != baseline:
            continue
        name = r["system"]
        if name.startswith("onnx-fp32"):
            out.append(_target(f"{name} decode tokens/s >= 1.5x {baseline}",
                               r["decode_speedup"], 1.5))
            out.append(_target(f"{name} TTFT >= 1.5x faster than {baseline}",
                               r["ttft_speedup"], 1.5))
        elif name.startswith("onnx-int8"):
            out.append(_target(f"{name} decode tokens/s >= 2.5x {baseline}",
                               r["decode_speedup"], 2.5))
    for s in systems:
        if s["name"] == baseline:
            continue
        out.append(_target(f"{s['name']} decode at >= 50% of the bandwidth bound",
                           s.get("bandwidth_efficiency"), 0.5))
        share = (s["preprocess_ms"] / s["ttft_ms"]) if s.get("ttft_ms") else None
        out.append(_target(f"{s['name']} preprocessing <= 5% of TTFT", share, 0.05, False))
        out.append(_target(f"{s['name']} RSS growth <= 1.5x (weights + KV cache)",
                           s.get("rss_over_weights_kv"), 1.5, False))
    return out
