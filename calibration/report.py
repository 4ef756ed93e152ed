"""What an INT8 export reports: the manifest's `quantization` section and
calibration_report.json / calibration_report.md beside it.

The manifest keeps the facts a deployment checks (method, data set hash,
excluded nodes, measured accuracy, CPU-only); the report adds the
sensitivity ranking and every step of the exclusion loop.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

REPORT_JSON = "calibration_report.json"
REPORT_MD = "calibration_report.md"


def manifest_section(report: dict[str, Any]) -> dict[str, Any]:
    keep = ("precision", "method", "format", "weights", "activations", "embedding", "cpu_only",
            "calibration", "excluded_nodes", "accuracy", "size", "onnxruntime_version")
    return {k: report[k] for k in keep if k in report}


def write(directory: Path, report: dict[str, Any]) -> None:
    (directory / REPORT_JSON).write_text(json.dumps(report, indent=2) + "\n")
    (directory / REPORT_MD).write_text(markdown(report))


def _collected(cal: dict) -> str:
    if cal.get("decoder_feeds") is not None:
        return str(cal["decoder_feeds"])
    return "none (ranges from the cache)" if cal.get("method") else "none (dynamic)"


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}%"


def _num(v, fmt=".4f") -> str:
    return "n/a" if v is None else format(v, fmt)


def markdown(r: dict[str, Any]) -> str:
    cal = r["calibration"]
    acc = r["accuracy"]
    t = acc["targets"]
    lines = [
        f"# INT8 calibration report ({r['precision']})", "",
        f"- method: {r['method']}; weights {r['weights']}; activations {r['activations']}",
        f"- embedding: {r['embedding']}",
        f"- CPU only: {'yes' if r['cpu_only'] else 'no'}",
        f"- calibration data: {cal['source']} (hash `{cal['hash'][:16]}`, seed {cal['seed']}): "
        f"{cal['samples']} images / {cal['prompts']} prompts calibrate, "
        f"{cal['holdout_samples']} images / {cal['holdout_prompts']} prompts held out; "
        f"{cal['skipped_unreadable']} unreadable skipped",
        f"- calibration method: {cal.get('method') or 'none (dynamic)'}; decoder calls collected: "
        f"{_collected(cal)}; range cache: {cal.get('cache') or 'not used'}",
        "", "## Accuracy on the held-out split (vs fp32)", "",
        "| figure | target | before exclusions | final |", "|---|---|---|---|",
    ]
    first, final = acc["initial"], acc["final"]
    lines += [
        f"| image-feature cosine (mean) | >= {t['cosine']} | {_num(first['cosine_mean'])} | "
        f"{_num(final['cosine_mean'])} |",
        f"| image-feature cosine (min) | | {_num(first['cosine_min'])} | "
        f"{_num(final['cosine_min'])} |",
        f"| teacher-forced top-1 agreement ({final['positions']} positions) | >= "
        f"{t['agreement']} | {_pct(first['agreement'])} | {_pct(final['agreement'])} |",
        f"| mean KL(fp32 \\|\\| int8) | | {_num(first['kl'], '.3g')} | "
        f"{_num(final['kl'], '.3g')} |",
    ]
    if final.get("scene_accuracy") is not None:
        lines.append(
            f"| scene accuracy ({final['scene_questions']} questions; fp32 "
            f"{_pct(final['scene_accuracy_fp32'])}) | drop <= {t['scene_drop_points']} points | "
            f"{_pct(first['scene_accuracy'])} | {_pct(final['scene_accuracy'])} |")
    lines += ["", f"Gate: **{'passed' if acc['passed'] else 'FAILED'}**"
              + (f" ({'; '.join(acc['failures'])})" if acc["failures"] else ""), ""]
    ex = r["excluded_nodes"]
    n_ex = sum(len(v) for v in ex.values())
    lines += ["## Nodes kept in fp32", ""]
    if not n_ex:
        lines.append("none: every weight-carrying node is INT8.")
    for graph, nodes in ex.items():
        for n in nodes:
            lines.append(f"- {graph}: `{n['node']}` ({n.get('module') or '?'})")
    steps = r.get("sensitivity", {}).get("steps", [])
    if steps:
        lines += ["", "## Sensitivity pass", "", "| excluded | cosine | agreement | KL | scene |",
                  "|---|---|---|---|---|"]
        for s in steps:
            f = s["figures"]
            lines.append(f"| {s['graph']}:`{s['node']}` | {_num(f['cosine_mean'])} | "
                         f"{_pct(f['agreement'])} | {_num(f['kl'], '.3g')} | "
                         f"{_pct(f.get('scene_accuracy'))} |")
    size = r.get("size")
    if not size:  # a failed gate installs nothing
        return "\n".join(lines) + "\n"
    lines += ["", "## Size", "", "| | fp32 | " + r["precision"] + " |", "|---|---|---|"]
    for name in sorted(size["files_int8"]):
        lines.append(f"| {name} | {size['files_fp32'].get(name, 0) / 1e6:.2f} MB | "
                     f"{size['files_int8'][name] / 1e6:.2f} MB |")
    lines.append(f"| **total** | {size['fp32_bytes'] / 1e6:.2f} MB | "
                 f"{size['int8_bytes'] / 1e6:.2f} MB ({size['ratio']:.3f}x) |")
    return "\n".join(lines) + "\n"
