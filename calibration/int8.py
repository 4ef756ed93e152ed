"""--precision int8 | int8-dynamic applied to an fp32 artifact directory.

    manifest = quantize_artifact(artifact_dir, Int8Options(precision="int8", data=...), log)

Steps:
  1. reference   the fp32 pipeline on the held-out split (gate.reference)
  2. ranges      int8 only: activation ranges of the vision and decoder
                 graphs, from the cache or collected on the calibration split
                 (ranges.py, feeds.py)
  3. quantize    vision + decoder (graphs.py; static QDQ or dynamic), the
                 embedding weight-only
  4. gate        figures against fp32; below target, the sensitivity loop
                 keeps the most harmful nodes fp32 (sensitivity.py); still
                 below: AccuracyGateError
  5. install     the graphs replace the fp32 ones; manifest (precision,
                 files, quantization) and calibration_report.json/.md written;
                 the artifact is reopened with a plain VLMSession as a check

`artifact_dir` is the exporter's staging directory, so a failure anywhere
leaves no artifact behind (export/artifact.py). Scratch files live in
<artifact_dir>/.int8-work and are removed at the end.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from vlmedge import __version__, manifest as manifest_mod
from vlmedge.errors import AccuracyGateError, UserInputError
from vlmedge.lazy import require

from . import feeds, gate, graphs, ranges, report, sensitivity
from .dataset import CalibrationSet
from .sensitivity import Node

PRECISIONS = ("int8", "int8-dynamic")
GRAPHS = ("vision", "decoder")  # calibrated graphs; the embedding is weight-only
WORK_DIR = ".int8-work"
Log = Callable[[str], None]


@dataclass
class Int8Options:
    precision: str  # "int8" | "int8-dynamic"
    data: CalibrationSet
    method: str = "minmax"  # calibration method (int8): minmax | entropy | percentile
    targets: gate.Targets = field(default_factory=gate.Targets)
    scene: bool = False  # score scene-question accuracy (the demo model)
    cache_dir: Path | None = None  # activation-range cache; None: off
    threads: int | None = None  # onnxruntime intra-op threads (None: its default)
    progress: bool = False  # rich progress bars on stderr while collecting
    # The graphs to quantize: both, or ("vision",) alone beside a decoder quantized
    # otherwise (weight-only int4, or the ort flavour's int8: export/weight_only.py);
    # the embedding table follows the decoder.
    graphs: tuple[str, ...] = GRAPHS


def default_threads() -> int | None:
    """OMP_NUM_THREADS when set (onnxruntime's own default is one thread per core)."""
    value = os.environ.get("OMP_NUM_THREADS", "")
    return int(value) if value.isdigit() and int(value) > 0 else None


def check_options(precision: str, method: str, targets: gate.Targets) -> None:
    if precision not in PRECISIONS:
        raise UserInputError(f"unknown INT8 precision {precision!r}",
                             expected=" | ".join(PRECISIONS))
    if method not in ranges.METHODS:
        raise UserInputError(f"unknown --calib-method {method!r}",
                             expected=" | ".join(ranges.METHODS))
    for name, value in (("--accuracy-target", targets.agreement), ("--min-cosine", targets.cosine)):
        if not 0.0 < value <= 1.0:
            raise UserInputError(f"{name} must be in (0, 1]", got=str(value),
                                 hint="a fraction: 0.97 means 97%")
    if targets.scene_drop_points < 0:
        raise UserInputError("--max-accuracy-drop must be >= 0 (points)",
                             got=str(targets.scene_drop_points))


class Pipeline:
    """A VLMSession of the staged artifact whose graphs are swapped for
    quantized variants (its vision / embed / decoder backends)."""

    def __init__(self, directory: Path, threads: int | None, manifest: dict):
        from vlmedge.runtime.session import VLMSession
        self.session = VLMSession(directory, provider="cpu", threads=threads, verify=False,
                                  manifest=manifest)
        self.threads = threads
        self.current: dict[str, Path] = {}

    def use(self, graph: str, path: Path) -> None:
        if self.current.get(graph) == path:
            return
        from vlmedge.runtime.backends import OrtBackend
        setattr(self.session, graph, OrtBackend(path, ["CPUExecutionProvider"], self.threads))
        self.current[graph] = path


class Variants:
    """Quantized graphs, one per (graph, set of nodes kept fp32), built on demand."""

    def __init__(self, directory: Path, work: Path, precision: str, nodes: dict[str, list[str]],
                 ranges_files: dict[str, Path], method: str):
        self.directory, self.work, self.precision = directory, work, precision
        self.nodes, self.ranges_files, self.method = nodes, ranges_files, method

    def path(self, graph: str, excluded: frozenset[str]) -> Path:
        tag = hashlib.sha1("\n".join(sorted(excluded)).encode()).hexdigest()[:12]
        dst = self.work / "variants" / f"{graph}-{tag}" / f"{graph}.onnx"
        if dst.exists():
            return dst
        src = self.directory / f"{graph}.onnx"
        if self.precision == "int8":
            graphs.quantize_static(src, dst, self.ranges_files[graph],
                                   ranges.method_enum(self.method), self.nodes[graph],
                                   sorted(excluded))
        else:
            graphs.quantize_dynamic(src, dst, self.nodes[graph], sorted(excluded))
        return dst

    def prune(self, keep: set[Path]) -> None:
        """Deletes variants other than `keep` (leave-one-out trials add up on disk)."""
        root = self.work / "variants"
        for d in root.iterdir() if root.exists() else []:
            if not any(p.parent == d for p in keep):
                shutil.rmtree(d, ignore_errors=True)


def quantize_artifact(directory: Path, opts: Int8Options, log: Log,
                      manifest: dict | None = None) -> dict[str, Any]:
    """Quantizes the fp32 artifact in `directory` in place; returns its new manifest.

    manifest: the exporter's manifest of a staged artifact (no manifest.json
    there yet): used and updated in memory, and written by the exporter
    last. Without it the directory's manifest.json is read and rewritten."""
    check_options(opts.precision, opts.method, opts.targets)
    work = directory / WORK_DIR
    try:
        return _quantize(directory, opts, work, log, manifest)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _timed(log: Log, name: str):
    class _T:
        def __enter__(self):
            self.t = time.perf_counter()
            log(f"[{name}] ...")

        def __exit__(self, *exc):
            if exc[0] is None:
                log(f"[{name}] done in {time.perf_counter() - self.t:.1f}s")
    return _T()


def _quantize(directory: Path, opts: Int8Options, work: Path, log: Log,
              staged: dict | None) -> dict[str, Any]:
    from vlmedge.runtime.session import VLMSession

    start = time.perf_counter()
    static = opts.precision == "int8"
    # As a dict: this stage edits it (files, precision, quantization).
    m = staged if staged is not None else manifest_mod.load(directory, verify=False).to_dict()
    staged_precision = m["precision"]
    fp32_files = {name: e["bytes"] for name, e in m["files"].items()}
    session32 = VLMSession(directory, provider="cpu", threads=opts.threads, verify=False,
                           manifest=m)
    from vlmedge.runtime.cli_common import Progress
    with _timed(log, "int8 reference"), Progress("fp32 reference", len(opts.data.holdout),
                                                 quiet=not opts.progress) as bar:
        ref = gate.reference(session32, opts.data.holdout, opts.scene, progress=bar.update)
    chosen = opts.graphs
    protos = {g: graphs.load_proto(directory / f"{g}.onnx") for g in chosen}
    pick = graphs.weight_nodes if static else graphs.dynamic_nodes
    nodes = {g: pick(protos[g]) for g in chosen}
    labels = {g: graphs.node_labels(protos[g]) for g in chosen}
    calib_info: dict[str, Any] = {"method": opts.method if static else None,
                                  "decode_steps": feeds.DECODE_STEPS, "cache": {}}
    ranges_files: dict[str, Path] = {}
    if static:
        for g in chosen:
            with _timed(log, f"calibrate {g}"):
                ranges_files[g] = _ranges(directory, m, g, protos[g], nodes[g], session32, opts,
                                          work, calib_info, log)
    variants = Variants(directory, work, opts.precision, nodes, ranges_files, opts.method)
    embed_path = work / "embed" / "embed.onnx"
    embed_storage = "fp16" if static else "int8"  # see graphs.py: TensorRT takes no int8 Gather
    embed_done = "decoder" in chosen and \
        graphs.quantize_embedding(directory / "embed.onnx", embed_path, embed_storage)
    pipe = Pipeline(directory, opts.threads, m)
    if embed_done:
        pipe.use("embed", embed_path)

    def apply(excluded: list[Node], images: int | None = None, cosine_only: bool = False):
        for g in chosen:
            pipe.use(g, variants.path(g, frozenset(n.name for n in excluded if n.graph == g)))
        return gate.measure(pipe.session, ref, images, cosine_only)

    with _timed(log, "int8 gate"):
        initial, loop, ranking = _gate(apply, variants, nodes, opts.targets, log)
        final_paths = {g: variants.path(g, frozenset(n.name for n in loop.excluded if n.graph == g))
                       for g in chosen}
        variants.prune(set(final_paths.values()))
    rep = _report(opts, static, embed_storage if embed_done else None, nodes, labels, calib_info,
                  initial, loop, ranking)
    if loop.failures:
        report.write(directory, rep)  # kept with --keep-failed
        raise AccuracyGateError(
            f"{opts.precision} stays below the accuracy target with "
            f"{len(loop.excluded)} node(s) kept in fp32: " + "; ".join(loop.failures),
            hint="try --calib-method percentile or entropy, more or more representative "
                 "--calib data, a lower --accuracy-target, or fp32/fp16")
    files = _install(directory, final_paths, embed_path if embed_done else None)
    m = _update_manifest(directory, m, opts, files, embed_storage if embed_done else None)
    if "decoder" not in chosen:  # vision alone: the decoder keeps its own precision
        m["precision"] = staged_precision
    rep["size"] = _sizes(fp32_files, {n: e["bytes"] for n, e in m["files"].items()})
    rep["seconds"] = round(time.perf_counter() - start, 2)
    m["quantization"] = report.manifest_section(rep)
    if staged is None:
        manifest_mod.write(directory, m)
    report.write(directory, rep)
    _check_loads(directory, opts, log, m)
    return m


def _gate(apply, variants: Variants, nodes: dict[str, list[str]], targets: gate.Targets,
          log: Log):
    """Measures the fully quantized pipeline; below target, runs the
    sensitivity pass. Returns (initial figures, LoopResult, ranking)."""
    initial = apply([])
    fails = gate.failures(initial, targets)
    log("[gate] " + _figures_line(initial) + (" -> passes" if not fails else
                                               " -> below target: " + "; ".join(fails)))
    if not fails:
        return initial, sensitivity.LoopResult(figures=initial), []

    def tidy(excluded: list[Node]) -> None:  # leave-one-out variants add up on disk
        variants.prune({variants.path(g, frozenset(n.name for n in excluded if n.graph == g))
                        for g in nodes})

    loop, ranking = _sensitivity_pass(apply, nodes, initial, targets, log, tidy)
    return initial, loop, ranking


def _report(opts: Int8Options, static: bool, embed_storage: str | None, nodes, labels,
            calib_info: dict, initial: gate.Figures, loop, ranking) -> dict[str, Any]:
    """calibration_report.json's content (size and seconds are added on install)."""
    return {
        "precision": opts.precision,
        **_describe(static, embed_storage),
        "quantized_nodes": {g: len(nodes[g]) - sum(n.graph == g for n in loop.excluded)
                            for g in nodes},
        "calibration": {**opts.data.describe(), **calib_info},
        "excluded_nodes": {g: [{"node": n.name, "module": labels[g].get(n.name)}
                               for n in loop.excluded if n.graph == g] for g in nodes},
        "accuracy": {"targets": asdict(opts.targets), "initial": initial.to_dict(),
                     "final": loop.figures.to_dict(), "passed": not loop.failures,
                     "failures": loop.failures},
        "sensitivity": {"ran": bool(loop.steps or ranking), "ranking": [
            {"graph": r.node.graph, "node": r.node.name,
             "module": labels[r.node.graph].get(r.node.name), "gain": r.gain}
            for r in ranking[:20]], "steps": loop.steps},
        "size": None,
        "onnxruntime_version": require("onnxruntime", "INT8").__version__,
    }


def _describe(static: bool, embed_storage: str | None) -> dict[str, Any]:
    embed = {"int8": "int8 weight-only, symmetric per row (Gather int8 rows and scales, Cast, "
                     "Mul)",
             "fp16": "fp16 weight-only (Gather, Cast): TensorRT's Gather takes no int8",
             None: "fp32 (the embedding graph is not a single table Gather)"}[embed_storage]
    if static:
        return {"method": "static", "format": "QDQ (QuantizeLinear/DequantizeLinear, standard "
                                              "ONNX domain)",
                "weights": "int8 symmetric per output channel",
                "activations": "int8 symmetric per tensor, static ranges from calibration",
                "embedding": embed, "cpu_only": False}
    return {"method": "dynamic", "format": "integer ops (MatMulInteger, DynamicQuantizeLinear)",
            "weights": "int8 symmetric per output channel",
            "activations": "uint8 per tensor, quantized at run time",
            "embedding": embed, "cpu_only": True}


def _figures_line(f: gate.Figures) -> str:
    parts = [f"cosine {f.cosine_mean:.4f} (min {f.cosine_min:.4f})"]
    if f.agreement is not None:
        parts.append(f"top-1 agreement {100 * f.agreement:.2f}% of {f.positions}")
        parts.append(f"KL {f.kl:.3g}")
    if f.scene_accuracy is not None:
        parts.append(f"scene accuracy {100 * f.scene_accuracy:.1f}% (fp32 "
                     f"{100 * f.scene_accuracy_fp32:.1f}%, {f.scene_questions} questions)")
    return ", ".join(parts)


def _ranges(directory: Path, m: dict, graph: str, proto, nodes: list[str], session32,
            opts: Int8Options, work: Path, info: dict, log: Log) -> Path:
    """The activation-ranges file of `graph`: a cache hit, or collected now."""
    ort = require("onnxruntime", "INT8 calibration")
    files = m["files"]
    fields = {
        "graph": graph,
        "model": [files[f"{graph}.onnx"]["sha256"], files[f"{graph}.onnx.data"]["sha256"]],
        "preprocessing": hashlib.sha256(repr(sorted(
            {"preprocess": m["preprocess"], "image": m["image"], "tokenizer": m["tokenizer"],
             "tokenizer_file": files.get("tokenizer.json", {}).get("sha256"),
             "vlmedge": __version__}.items())).encode()).hexdigest(),
        "data": opts.data.calib_hash,
        "method": {"calibration": opts.method, "op_types": list(graphs.QUANT_OPS),
                   "decode_steps": feeds.DECODE_STEPS if graph == "decoder" else None,
                   "onnxruntime": ort.__version__},
    }
    key = ranges.cache_key(fields)
    needed = ranges.needed_tensors(proto, nodes)
    found = ranges.lookup(opts.cache_dir, graph, key, needed, work)
    if found.status == "hit":
        log(f"[calibrate] {graph}: activation-range cache hit ({found.path}); collection skipped")
        info["cache"][graph] = "hit"
        return found.path
    log(f"[calibrate] {graph}: activation-range cache {found.status} ({found.reason}); "
        f"collecting on {len(opts.data.calib)} images ({opts.method})")
    from vlmedge.runtime.cli_common import Progress

    samples = opts.data.calib
    count = [0, 0]  # samples done, feeds yielded

    with Progress(f"calibrating {graph}", len(samples), quiet=not opts.progress) as bar:
        def tick():
            count[0] += 1
            bar.update(count[0])

        make = feeds.vision_feeds if graph == "vision" else feeds.decoder_feeds
        source = make(session32, samples, on_sample=tick)

        def counted():
            for f in source:
                count[1] += 1
                yield f

        tensors = ranges.collect(directory / f"{graph}.onnx", list(graphs.QUANT_OPS), opts.method,
                                 counted(), work / f"calib-{graph}", opts.threads)
    ranges.store(found.path, tensors, key, fields)
    info[f"{graph}_feeds"] = count[1]
    info["cache"][graph] = found.status
    log(f"[calibrate] {graph}: ranges of {len(list(tensors.keys()))} tensors from {count[1]} "
        f"{graph} calls" + (f"; cached at {found.path}" if opts.cache_dir else ""))
    return found.path


def _sensitivity_pass(apply, nodes: dict[str, list[str]], initial: gate.Figures,
                      targets: gate.Targets, log: Log, tidy: Callable[[list[Node]], None]):
    """Stage A (image-feature cosine short): vision nodes by cosine gain.
    Stage B (anything still short): all nodes by end-to-end KL gain."""
    total = sum(len(v) for v in nodes.values())
    cap = max(1, int(sensitivity.MAX_EXCLUDED_FRACTION * total))
    sens = sensitivity.SENSITIVITY_IMAGES
    log(f"[gate] per-node sensitivity over {total} quantized nodes (leave-one-out on "
        f"{sens} held-out images; at most {cap} kept fp32)")
    excluded: list[Node] = []
    steps: list[dict] = []
    ranking: list[sensitivity.Ranked] = []
    figures, fails = initial, gate.failures(initial, targets)
    if initial.cosine_mean < targets.cosine:
        base = apply([], sens, cosine_only=True).cosine_mean
        ranked = sensitivity.rank([Node("vision", n) for n in nodes["vision"]],
                                  lambda n: apply([n], sens, cosine_only=True).cosine_mean,
                                  base, True, log)
        ranking += ranked
        tidy(excluded)

        def cosine_check(ex):
            f = apply(ex, cosine_only=True)
            return f, [x for x in gate.failures(f, targets) if "cosine" in x]

        res = sensitivity.exclude_until(ranked, excluded, cap, cosine_check, log)
        excluded, steps = res.excluded, steps + res.steps
        figures = apply(excluded)
        fails = gate.failures(figures, targets)
    if fails and len(excluded) < cap:
        base = apply(excluded, sens).kl
        candidates = [Node(g, n) for g in nodes for n in nodes[g] if Node(g, n) not in excluded]
        ranked = sensitivity.rank(candidates, lambda n: apply(excluded + [n], sens).kl, base,
                                  False, log)
        ranking += ranked
        tidy(excluded)

        def full_check(ex):
            f = apply(ex)
            return f, gate.failures(f, targets)

        res = sensitivity.exclude_until(ranked, excluded, cap, full_check, log)
        excluded, steps = res.excluded, steps + res.steps
        if res.figures is not None:
            figures, fails = res.figures, res.failures
    return sensitivity.LoopResult(excluded, steps, figures, fails), ranking


def _install(directory: Path, final: dict[str, Path], embed: Path | None) -> list[str]:
    """Moves the chosen graphs over the fp32 ones; returns the graph file names."""
    chosen = dict(final)
    if embed is not None:
        chosen["embed"] = embed
    names = []
    for g, path in chosen.items():
        for suffix in ("", ".data"):
            src = path.with_name(path.name + suffix)
            dst = directory / f"{g}.onnx{suffix}"
            if src.exists():
                os.replace(src, dst)
                names.append(dst.name)
    return names


def _update_manifest(directory: Path, m: dict, opts: Int8Options, files: list[str],
                     embed_storage: str | None) -> dict:
    for name in files:
        m["files"][name] = manifest_mod.file_entry(directory / name)
    m["precision"] = opts.precision
    for g in opts.graphs:
        m["components"][g]["precision"] = opts.precision
    if "decoder" in opts.graphs:  # the embedding follows the decoder
        m["components"]["embed"]["precision"] = \
            f"{embed_storage}-weight-only" if embed_storage else "fp32"
    if m.get("validation"):
        m["validation"]["note"] = ("parity of the fp32 graphs with PyTorch, before quantization; "
                                   "the quantized graphs' accuracy is under quantization.accuracy")
    return m


def _sizes(before: dict[str, int], after: dict[str, int]) -> dict[str, Any]:
    fp32, int8 = sum(before.values()), sum(after.values())
    return {"fp32_bytes": fp32, "int8_bytes": int8,
            "ratio": round(int8 / fp32, 4) if fp32 else None,
            "files_fp32": before, "files_int8": after}


def _check_loads(directory: Path, opts: Int8Options, log: Log, m: dict) -> None:
    """The installed artifact opens with a plain VLMSession (its manifest
    parsed strictly, every file hashed) and answers."""
    from vlmedge.runtime.session import VLMSession
    s = VLMSession(directory, provider="cpu", threads=opts.threads, verify=True, manifest=m)
    sample = opts.data.holdout[0]
    r = s.generate(sample.image(), sample.prompts[0], max_new_tokens=8)
    log(f"[int8] reopened with VLMSession ({s.providers[0]}): {sample.prompts[0]!r} -> {r.text!r}")
