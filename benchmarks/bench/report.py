"""The summary table (stdout), report.md and its PNG plots (matplotlib)."""
from __future__ import annotations

import json
from pathlib import Path

_COLUMNS = (  # header, key, format
    ("system", "name", "{}"),
    ("preproc ms", "preprocess_ms", "{:.2f}"),
    ("vision ms", "vision_ms", "{:.1f}"),
    ("prefill ms", "prefill_ms", "{:.1f}"),
    ("TTFT ms", "ttft_ms", "{:.1f}"),
    ("dec p50", "decode_ms_p50", "{:.2f}"),
    ("dec p90", "decode_ms_p90", "{:.2f}"),
    ("dec p99", "decode_ms_p99", "{:.2f}"),
    ("tok/s", "decode_tokens_per_s", "{:.1f}"),
    ("e2e ms", "end_to_end_ms", "{:.0f}"),
    ("peak RSS MB", "peak_rss_mb", "{:.0f}"),
    ("BW eff", "bandwidth_efficiency", "{:.0%}"),
    ("vision eff", "vision_compute_efficiency", "{:.0%}"),
)


def _fmt(fmt: str, v) -> str:
    return "-" if v is None else fmt.format(v)


def _table(rows: list[list[str]], headers: list[str], markdown: bool = False) -> str:
    if markdown:
        lines = ["| " + " | ".join(headers) + " |",
                 "|" + "|".join("---" if i == 0 else "---:" for i in range(len(headers))) + "|"]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def systems_table(res: dict, markdown: bool = False) -> str:
    rows = [[_fmt(f, s.get(k)) for _, k, f in _COLUMNS] for s in res["systems"]]
    return _table(rows, [h for h, _, _ in _COLUMNS], markdown)


def ratios_table(res: dict, markdown: bool = False) -> str:
    keys = ("decode_speedup", "ttft_speedup", "preprocess_speedup", "vision_speedup",
            "prefill_speedup", "end_to_end_speedup", "peak_rss_ratio")
    heads = ["system / reference", "decode", "TTFT", "preproc", "vision", "prefill", "e2e",
             "peak RSS"]
    rows = [[name] + [_fmt("{:.2f}x", r.get(k)) for k in keys] for name, r in res["ratios"].items()]
    return _table(rows, heads, markdown) if rows else "(one system: no ratios)"


def targets_table(res: dict, markdown: bool = False) -> str:
    rows = []
    for t in res["targets"]:
        v, g = t["value"], t["goal"]
        pct = "%" in t["target"] or "bound" in t["target"]
        fmt = "{:.0%}" if pct else "{:.2f}"
        status = "n/a" if t["met"] is None else ("met" if t["met"] else "MISSED")
        by = ""
        if t["met"] is False and v:
            by = f"{(g / v if t['higher_is_better'] else v / g):.2f}x short"
        bound = ""
        if t.get("ceiling") is not None:  # the machine's roofline for this ratio
            bound = f"{t['ceiling']:.2f}x" + (": goal beyond it" if t["beyond_bound"] else "")
        rows.append([t["target"], _fmt(fmt, v), fmt.format(g), status, by, bound])
    heads = ["target", "measured", "goal", "", "by", "bandwidth bound allows"]
    return _table(rows, heads, markdown) if rows else ""


def machine_line(res: dict) -> str:
    m = res["machine"]
    return (f"{m['cpu']} ({m['cores']} cores), {m['threads']} thread(s): memory bandwidth "
            f"{m['bandwidth_gb_s']:.1f} GB/s, fp32 GEMM {m['gemm_gflops']:.0f} GFLOP/s "
            f"({m['probe']}; best of the repeats before and after the systems); load average "
            f"{m['load_average'][0]:.2f} at the start")


def summary(res: dict) -> str:
    c = res["config"]
    parts = [machine_line(res),
             f"{c['runs']} run(s) after {c['warmup']} warm-up, interleaved "
             f"({' '.join(c['order'])}); {c['new_tokens']} new tokens forced; prompt "
             f"{res['systems'][0]['prompt_tokens']} tokens; image {c['image_size'][0]}x"
             f"{c['image_size'][1]}",
             "", systems_table(res), "", ratios_table(res)]
    t = targets_table(res)
    if t:
        parts += ["", t]
    return "\n".join(parts)


# -- report directory ---------------------------------------------------------
def write_report(res: dict, directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "results.json").write_text(json.dumps(res, indent=2) + "\n")
    plots, note = _plots(res, directory)
    (directory / "report.md").write_text(markdown(res, plots, note))
    return [directory / "report.md", directory / "results.json"] + plots


def _plots(res: dict, directory: Path) -> tuple[list[Path], str | None]:
    try:
        import matplotlib
    except ImportError:
        return [], "plots skipped: matplotlib is not installed (pip install 'vlmedge[bench]')"
    matplotlib.use("Agg")
    plots = [plot_stages(res, directory / "stages.png"),
             plot_decode(res, directory / "decode_latency.png")]
    for kind, points in res.get("sweeps", {}).items():
        p = plot_sweep(res, kind, points, directory / f"sweep_{kind}.png")
        if p:
            plots.append(p)
    return plots, None


def plot_stages(res: dict, path: Path) -> Path:
    """Stacked bars per system: preprocess, vision, prefill, decode (all steps)."""
    import matplotlib.pyplot as plt

    names = [s["name"] for s in res["systems"]]
    parts = {"preprocess": [s["preprocess_ms"] or 0 for s in res["systems"]],
             "vision": [s["vision_ms"] or 0 for s in res["systems"]],
             "prefill": [s["prefill_ms"] or 0 for s in res["systems"]],
             "decode": [sum(s["decode_ms_by_position"]) for s in res["systems"]]}
    fig, ax = plt.subplots(figsize=(7, 1.4 + 0.6 * len(names)))
    left = [0.0] * len(names)
    for label, vals in parts.items():
        ax.barh(names, vals, left=left, label=label)
        left = [a + b for a, b in zip(left, vals)]
    ax.set_xlabel(f"ms (median run, {res['config']['new_tokens']} new tokens)")
    ax.set_title("Where the milliseconds go")
    ax.invert_yaxis()
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.3 - 0.1 / len(names)), ncol=4,
              fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_decode(res: dict, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    for s in res["systems"]:
        start = s["prompt_tokens"] + 1
        ys = s["decode_ms_by_position"]
        ax.plot(range(start, start + len(ys)), ys, marker=".", label=s["name"])
    ax.set_xlabel("position in context (tokens)")
    ax.set_ylabel("decode step ms (median over runs)")
    ax.set_title("Decode latency over position")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


_SWEEP_Y = {"prompt-len": ("prompt_tokens", "ttft_ms", "prompt tokens", "TTFT ms"),
            "new-tokens": ("new_tokens", "decode_tokens_per_s", "new tokens", "decode tokens/s"),
            "image-size": (None, "ttft_ms", "image size", "TTFT ms")}


def plot_sweep(res: dict, kind: str, points: list[dict], path: Path) -> Path | None:
    import matplotlib.pyplot as plt

    done = [p for p in points if "systems" in p]
    if not done:
        return None
    xkey, ykey, xlabel, ylabel = _SWEEP_Y[kind]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for s in res["systems"]:
        name = s["name"]
        xs = [p["systems"][name][xkey] if xkey else str(p["value"]) for p in done]
        ax.plot(xs, [p["systems"][name][ykey] for p in done], marker="o", label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(f"Sweep: {kind}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def sweep_table(kind: str, points: list[dict]) -> str:
    rows = []
    for p in points:
        if "skipped" in p:
            rows.append([str(p["value"]), "skipped: " + p["skipped"], "", "", "", ""])
            continue
        for name, f in p["systems"].items():
            rows.append([str(p["value"]), name, str(f["prompt_tokens"]),
                         _fmt("{:.1f}", f["ttft_ms"]), _fmt("{:.2f}", f["decode_ms_p50"]),
                         _fmt("{:.1f}", f["decode_tokens_per_s"])])
    return _table(rows, [kind, "system", "prompt tok", "TTFT ms", "dec p50 ms", "tok/s"], True)


def _roofline_md(res: dict) -> str:
    m = res["machine"]
    rows = []
    for s in res["systems"]:
        rows.append([s["name"], _fmt("{:.2f}", s["decode_bytes_per_token"] / 1e6),
                     _fmt("{:.1f}", s["bandwidth_bound_tokens_per_s"]),
                     _fmt("{:.1f}", s.get("decode_tokens_per_s")),
                     _fmt("{:.0%}", s.get("bandwidth_efficiency")),
                     _fmt("{:.3f}", s.get("vision_gflop")),
                     _fmt("{:.0%}", s.get("vision_compute_efficiency")),
                     _fmt("{:.3f}", s.get("prefill_gflop")),
                     _fmt("{:.0%}", s.get("prefill_compute_efficiency"))])
    heads = ["system", "MB read / token", "bound tok/s", "tok/s", "share of BW bound",
             "vision GFLOP", "share of GEMM rate", "prefill GFLOP", "share of GEMM rate"]
    b, a = m["samples"]["before"], m["samples"]["after"]
    return (f"Bounds (best of the repeats): bandwidth {m['bandwidth_gb_s']:.1f} GB/s, GEMM "
            f"{m['gemm_gflops']:.0f} GFLOP/s. Before the systems: {b['bandwidth_gb_s']:.1f} GB/s "
            f"(median {b['bandwidth_gb_s_median']:.1f}), {b['gemm_gflops']:.0f} GFLOP/s (median "
            f"{b['gemm_gflops_median']:.0f}); after: {a['bandwidth_gb_s']:.1f} GB/s (median "
            f"{a['bandwidth_gb_s_median']:.1f}), {a['gemm_gflops']:.0f} GFLOP/s (median "
            f"{a['gemm_gflops_median']:.0f}).\n\n"
            + _table(rows, heads, True) +
            "\n\nBytes per decode token = the decoder's weights (every initializer of "
            "the decoder graph the system runs: decoder.onnx, or decoder_ort.onnx for the ort "
            "flavour of an artifact holding both; for PyTorch, the language model's parameters "
            "less the embedding table, plus the LM head) + the KV cache at its mean length. "
            "Vision and prefill "
            "FLOPs are 2 x the multiply-adds of the graphs' MatMul/Gemm/Conv at the shapes run; "
            "the compute bound is the fp32 GEMM rate (an int8 graph can exceed 100%)."
            + _cache_note(res))


def _cache_note(res: dict) -> str:
    cached = [s["name"] for s in res["systems"] if s.get("decode_fits_in_cache")]
    if not cached:
        return ""
    llc = res["machine"].get("last_level_cache_bytes") or 0
    return (f" The bytes a decode step of {', '.join(cached)} reads fit in the "
            f"{llc / 2**20:.0f} MiB last-level cache: they need not come from DRAM each step, so "
            "the bandwidth bound is loose there and per-call overhead, not memory, sets the pace.")


STAGE_PEAKS = ("load", "vision", "prefill", "decode")


def _memory_md(res: dict) -> str:
    def stages(s):
        by = s.get("peak_growth_by_stage_mb")
        return " / ".join(f"{by[k]:.0f}" for k in STAGE_PEAKS) if by else "-"

    rows = [[s["name"], _fmt("{:.0f}", s["rss_before_load_mb"]), _fmt("{:.0f}", s["peak_rss_mb"]),
             _fmt("{:.0f}", s["rss_growth_mb"]), _fmt("{:.1f}", s["weights_kv_mb"]),
             _fmt("{:.2f}x", s.get("rss_over_weights_kv")), stages(s),
             _fmt("{:.0f}", s.get("rss_file_mb")),
             _fmt("{:.1f}", (s.get("artifact_bytes") or 0) / 2**20 or None),
             _fmt("{:.0f}", s.get("gpu_memory_mb"))] for s in res["systems"]]
    return (_table(rows, ["system", "RSS before load MB", "peak RSS MB", "growth MB",
                          "weights + KV MB", "growth / (weights + KV)",
                          "peak growth after " + " / ".join(STAGE_PEAKS) + " MB",
                          "file-backed MB", "artifact MB", "GPU MB"], True) +
            "\n\nEach system runs in its own worker process: peak RSS is that process's "
            "high-water mark (VmHWM) over loading, warm-up and the timed runs (read before "
            "any sweep), interpreter and libraries included; growth is peak "
            "less the RSS after importing the libraries (onnxruntime, numpy; torch and "
            "transformers for PyTorch), before loading the model. Peak growth after each "
            "stage is the high-water mark's growth read after loading and after each stage "
            "of the first run (artifacts only): the stage where it rises is the one that "
            "needs the memory. File-backed MB is the part of the RSS after the runs that "
            "maps files (libraries' code, weights onnxruntime maps from the artifact): how "
            "much of a file one read maps depends on the page cache, so it, and the peak, "
            "can differ by megabytes between runs of the same artifact.")


def _peer_md(res: dict) -> list[str]:
    peers = [s for s in res["systems"] if s.get("peer_of")]
    if not peers:
        return []
    pairs = ", ".join(f"{s['name']} ({s.get('peer_version') or '?'}, beside {s['peer_of']})"
                      for s in peers)
    return [f"Peers: {pairs}: each on its own model of the same language model (same weights "
            "and bit width: onnxruntime-genai's builder at the same precision and block, "
            "llama.cpp's q8_0/q4_0/f32 GGUF). Text only, with a prompt as long as its "
            "partner's whole prompt (image tokens included), so each decode step attends "
            "over as many positions; a peer has no preprocessing or vision, so only decode "
            "and prefill compare.", ""]


def _tegra_md(res: dict) -> str:
    if not res["machine"].get("tegrastats"):
        return "tegrastats: not available on this machine (Jetson only); columns skipped."
    rows = []
    for s in res["systems"]:
        t = s.get("tegrastats") or {}
        rows.append([s["name"], _fmt("{:.0f}", t.get("power_mw")),
                     _fmt("{:.0f}", t.get("gpu_load_pct")), _fmt("{:.0f}", t.get("ram_used_mb")),
                     str(t.get("samples", 0))])
    return _table(rows, ["system", "mean power mW", "GPU load %", "max RAM MB", "samples"], True)


def markdown(res: dict, plots: list[Path], note: str | None) -> str:
    c = res["config"]
    out = ["# vlm-bench report", "", machine_line(res) + ".", "",
           f"Systems, in run order: {', '.join(c['order'])}. {c['runs']} timed run(s) each after "
           f"{c['warmup']} warm-up, interleaved round by round; every run generates exactly "
           f"{c['new_tokens']} tokens (stop tokens masked). Image: {c['image']} "
           f"({c['image_size'][0]}x{c['image_size'][1]}); prompt: {c['prompt']!r}.", "",
           "## Latency per stage", "", systems_table(res, True), "",
           "Medians over runs; decode percentiles over every decode step of every run; "
           "tokens/s = 1000 / mean decode step.", "",
           "## Ratios", "", ratios_table(res, True), "",
           "Speedups > 1: the system is faster than the reference.", ""]
    out += _peer_md(res)
    if res["targets"]:
        out += ["## Targets", "", targets_table(res, True), ""]
    out += ["## Roofline", "", _roofline_md(res), "", "## Memory", "", _memory_md(res), "",
            "## Jetson", "", _tegra_md(res), ""]
    for kind, points in res.get("sweeps", {}).items():
        out += [f"## Sweep: {kind}", "", sweep_table(kind, points), ""]
    if any(s.get("random_weights") for s in res["systems"]):
        out += ["Random weights: latency figures only; the answers mean nothing.", ""]
    if plots:
        out += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots] + [""]
    if note:
        out += [note, ""]
    return "\n".join(out)
