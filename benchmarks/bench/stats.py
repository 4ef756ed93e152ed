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
    if system.get("peer_of") or reference.get("peer_of"):
        # the peer is a language model alone: no vision in its TTFT, end to end or memory
        out.update(ttft_speedup=None, end_to_end_speedup=None, peak_rss_ratio=None)
    return out


def ratios(systems: list[dict], baseline: str | None) -> dict[str, Any]:
    """Every system against the baseline (or the first system without one),
    each int8/int4 system against the fp32 one of the same target (and flavour),
    each ort-flavour system against the portable one of its precision, and
    each artifact with a peer (peer.py: onnxruntime-genai, llama.cpp) against it."""
    if not systems:
        return {}
    ref = next((s for s in systems if s["name"] == baseline), systems[0])
    # a peer against the baseline, but not against whichever artifact came first
    out = {f"{s['name']}/{ref['name']}": ratio(s, ref) for s in systems
           if s is not ref and (ref["name"] == baseline or not s.get("peer_of"))}
    for s in systems:
        same = [f for f in systems if f.get("precision") == "fp32" and
                f.get("target") is not None and f.get("target") == s.get("target")]
        # the fp32 system of the same decoder flavour, else of the same target
        fp32 = next((f for f in same if f.get("decoder_flavour") == s.get("decoder_flavour")),
                    same[0] if same else None)
        if str(s.get("precision")).startswith(("int8", "int4")) and fp32 is not None \
                and fp32 is not ref:
            out[f"{s['name']}/{fp32['name']}"] = ratio(s, fp32)
        # the flavours side by side: ort-X against the portable artifact of precision X
        portable = next((p for p in systems if p.get("decoder_flavour") == "portable" and
                         p.get("precision") == s.get("precision")), None)
        if s.get("decoder_flavour") == "ort" and portable is not None and portable is not ref:
            out[f"{s['name']}/{portable['name']}"] = ratio(s, portable)
    for p in systems:
        partner = next((s for s in systems if s["name"] == p.get("peer_of")), None)
        if partner is not None:
            out[f"{partner['name']}/{p['name']}"] = ratio(partner, p)
    return out


# Issue 16's decode targets for the ort flavour against PyTorch eager (SmolVLM-256M
# preset, one 512 px tile): the peers' speed-ups at the same bit width
# (llama.cpp q8_0 ~9x, q4_0 and onnxruntime-genai int4 ~11x).
ORT_DECODE_TARGETS = {"ort-fp32": 3.5, "ort-int8": 9.5, "ort-int4": 11.5}


def _ort_base(name: str) -> str:
    """ort-int4-b128-vint8:dir -> ort-int4 (the decode target is the bit width's,
    whatever the block and the vision graph)."""
    return "-".join(name.split(":")[0].split("-")[:2])


def _target(what: str, value, goal: float, higher: bool = True,
            ceiling: float | None = None) -> dict[str, Any]:
    met = None if value is None else (value >= goal if higher else value <= goal)
    out = {"target": what, "value": value, "goal": goal, "higher_is_better": higher,
           "met": met}
    if ceiling is not None:  # what this machine's memory bandwidth allows at most
        out["ceiling"] = ceiling
        out["beyond_bound"] = goal > ceiling
    return out


def decode_ceiling(speedup: float | None, system: dict, machine: dict | None
                   ) -> float | None:
    """The largest decode speed-up over the baseline that the measured
    bandwidth bound allows the system: its bytes read per step at 100% of the
    bound, against the baseline's measured tokens/s. speedup / efficiency,
    since efficiency = tokens/s x bytes per step / bandwidth. A target above
    it cannot be met at the bandwidth this run measured (a machine where
    eager is faster, or bandwidth lower, moves it).

    None where the bound does not bind: efficiency at or past 100%, or a
    system whose bytes fit in the last-level cache while the bandwidth
    probe's matrix did not (the system then reads from a faster memory than
    the probe measured). The other way round (the probe in cache, the system
    not) the ceiling is optimistic, so a goal beyond it is still out of reach."""
    efficiency = system.get("bandwidth_efficiency")
    if not speedup or not efficiency or efficiency >= 1.0:
        return None
    llc = (machine or {}).get("last_level_cache_bytes")
    probe = (machine or {}).get("bandwidth_probe_bytes")
    if system.get("decode_fits_in_cache") and not (llc and probe and probe < llc):
        return None
    return speedup / efficiency


def targets(systems: list[dict], rat: dict, baseline: str | None,
            machine: dict | None = None) -> list[dict[str, Any]]:
    """The issue's targets for this CPU (README, "Benchmarks"), measured values beside
    them; decode speed-up targets carry the bandwidth bound's ceiling (decode_ceiling)."""
    out = []
    by_name = {s["name"]: s for s in systems}
    for key, r in rat.items():
        if by_name.get(r["vs"], {}).get("peer_of") == r["system"]:
            # issue 16: faster than every peer at the same bit width
            out.append(_target(f"{r['system']} decode tokens/s >= {r['vs']} (same weights, "
                               f"same bit width)", r["decode_speedup"], 1.0))
            continue
        if r["vs"] != baseline:
            continue
        name = r["system"]
        ceiling = decode_ceiling(r["decode_speedup"], by_name.get(name, {}), machine)
        if name.startswith("onnx-fp32"):
            out.append(_target(f"{name} decode tokens/s >= 1.5x {baseline}",
                               r["decode_speedup"], 1.5, ceiling=ceiling))
            out.append(_target(f"{name} TTFT >= 1.5x faster than {baseline}",
                               r["ttft_speedup"], 1.5))
        elif name.startswith("onnx-int8"):
            out.append(_target(f"{name} decode tokens/s >= 2.5x {baseline}",
                               r["decode_speedup"], 2.5, ceiling=ceiling))
        elif _ort_base(name) in ORT_DECODE_TARGETS:
            goal = ORT_DECODE_TARGETS[_ort_base(name)]
            out.append(_target(f"{name} decode tokens/s >= {goal}x {baseline}",
                               r["decode_speedup"], goal, ceiling=ceiling))
            out.append(_target(f"{name} TTFT >= 2x faster than {baseline}",
                               r["ttft_speedup"], 2.0))
    for s in systems:
        if s["name"] == baseline or s.get("peer_of"):  # the targets are vlmedge's, not a peer's
            continue
        out.append(_target(f"{s['name']} decode at >= 50% of the bandwidth bound",
                           s.get("bandwidth_efficiency"), 0.5))
        share = (s["preprocess_ms"] / s["ttft_ms"]) if s.get("ttft_ms") else None
        out.append(_target(f"{s['name']} preprocessing <= 5% of TTFT", share, 0.05, False))
        native_q = s.get("decoder_flavour") == "ort" and s.get("precision") != "fp32"
        if native_q:  # weight-only int8/int4 over the shared KV buffer
            out.append(_target(f"{s['name']} decode at >= 45% of the bandwidth bound (bytes "
                               f"read)", s.get("bandwidth_efficiency"), 0.45))
        limit = 1.3 if native_q else 1.5
        out.append(_target(f"{s['name']} RSS growth <= {limit}x (weights + KV cache)",
                           s.get("rss_over_weights_kv"), limit, False))
    return out
