"""The exporter's weight-only stage: --precision int4 (either decoder flavour),
--precision int8 with --decoder-flavour ort, and --precision int4-fp16 (the
portable flavour's int4 blocks with fp16 scales and activations, for TensorRT).

    1. parity: the fp32 artifact against PyTorch (tokens equal, logits
       within the family's tolerance), as for every export
    2. reference: the fp32 artifact's greedy logits on the held-out calibration
       prompts, and (demo model) its scene accuracy (calibration/gate.py)
    3. rebuild: the ort flavour's decoder again at int8/int4 (MatMulNBits, block
       32 unless --weight-block-size, round to nearest: export/ort_decoder.py), and/or the portable
       decoder's MatMul weights as int4 blocks behind DequantizeLinear
       (export/blocked_int4.py): both for --decoder-flavour both; the
       embedding table int8 per row; the vision graph stays fp32
    3b. int4-fp16 (TensorRT): no int8 embedding (TensorRT needs constant
       scales, a gathered row's are not), and after the gate of step 5 on
       these fp32-activation graphs, every graph to fp16 (the int4 blocks'
       scales too) and the gate once more on the fp16 graphs where
       onnxruntime's CPU provider runs them
    4. with --vision-precision int8: the vision graph through the INT8 stage
       (calibration/int8.py, static QDQ, vision alone), gated beside the new decoder
    5. gate: the whole artifact against the fp32 reference, with the same figures
       and targets as INT8 (image-feature cosine, teacher-forced top-1 agreement,
       scene-accuracy drop), each decoder flavour it holds on its own; any
       falling short fails the export in one line

The manifest's `quantization` section records method, format, data set, the
figures and the sizes, like the INT8 stage's.
"""
from __future__ import annotations

import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

from vlmedge import manifest as manifest_mod
from vlmedge.errors import AccuracyGateError
from vlmedge.lazy import require

from . import blocked_int4, ort_decoder
from .quantize import fp32_parity, is_demo

DECODER_FILES = ("decoder.onnx", "decoder.onnx.data")
ORT_BESIDE_FILES = (f"{manifest_mod.ORT_DECODER}.onnx", f"{manifest_mod.ORT_DECODER}.onnx.data")
EMBED_FILES = ("embed.onnx", "embed.onnx.data")


def _embedding_int8(tmp: Path) -> bool:
    """The embedding table int8 per row (calibration/graphs.py), in place: the
    table is as large as the LM head (49k x 576 for SmolVLM) and only the
    prompt's rows are read, so it costs RSS rather than time."""
    from vlmedge.calibration import graphs

    work = tmp / ".embed-int8"
    try:
        if not graphs.quantize_embedding(tmp / "embed.onnx", work / "embed.onnx", "int8"):
            return False
        for name in EMBED_FILES:
            (work / name).replace(tmp / name)
        return True
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _prefill_feeds(tmp: Path, m: dict, data) -> list[dict]:
    """The fp32 decoder's prefill inputs on the calibration split (image +
    prompt pairs through the runtime's own preprocessing, chat template and
    embedding): what GPTQ collects its Hessians from. KV buffers of the
    prompt's length stand for the empty past (the ort flavour's GQA reads
    each row's length from the attention mask)."""
    import numpy as np

    from vlmedge.runtime.session import VLMSession

    s = VLMSession(tmp, provider="cpu", verify=False, manifest=m)
    f = s.facts
    feeds = []
    for sample in data.calib:
        enc = s.encode(sample.image())
        for prompt in sample.prompts:
            embeds = s.embed_prompt(s.chat.prompt_ids(prompt, image_grid=enc.grid),
                                    enc.features)  # (1, S, D)
            n = embeds.shape[1]
            feed = {"inputs_embeds": embeds, "attention_mask": np.ones((1, n), np.int64)}
            for name in f.past_names():
                feed[name] = np.zeros((1, f.num_kv_heads, n, f.head_dim), np.float32)
            feeds.append(feed)
            if len(feeds) >= ort_decoder.GPTQ_MAX_SEQUENCES:
                return feeds
    return feeds


def quantize(o, loaded, tmp: Path, m: dict, data, validate: Callable, stage,
             log: Callable[[str], None], staged=None) -> dict[str, Any]:
    """fp32 parity, then the decoder's weights at o.precision; returns the manifest."""
    from vlmedge.calibration import gate
    from vlmedge.runtime.cli_common import Progress
    from vlmedge.runtime.session import VLMSession

    from .exporter import block_size

    fp32_parity(o, loaded, tmp, m, validate, stage, staged)
    block = block_size(o)
    w16 = o.precision == "int4-fp16"
    targets = gate.Targets(o.accuracy_target, o.min_cosine, o.max_accuracy_drop)
    scene = is_demo(o.model_dir)
    typed = manifest_mod.Manifest.from_dict(m, where="the manifest being built")
    flavours = typed.decoder_flavours  # decoder.flavour's graph first
    files_of = {f: typed.component_files(typed.decoder_component(f)) for f in flavours}
    fp32_bytes = {f: sum(m["files"][n]["bytes"] for n in files_of[f] if n in m["files"])
                  for f in flavours}
    refs: dict[str, Any] = {}
    # Random weights: answers mean nothing, so no agreement or scene gate; int8
    # vision (which needs data for its ranges) is still held to its feature cosine.
    gated = data is not None and not o.random_weights
    if gated:
        for f in flavours:  # each quantized decoder against its own fp32 graph
            with stage(f"{o.precision} reference" + (f" ({f})" if len(flavours) > 1 else "")), \
                    Progress("fp32 reference", len(data.holdout), quiet=not o.progress) as bar:
                refs[f] = gate.reference(VLMSession(tmp, provider="cpu", verify=False,
                                                    manifest=m, decoder_flavour=f),
                                         data.holdout, scene, progress=bar.update)
    ref = refs.get(flavours[0])
    with stage(f"{o.precision} weights ({o.weight_method})"):
        t = time.perf_counter()
        if "portable" in flavours:  # int4 blocks behind DequantizeLinear, in the exported graph
            blocked_int4.quantize_decoder(tmp, log, block)
        if "ort" in flavours and o.weight_method == "gptq":  # calibrated, from the fp32 graph
            ort_decoder.gptq(tmp, o.precision, _prefill_feeds(tmp, m, data), log, block)
        elif "ort" in flavours:
            ort_decoder.build(loaded, tmp, o.precision, log, name=typed.decoder_component("ort"),
                              block_size=block)
        build_s = time.perf_counter() - t
        embed_int8 = not w16 and _embedding_int8(tmp)
        for name in DECODER_FILES + ORT_BESIDE_FILES + EMBED_FILES:
            m["files"].pop(name, None)
            if (tmp / name).exists():
                m["files"][name] = manifest_mod.file_entry(tmp / name)
        m["files"] = dict(sorted(m["files"].items()))
        for f in flavours:
            m["components"][typed.decoder_component(f)]["precision"] = \
                f"{o.precision}-weight-only"
        m["components"]["embed"]["precision"] = "int8-weight-only" if embed_int8 else "fp32"
        m["components"]["vision"]["precision"] = "fp32"
        m["precision"] = o.precision
    vision_report = None
    if o.vision_precision == "int8":  # static QDQ vision, gated beside the new decoder
        from vlmedge.calibration import int8

        from .quantize import _cache_dir
        vtargets = targets if gated else gate.Targets(1e-9, o.min_cosine, 100.0)
        vopts = int8.Int8Options(
            precision="int8", data=data, method=o.calib_method, targets=vtargets, scene=scene,
            cache_dir=_cache_dir(o), threads=int8.default_threads(), progress=o.progress,
            graphs=("vision",))
        with stage("vision int8"):
            m = int8.quantize_artifact(tmp, vopts, log, manifest=m)
        vision_report, m["quantization"] = m["quantization"], None  # nested below
    by_flavour: dict[str, gate.Figures] = {f: gate.Figures() for f in flavours}
    failures: list[str] = []
    if ref is not None:
        for f in flavours:  # each decoder the artifact holds is gated on its own
            with stage(f"{o.precision} gate" + (f" ({f})" if len(flavours) > 1 else "")):
                session = VLMSession(tmp, provider="cpu", verify=False, manifest=m,
                                     decoder_flavour=f)
                by_flavour[f] = gate.measure(session, refs[f], scene=scene)
                failures += [f"{f} decoder: {x}" if len(flavours) > 1 else x
                             for x in gate.failures(by_flavour[f], targets)]
    # at the top, the weaker decoder's figures (lower top-1 agreement), as the
    # validation record puts the worse flavour's differences on top
    figures = min(by_flavour.values(), key=lambda fig: (
        fig.agreement if fig.agreement is not None else 1.0))
    fp16_check: dict[str, Any] = {}
    if w16:  # the graphs TensorRT builds: fp16, gated again where onnxruntime runs them
        fp16_figures, fp16_check = _graphs_to_fp16(tmp, m, ref, scene, stage, log)
        if fp16_figures is not None:
            figures = fp16_figures
            failures += [f"fp16 graphs: {x}" for x in gate.failures(fp16_figures, targets)]
    after = {f: sum(m["files"][n]["bytes"] for n in files_of[f] if n in m["files"])
             for f in flavours}
    formats = {
        "portable": f"DequantizeLinear (opset 21) of int4 blocks of {block} "
                    f"before each MatMul, symmetric, round to nearest (onnxruntime's "
                    f"MatMulNBitsQuantizer, QDQ format; onnxruntime fuses them into "
                    f"MatMulNBits at load)" if not w16 else
                    f"DequantizeLinear (opset 21) of int4 blocks of {block} with fp16 scales "
                    f"before each fp16 MatMul, symmetric, round to nearest (onnxruntime's "
                    f"MatMulNBitsQuantizer, QDQ format): TensorRT's weight-only INT4",
        "ort": f"MatMulNBits (com.microsoft), {o.precision[3:]}-bit, block "
               f"{block}, symmetric, " + (
                   "GPTQ on the calibration prompts (onnxruntime's MatMulNBitsQuantizer)"
                   if o.weight_method == "gptq" else
                   "round to nearest (onnxruntime-genai model builder)")}
    m["quantization"] = {
        "precision": o.precision,
        "method": "weight-only",
        "format": " | ".join(f"{f}: {formats[f]}" if len(flavours) > 1 else formats[f]
                             for f in flavours),
        "weight_method": o.weight_method,
        "block_size": block,
        "weights": f"decoder MatMuls and LM head {'int4' if w16 else o.precision}; embedding "
                   f"{'int8 per row' if embed_int8 else 'fp16' if w16 else 'fp32'}; vision "
                   f"{'int8 static QDQ (under vision)' if vision_report else 'fp16' if w16 else 'fp32'}",
        "vision": vision_report,
        "activations": "fp16 in the graph" if w16 else "fp32 in the graph" + (
                       "" if "ort" not in flavours else
                       " (the ort flavour: onnxruntime's CPU kernels quantize them to int8 per "
                       "block on the fly, accuracy_level 4)"),
        "cpu_only": False,
        "calibration": {**data.describe(), "used_for": "the accuracy gate (held-out prompts)"
                        + (" and the vision graph's int8 ranges" if vision_report else "")}
        if data is not None else {"source": None, "used_for": "nothing: random weights"},
        "accuracy": {"targets": asdict(targets), "final": figures.to_dict(),
                     "by_flavour": {f: fig.to_dict() for f, fig in by_flavour.items()},
                     "passed": not failures, "failures": failures,
                     "skipped": None if ref is not None else
                     "random weights: answers are meaningless, so no gate",
                     # int4-fp16: by_flavour holds the int4 weights' figures at
                     # fp32 activations, "final" the fp16 graphs' where they ran
                     **({"fp16_graphs": fp16_check} if w16 else {})},
        # the decoder.flavour graph's sizes; by_flavour: each decoder graph's
        "size": {"decoder_fp32_bytes": fp32_bytes[flavours[0]],
                 "decoder_bytes": after[flavours[0]],
                 "ratio": round(after[flavours[0]] / max(1, fp32_bytes[flavours[0]]), 4),
                 "by_flavour": {f: {"decoder_fp32_bytes": fp32_bytes[f],
                                    "decoder_bytes": after[f],
                                    "ratio": round(after[f] / max(1, fp32_bytes[f]), 4)}
                                for f in flavours}},
        "build_seconds": round(build_s, 2),
        "onnxruntime_version": require("onnxruntime", "weight-only quantization").__version__,
    }
    if m.get("validation"):
        m["validation"]["note"] = ("parity of the fp32 graphs with PyTorch, before "
                                   "the weight-only stage; its accuracy is under "
                                   "quantization.accuracy")
    for f in flavours:
        log(f"[{o.precision}] {f} decoder {fp32_bytes[f] / 1e6:.1f} MB -> "
            f"{after[f] / 1e6:.1f} MB; {_figures(by_flavour[f])}")
    if failures:
        raise AccuracyGateError(f"{o.precision} weights miss the accuracy targets: "
                              + "; ".join(failures),
                              hint=("try --weight-block-size 64, or --precision int8 or fp16"
                                    if w16 else "use --precision int8 (or fp32)")
                              + ", lower --accuracy-target / raise --max-accuracy-drop "
                                "knowingly; --keep-failed keeps the artifact")
    return m


def _graphs_to_fp16(tmp: Path, m: dict, ref, scene: bool, stage,
                    log: Callable[[str], None]) -> tuple[Any, dict[str, Any]]:
    """int4-fp16: every graph to fp16 in place (activations, I/O, the int4
    blocks' scales; the int4 weights stay), the manifest's files and
    components updated; then, with a reference (not random weights), the
    gate's figures on the fp16 graphs, where onnxruntime's CPU provider runs
    them (it lacks fp16 kernels for some families' ops: then None, and the
    record says why and where to measure instead)."""
    from vlmedge.calibration import gate
    from vlmedge.runtime.session import VLMSession

    from .exporter import component_io, convert_fp16, missing_fp16_kernel, onnxruntime_errors

    with stage("fp16"):
        for comp in ("vision", "embed", "decoder"):
            convert_fp16(tmp / f"{comp}.onnx")
            for name in (f"{comp}.onnx", f"{comp}.onnx.data"):
                m["files"][name] = manifest_mod.file_entry(tmp / name)
            m["components"][comp].update(component_io(tmp / f"{comp}.onnx"))
        m["components"]["vision"]["precision"] = m["components"]["embed"]["precision"] = "fp16"
    if ref is None:
        return None, {"measured": False, "reason": "random weights: no gate"}
    try:
        with stage("int4-fp16 gate (fp16 graphs)"):
            session = VLMSession(tmp, provider="cpu", verify=False, manifest=m)
            figures = gate.measure(session, ref, scene=scene)
    except onnxruntime_errors() as e:
        # Only a missing fp16 kernel is onnxruntime's limit rather than a
        # fault of these graphs (every family's fp16 graphs run on
        # onnxruntime 1.32's CPU provider); anything else fails the export.
        if not missing_fp16_kernel(e):
            raise
        reason = (f"onnxruntime's CPU provider lacks an fp16 kernel these graphs need "
                  f"({str(e).splitlines()[0][:160]}): the int4 weights were gated at fp32 "
                  f"activations only; compare the engines with the fp32 artifact on the device: "
                  f"python -m vlmedge.benchmarks.trt_parity ARTIFACT FP32_ARTIFACT")
        log(f"[int4-fp16] warning: the fp16 graphs were not gated: {reason}")
        return None, {"measured": False, "reason": reason}
    log(f"[int4-fp16] the fp16 graphs: {_figures(figures)}")
    return figures, {"measured": True, "figures": figures.to_dict()}


def _figures(f) -> str:
    parts = [f"top-1 agreement {100 * f.agreement:.2f}% of {f.positions} positions"
             if f.agreement is not None else "no gate positions"]
    if f.scene_accuracy is not None:
        parts.append(f"scene accuracy {100 * f.scene_accuracy:.1f}% (fp32 "
                     f"{100 * f.scene_accuracy_fp32:.1f}%, {f.scene_questions} questions)")
    return ", ".join(parts)
