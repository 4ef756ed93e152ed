"""HF model directory -> artifact directory, stage by stage.

`plan(options)` lists the stages, decided from the options and the typed
precision (vlmedge/precision.py): load, vision, embedding, decoder (portable:
torch.onnx; ort: the onnxruntime-genai builder, export/ort_decoder.py), fp16
(fp16 only), write, then either validate (parity with PyTorch) or, for a
calibrated precision, its quantization stage, which proves fp32 parity first
(INT8: export/quantize.py; weight-only int4, either flavour, the ort
flavour's int8 and int4-fp16, which turns the graphs to fp16 itself:
export/weight_only.py), and trt (--target trt). Each stage is one function of
the shared `Run`; each prints its elapsed time; the result is a summary dict
(also the --json output). See vlmedge/manifest.py for what the manifest holds.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from vlmedge import __version__, manifest
from vlmedge import precision as precision_mod
from vlmedge.errors import UserInputError, ValidationError

from vlmedge.runtime.cli_common import stage as timed_stage

from . import artifact, loading, ort_decoder
from .onnx_export import export_graph

PRECISIONS = precision_mod.NAMES
TARGETS = ("onnx", "trt")
# --decoder-flavour: "both" puts the ort flavour's decoder beside the portable one
# (components decoder and decoder_ort); the runtime picks one by provider.
FLAVOURS = ("portable", "ort", "both")
BOTH_PRECISIONS = ("fp32", "int4")  # weight-only (or none) in both flavours alike


@dataclass
class ExportOptions:
    model_dir: Path
    output: Path
    target: str = "onnx"
    precision: str = "fp32"
    # "portable" | "ort" | "both"; None: ort for int4 (its fastest), else portable
    decoder_flavour: str | None = None
    # weight-only exports (weight_only()): the vision graph "fp32" or "int8" (static QDQ)
    vision_precision: str = "fp32"
    # ort flavour's int8/int4 weights: "rtn" (round to nearest) | "gptq" (calibrated)
    weight_method: str = "rtn"
    # weight-only exports: weights sharing one scale (ort_decoder.BLOCK_SIZES);
    # None: the precision's (block_size())
    weight_block_size: int | None = None
    validate: bool = True
    random_weights: bool = False
    max_context: int | None = None
    max_batch: int = 1  # --target trt: optimization-profile limits (export/trt/profiles.py)
    max_images: int = 1
    max_image_tokens: int | None = None  # the artifact's default image-token budget
    pan_and_scan: bool = False  # Gemma 3: crops of elongated images beside the whole one
    force: bool = False
    keep_failed: bool = False
    trust_remote_code: bool = False
    allow_pickle: bool = False
    # --precision int8 | int8-dynamic (export/quantize.py, vlmedge.calibration)
    calib: str | None = None  # image folder or "synthetic"; None: synthetic for the demo model
    calib_size: int | None = None  # calibration images (None: dataset.DEFAULT_CALIB_SIZE)
    calib_method: str = "minmax"  # minmax | entropy | percentile
    accuracy_target: float = 0.97  # min teacher-forced top-1 agreement with fp32
    min_cosine: float = 0.99  # min mean image-feature cosine with fp32
    max_accuracy_drop: float = 1.0  # demo model: max scene-accuracy drop, points
    calib_cache: str | None = None  # activation-range cache dir, "off", None: default
    progress: bool = False  # progress bars on stderr while collecting (the CLI sets it)


def flavours(o: ExportOptions) -> tuple[str, ...]:
    """The decoder flavours the export builds (--decoder-flavour, or the
    precision's default), the manifest's decoder.flavour first."""
    if o.decoder_flavour == "both":
        return ("portable", "ort")
    if o.decoder_flavour is not None:
        return (o.decoder_flavour,)
    p = precision_mod.PRECISIONS.get(o.precision)
    return (p.flavours[0] if p else "portable",)


def flavour(o: ExportOptions) -> str:
    """The flavour of the artifact's "decoder" component (decoder.flavour)."""
    return flavours(o)[0]


def weight_only(o: ExportOptions) -> bool:
    """Whether the quantization stage is weight-only (export/weight_only.py):
    int4 in either flavour, int4-fp16 (portable only), int8 in the ort
    flavour; portable int8 is static QDQ (export/quantize.py)."""
    return o.precision in INT4_PRECISIONS or (flavour(o) == "ort" and o.precision == "int8")


INT4_PRECISIONS = ("int4", "int4-fp16")


def block_size(o: ExportOptions) -> int:
    """The weight-only block size: --weight-block-size, else 128 for int4-fp16
    (one of TensorRT's two; the faster on onnxruntime too: README, weight
    blocks), else ort_decoder.BLOCK_SIZE (32, llama.cpp q4_0's)."""
    if o.weight_block_size is not None:
        return o.weight_block_size
    return 128 if o.precision == "int4-fp16" else ort_decoder.BLOCK_SIZE


def check_options(o: ExportOptions) -> None:
    if o.target not in TARGETS:
        raise UserInputError(f"unknown --target {o.target!r}", expected=" | ".join(TARGETS))
    if o.precision not in PRECISIONS:
        raise UserInputError(f"unknown --precision {o.precision!r}", expected=" | ".join(PRECISIONS))
    if o.decoder_flavour is not None and o.decoder_flavour not in FLAVOURS:
        raise UserInputError(f"unknown --decoder-flavour {o.decoder_flavour!r}",
                             expected=" | ".join(FLAVOURS))
    p = precision_mod.get(o.precision)
    if o.target == "trt" and not p.trt:
        raise UserInputError(f"--target trt takes --precision fp16, int8 or int4-fp16, not "
                             f"{o.precision}",
                             hint="int4-fp16 is int4 weights with fp16 activations; fp32 and "
                                  "int4 belong on the CPU, and TensorRT cannot use "
                                  "int8-dynamic's MatMulInteger")
    if o.precision == "int4-fp16":
        _check_int4_fp16(o)
    if o.decoder_flavour == "both" and o.precision not in BOTH_PRECISIONS:
        raise UserInputError(f"--decoder-flavour both takes --precision "
                             f"{' | '.join(BOTH_PRECISIONS)}", got=f"--precision {o.precision}",
                             hint="int4-fp16 is the portable flavour's (TensorRT)"
                             if o.precision == "int4-fp16" else
                             "int8 is static QDQ in the portable flavour but weight-only "
                             "in the ort one: export each flavour on its own")
    if o.vision_precision not in ("fp32", "int8"):
        raise UserInputError(f"unknown --vision-precision {o.vision_precision!r}",
                             expected="fp32 | int8")
    if o.vision_precision != "fp32" and not weight_only(o):
        raise UserInputError("--vision-precision applies to weight-only exports (int4, or the "
                             "ort flavour's int8)", got=f"--precision {o.precision}, "
                             f"--decoder-flavour {o.decoder_flavour or flavour(o)}",
                             hint="--precision int8 (portable) quantizes the vision graph too")
    if o.weight_method not in ("rtn", "gptq"):
        raise UserInputError(f"unknown --weight-method {o.weight_method!r}", expected="rtn | gptq")
    if o.weight_method != "rtn" and not (flavours(o) == ("ort",) and o.precision != "fp32"):
        raise UserInputError("--weight-method gptq applies to the ort flavour's int8/int4 "
                             "exports", got=f"--precision {o.precision}, --decoder-flavour "
                             f"{o.decoder_flavour or flavour(o)}", hint="the portable flavour's "
                             "int4 (and so --decoder-flavour both's) is round to nearest "
                             "(--weight-method rtn)")
    if block_size(o) not in ort_decoder.BLOCK_SIZES:  # (True == 1: not in it)
        raise UserInputError("--weight-block-size must be a power of two from 16 to 256",
                             expected=" | ".join(map(str, ort_decoder.BLOCK_SIZES)),
                             got=repr(o.weight_block_size)[:40])
    if o.weight_block_size not in (None, ort_decoder.BLOCK_SIZE) and not weight_only(o):
        raise UserInputError("--weight-block-size applies to weight-only exports (int4, or "
                             "the ort flavour's int8)", got=f"--precision {o.precision}, "
                             f"--decoder-flavour {o.decoder_flavour or flavour(o)}",
                             hint="leave it out for this precision")
    if "ort" in flavours(o) and o.target == "trt":
        raise UserInputError("--target trt needs --decoder-flavour portable",
                             got=f"--decoder-flavour {o.decoder_flavour or 'ort'}",
                             hint="the ort flavour uses onnxruntime contrib ops TensorRT lacks")
    missing = [f for f in flavours(o) if f not in p.flavours]
    if missing:
        takes = [n for n, q in precision_mod.PRECISIONS.items() if missing[0] in q.flavours]
        raise UserInputError(
            f"--decoder-flavour {missing[0]} takes --precision {' | '.join(takes)}",
            got=f"--precision {o.precision}",
            hint="fp16, int8-dynamic and int4-fp16 are portable-flavour precisions")
    for name, v in (("--max-batch", o.max_batch), ("--max-images", o.max_images)):
        if v < 1:
            raise UserInputError(f"{name} must be >= 1", got=str(v))
    from . import quantize
    quantize.check(o)  # --calib* options, INT8 targets
    if o.max_context is not None and o.max_context < 2:
        raise UserInputError("--max-context must be >= 2", got=str(o.max_context))
    if o.max_image_tokens is not None and o.max_image_tokens < 1:
        raise UserInputError("--max-image-tokens must be >= 1", got=str(o.max_image_tokens))


def _check_int4_fp16(o: ExportOptions) -> None:
    """int4-fp16 is TensorRT's W4A16: its target, block sizes and vision graph."""
    from .trt.ops_table import INT4_BLOCK_SIZES

    if o.target != "trt":
        raise UserInputError("--precision int4-fp16 is for --target trt", got=f"--target "
                             f"{o.target}", hint="for onnxruntime use --precision int4 (its "
                             "fp32-activation graphs are the ones onnxruntime's kernels fuse)")
    if block_size(o) not in INT4_BLOCK_SIZES:
        raise UserInputError("--precision int4-fp16 takes --weight-block-size 64 or 128",
                             got=f"--weight-block-size {o.weight_block_size}"[:60],
                             hint="TensorRT's INT4 weights come in blocks of 64 or 128; "
                                  "leave the option out for 128")
    if o.vision_precision != "fp32":
        raise UserInputError("--precision int4-fp16 keeps the vision graph at fp16",
                             got=f"--vision-precision {o.vision_precision}",
                             hint="leave --vision-precision out (int8 vision is "
                                  "--precision int8's)")


def _tokenizer_facts(loaded: loading.LoadedModel, out: Path) -> dict[str, Any]:
    proc = loaded.processor
    tok = proc.tokenizer
    backend = getattr(tok, "backend_tokenizer", None) or getattr(tok, "_tokenizer", None)
    if backend is None:
        raise UserInputError("only fast (tokenizers-library) tokenizers can be exported",
                             got=type(tok).__name__)
    backend.save(str(out / "tokenizer.json"))
    template = getattr(proc, "chat_template", None) or getattr(tok, "chat_template", None)
    if not template:
        raise UserInputError("the model has no chat template",
                             hint="add chat_template to its processor or tokenizer config")
    gen = getattr(loaded.model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    if eos is None:
        eos = tok.eos_token_id
    stop = sorted({int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])})
    return {"file": "tokenizer.json", "chat_template": template,
            "bos_token": tok.bos_token, "eos_token": tok.eos_token, "pad_token": tok.pad_token,
            "stop_token_ids": stop}


def _add_special_tokens(loaded, m: dict, out: Path) -> bool:
    """Whether the runtime must add special tokens to match the processor's ids
    (`m`: the manifest being built; its tokenizer file is already in `out`)."""
    import dataclasses

    from vlmedge.runtime.chat import ChatTokenizer

    fam = loaded.family
    image = fam.sample_image()
    ref = fam.hf_inputs(loaded.processor, image, "describe the image.")
    ref_ids = ref["input_ids"][0].tolist()
    grid = fam.image_grid(loaded.processor, image, ref)
    typed = manifest.Manifest.from_dict(m, where="the manifest being built")
    for add in (False, True):
        facts = dataclasses.replace(typed.tokenizer, add_special_tokens=add)
        chat = ChatTokenizer(out, facts, typed.image, typed.files)
        if chat.prompt_ids("describe the image.", image_grid=grid) == ref_ids:
            return add
    return False  # validation will report prompt_ids_match = false


def component_io(model_path: Path) -> dict[str, Any]:
    """A graph's inputs and outputs as the manifest's components record them."""
    import onnx

    m = onnx.load(str(model_path), load_external_data=False)
    elem = {1: "float32", 10: "float16", 7: "int64", 6: "int32", 9: "bool", 3: "int8", 2: "uint8"}

    def spec(v):
        t = v.type.tensor_type
        return {"name": v.name, "dtype": elem.get(t.elem_type, str(t.elem_type)),
                "shape": [d.dim_param or d.dim_value for d in t.shape.dim]}

    return {"inputs": [spec(v) for v in m.graph.input], "outputs": [spec(v) for v in m.graph.output]}


def convert_fp16(path: Path) -> None:
    """fp32 ONNX -> fp16 in place (weights and activations; I/O fp16 too,
    ids/masks stay int64). Uses onnxruntime's converter."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    m = onnx.load(str(path))
    m16 = convert_float_to_float16(m, keep_io_types=False, disable_shape_infer=True)
    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)
    onnx.save_model(m16, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=1024)


@dataclass
class Run:
    """What the stages of one export share (each stage reads and fills it)."""
    o: ExportOptions
    log: Callable[[str], None]
    stage: Callable  # timed_stage bound to this run's log and times
    loaded: Any = None  # loading.LoadedModel
    calib_data: Any = None  # CalibrationSet, or None
    context: int = 0
    staged: Any = None  # artifact.Staged
    graphs: dict = field(default_factory=dict)  # {"vision"|"embed"|"decoder": GraphSpec | None}
    m: dict = field(default_factory=dict)  # the manifest being built
    vision_fusion_proven: bool = False  # the fused vision graph agreed on the fp32 weights

    @property
    def tmp(self) -> Path:
        return self.staged.path


def plan(o: ExportOptions) -> list[tuple[str, Callable[[Run], None]]]:
    """The export's stages in order, as (name, function): what runs is decided
    here, from the options and the typed precision, and nowhere else. Stages
    that time sub-steps of their own (the quantization stages) log those."""
    p = precision_mod.get(o.precision)
    native = flavour(o) == "ort"
    both = flavours(o) == ("portable", "ort")
    steps = [("vision", _export_vision)]
    if flavours(o) == ("ort",):  # onnxruntime only: its fused attention (no TensorRT)
        steps.append(("vision-fusion", _fuse_vision))
    if both and p.io_dtype == "float32":  # the ort decoder's own vision graph, beside
        steps.append(("vision-fusion", _fuse_vision_beside))
    steps += [("embedding", _export_embed),
              ("decoder-ort" if native else "decoder", _export_decoder)]
    if both:  # the second decoder: component decoder_ort
        steps.append(("decoder-ort", _export_ort_beside))
    if p.io_dtype == "float16" and not p.calibrated:  # int4-fp16: in its quantization stage
        steps.append(("fp16", _to_fp16))
    steps.append(("write", _write_manifest))
    if p.calibrated:  # fp32 parity first, then the quantization stage and its gate
        steps.append((f"{o.precision} (weight-only)" if weight_only(o) else o.precision,
                      _quantize))
    if "ort" in flavours(o) and _vision_quantized(o):  # the ort graph on its int8 weights
        steps.append(("vision-fusion (quantized)", _fuse_vision_after_quantize))
    if "ort" in flavours(o):  # on the final weights: the MLPs in pieces of the sequence
        steps.append(("vision-pieces", _cut_vision_mlps))
    if o.target == "trt":
        steps.append(("trt", _prepare_trt))
    if o.validate and p.parity is not None:
        steps.append(("validate", _validate_stage))
    return steps


def run_export(o: ExportOptions, log: Callable[[str], None]) -> dict[str, Any]:
    check_options(o)
    artifact.check_output(o.output, o.force)
    times: dict[str, float] = {}

    def stage(name):
        return timed_stage(name, log, times)

    r = Run(o, log, stage)
    steps = plan(o)
    from . import quantize
    if precision_mod.get(o.precision).calibrated and not _ungated(o):
        r.calib_data = quantize.calibration_data(o, log)  # bad data fails before the export
    log("[plan] load, " + ", ".join(name for name, _ in steps))
    with stage("load"):
        r.loaded = loading.load(o.model_dir, o.random_weights, o.trust_remote_code,
                                o.allow_pickle, log=log, pan_and_scan=o.pan_and_scan)
    fam, model = r.loaded.family, r.loaded.model
    if "ort" in flavours(o):  # before the slow export: a model the builder cannot take fails now
        from . import ort_decoder
        ort_decoder.check(r.loaded)
    limit = fam.max_context(model)
    r.context = min(o.max_context or limit, limit)
    if o.max_context and o.max_context > limit:
        log(f"[load] note: --max-context {o.max_context} is more than the model's limit (its "
            f"position limit or sliding window); the artifact serves {limit} tokens")
    with artifact.staging(o.output, o.force, o.keep_failed) as staged:
        r.staged = staged
        for name, fn in steps:
            if fn in _SELF_TIMED:
                fn(r)
            else:
                with stage(name):
                    fn(r)
        summary = _summary(o, o.output, r.m, times)
        summary["stages"] = ["load"] + [name for name, _ in steps]
        if r.m.get("quantization"):
            summary["quantization"] = quantize.summary(r.m)
        # the manifest is written last, by staging, then the directory is renamed into place
    if o.target == "trt":  # the artifact is in place: build engines where TensorRT imports
        from .trt import prepare
        summary["trt"] = {"check_passed": r.m["trt"]["compat"]["passed"],
                          **prepare.finish(o.output, log)}
    return summary


def _vision_quantized(o: ExportOptions) -> bool:
    """Whether the quantization stage rewrites the vision graph (and its
    weights file): static int8 quantizes every graph, weight-only precisions
    the vision graph only with --vision-precision int8."""
    return precision_mod.get(o.precision).calibrated and (
        not weight_only(o) or o.vision_precision == "int8")


def _ungated(o: ExportOptions) -> bool:
    """Round-to-nearest weight-only exports (int8/int4/int4-fp16, either
    flavour): calibration data serves only the accuracy gate, which random
    weights cannot pass or fail meaningfully (int8 vision still needs data for
    its activation ranges, GPTQ for its Hessians)."""
    return weight_only(o) and o.random_weights and o.vision_precision == "fp32" \
        and o.weight_method == "rtn"


# -- the stages ----------------------------------------------------------------------

def _export_vision(r: Run) -> None:
    fam, model = r.loaded.family, r.loaded.model
    r.graphs["vision"] = fam.vision_graph(model, r.loaded.processor)
    export_graph(r.graphs["vision"], r.tmp / "vision.onnx")


def _fuse_vision(r: Run) -> None:
    """An ort-flavour artifact runs on onnxruntime only: its vision graph takes
    onnxruntime's fused attention and GELU where they match (export/vision_fusion.py)."""
    from . import vision_fusion
    vision_fusion.fuse(r.tmp / "vision.onnx", r.log)


ORT_VISION_FILE = f"{manifest.ORT_VISION}.onnx"


def _fuse_vision_beside(r: Run) -> None:
    """Both decoder flavours: "vision" keeps the standard ops (TensorRT, any
    provider) and the ort flavour gets the fused graph as component vision_ort,
    reading vision.onnx.data (export/vision_fusion.py; none where nothing
    matches). Proven here on the fp32 weights; where the quantization stage
    rewrites vision.onnx.data the graph is made again after it."""
    from . import vision_fusion
    made = vision_fusion.fuse(r.tmp / "vision.onnx", r.log, beside=ORT_VISION_FILE)
    r.vision_fusion_proven = made
    if made and _vision_quantized(r.o):
        (r.tmp / ORT_VISION_FILE).unlink()
        r.log(f"[vision-fusion] that was the proof on the fp32 weights: {ORT_VISION_FILE} "
              f"is made again after quantization, on the final ones")


def _fuse_vision_after_quantize(r: Run) -> None:
    """The ort decoder's vision graph on the int8 vision weights
    (export/vision_fusion.py, quantized): each biased int8 projection as one
    MatMulIntegerToFloat. An ort-only artifact's graph was fused before
    quantization and takes that rewrite in place (held within 1e-3 relative
    of the QDQ graph's features). With both flavours the whole fused graph is
    made again beside the standard one (a QDQ graph's attention cores are
    fp32, the same pattern), held to the int8 gate's cosine: the attention and
    GELU rewrites were proven exact on this model's fp32 graph before
    quantization."""
    from . import vision_fusion
    if flavours(r.o) == ("ort",):
        if vision_fusion.fuse(r.tmp / "vision.onnx", r.log, quantized=True):
            for name in ("vision.onnx", "vision.onnx.data"):
                r.m["files"][name] = manifest.file_entry(r.tmp / name)
        return
    if not r.vision_fusion_proven:
        r.log("[vision-fusion] none: the fp32 graph took no fused op")
        return
    if vision_fusion.fuse(r.tmp / "vision.onnx", r.log, beside=ORT_VISION_FILE,
                          quantized=True):
        r.m["files"][ORT_VISION_FILE] = manifest.file_entry(r.tmp / ORT_VISION_FILE)
        r.m["components"][manifest.ORT_VISION] = {**r.m["components"]["vision"],
                                                  "file": ORT_VISION_FILE}


def _cut_vision_mlps(r: Run) -> None:
    """The ort flavour's vision graph (vision.onnx of an ort-only artifact,
    else vision_ort.onnx where one was made) runs its MLPs in pieces of the
    patch sequence: the same features with less of the tower's activations in
    memory at once (export/vision_chunks.py)."""
    from . import vision_chunks
    name = "vision.onnx" if flavours(r.o) == ("ort",) else ORT_VISION_FILE
    if not (r.tmp / name).exists():
        r.log(f"[vision-pieces] none: no {name}")
        return
    if vision_chunks.chunk_mlps(r.tmp / name, r.log, quantized=_vision_quantized(r.o)):
        r.m["files"][name] = manifest.file_entry(r.tmp / name)


def _export_embed(r: Run) -> None:
    r.graphs["embed"] = r.loaded.family.embed_graph(r.loaded.model)
    export_graph(r.graphs["embed"], r.tmp / "embed.onnx")


def _export_decoder(r: Run) -> None:
    if flavour(r.o) == "ort":  # fp32 first: parity with PyTorch is proved on it
        from . import ort_decoder
        r.graphs["decoder"] = None
        ort_decoder.build(r.loaded, r.tmp, "fp32", r.log)
    else:
        r.graphs["decoder"] = r.loaded.family.decoder_graph(r.loaded.model)
        export_graph(r.graphs["decoder"], r.tmp / "decoder.onnx")


def _export_ort_beside(r: Run) -> None:
    """The ort flavour's fp32 decoder as decoder_ort.onnx, beside the portable
    decoder.onnx (--decoder-flavour both)."""
    from . import ort_decoder
    r.graphs[manifest.ORT_DECODER] = None
    ort_decoder.build(r.loaded, r.tmp, "fp32", r.log, name=manifest.ORT_DECODER)


def _to_fp16(r: Run) -> None:
    for key in r.graphs:
        convert_fp16(r.tmp / f"{key}.onnx")


def _write_manifest(r: Run) -> None:
    o = r.o
    m = _manifest(o, r.loaded, r.tmp, r.graphs, r.context)
    m["decoder"]["flavour"] = flavour(o)
    if (r.tmp / ORT_VISION_FILE).exists():  # fused beside vision.onnx (both flavours)
        m["components"][manifest.ORT_VISION] = {**m["components"]["vision"],
                                                "file": ORT_VISION_FILE}
    if o.max_image_tokens is not None:
        _check_image_budget(m, o.max_image_tokens)
        m["image"]["max_image_tokens"] = o.max_image_tokens
    m["tokenizer"]["add_special_tokens"] = _add_special_tokens(r.loaded, m, r.tmp)
    r.m = r.staged.manifest = m  # written last by staging; kept with --keep-failed


def _quantize(r: Run) -> None:
    """fp32 parity, then INT8 (export/quantize.py) or weight-only int4 / the
    ort flavour's int8 (export/weight_only.py), each with its gate."""
    if weight_only(r.o):
        from . import weight_only as stage_module
    else:
        from . import quantize as stage_module
    r.m = r.staged.manifest = stage_module.quantize(r.o, r.loaded, r.tmp, r.m, r.calib_data,
                                                    _validate, r.stage, r.log, r.staged)


def _prepare_trt(r: Run) -> None:
    """Profiles, the static check and build_engines.sh (export/trt/prepare.py)."""
    from .trt import prepare, profiles
    limits = profiles.Limits(r.context, r.o.max_batch, r.o.max_images)
    r.m["trt"] = prepare.prepare(r.tmp, r.m, limits, __version__, r.log, r.o.output)


def _validate_stage(r: Run) -> None:
    r.m["validation"] = _validate(r.loaded, r.tmp, r.o.precision, r.m)
    if not r.m["validation"].get("passed", True):
        raise ValidationError(
            "exported model does not match PyTorch: " + _figures(r.m["validation"]),
            hint="see the per-prompt figures with --json; --keep-failed keeps the artifact")


_SELF_TIMED = (_quantize,)


def _check_image_budget(m: dict, budget: int) -> None:
    """--max-image-tokens must fit the family: at least one tile / the fixed
    image's tokens (the runtime applies it per image, runtime/image_budget.py)."""
    from vlmedge.runtime.image_budget import budget_tiling

    typed = manifest.Manifest.from_dict(m, where="the manifest being built")
    budget_tiling(typed.preprocess.get("tiling"), typed.image, (512, 512), budget)


def _manifest(o: ExportOptions, loaded, tmp: Path, graphs: dict, context: int) -> dict[str, Any]:
    """The manifest of the staged graphs (validation, quantization and trt
    sections are filled in by later stages)."""
    fam, model, proc = loaded.family, loaded.model, loaded.processor
    tok_facts = _tokenizer_facts(loaded, tmp)
    tok_facts["add_special_tokens"] = False  # decided against the processor next
    files = {p.name: manifest.file_entry(p) for p in sorted(tmp.iterdir())}
    return {
        "schema_version": manifest.SCHEMA_VERSION,
        "vlmedge_version": __version__,
        "family": fam.name,
        "target": o.target,
        "precision": o.precision,
        "source": {"path": str(o.model_dir), "architecture": type(model).__name__,
                   "content_hash": loaded.content_hash,
                   "random_weights": loaded.random_weights},
        "files": files,
        "components": {k: {"file": f"{k}.onnx",
                           "data_file": f"{k}.onnx.data" if f"{k}.onnx.data" in files else None,
                           "precision": o.precision, **component_io(tmp / f"{k}.onnx")}
                       for k in graphs},
        "decoder": fam.decoder_facts(model, context),
        "image": fam.image_facts(model, proc),
        "preprocess": fam.preprocess_config(proc),
        "tokenizer": tok_facts,
        "quantization": None,
        "validation": None,
        "trt": None,
    }


def _validate(loaded, tmp: Path, precision: str, m: dict) -> dict[str, Any]:
    """Parity with PyTorch of the staged artifact, opened with the manifest `m`
    in memory (the staging directory holds no manifest.json yet)."""
    from . import validate

    if precision == "fp16":
        import onnxruntime as ort

        try:
            ort.InferenceSession(str(tmp / "decoder.onnx"), providers=["CPUExecutionProvider"])
            return validate.validate(loaded.family, loaded.model, loaded.processor, tmp, precision,
                                     manifest=m)
        except onnxruntime_errors() as e:
            if not missing_fp16_kernel(e):  # a fault of the graphs, not onnxruntime's limit
                raise
            return {"skipped": True, "passed": True, "tokens_match": None,
                    "max_abs_diff_logits": None, "max_abs_diff_image_features": None,
                    "reason": f"onnxruntime CPU cannot run the fp16 graphs "
                              f"({str(e).splitlines()[0][:160]}); validate on the GPU against the "
                              f"fp32 export: python -m vlmedge.benchmarks.trt_parity ARTIFACT "
                              f"FP32_ARTIFACT --provider cuda (or trt)"}
    typed = manifest.Manifest.from_dict(m, where="the manifest being built")
    return validate.combine([
        validate.validate(loaded.family, loaded.model, loaded.processor, tmp, precision,
                          manifest=m, decoder_flavour=f) for f in typed.decoder_flavours])


def missing_fp16_kernel(e: Exception) -> bool:
    """Whether `e` (one of onnxruntime_errors()) says onnxruntime's CPU
    provider has no kernel for an fp16 node: its limit, where fp16 graphs are
    not validated there. Anything else is a fault of the graphs."""
    text = str(e)
    return "NOT_IMPLEMENTED" in text or "Could not find an implementation" in text


def onnxruntime_errors() -> tuple[type, ...]:
    """What running fp16 graphs on onnxruntime's CPU provider may raise: the
    graphs may not load (onnxruntime's own exceptions) or fail to run (the
    runtime's ArtifactError); missing_fp16_kernel() tells which are its limit."""
    import onnxruntime as ort
    from vlmedge.errors import ArtifactError

    return (ArtifactError,) + tuple(
        c for c in vars(ort.capi.onnxruntime_pybind11_state).values()
        if isinstance(c, type) and issubclass(c, Exception))


def _figures(v: dict) -> str:
    return (f"tokens_match={v.get('tokens_match')}, prompt_ids_match={v.get('prompt_ids_match')}, "
            f"max_abs_diff_logits={v.get('max_abs_diff_logits'):.3g} "
            f"(tol {v['tolerances']['logits']:g}), max_abs_diff_image_features="
            f"{v.get('max_abs_diff_image_features'):.3g} (bound "
            f"{v.get('image_features_bound', v['tolerances']['image_features']):.3g}: "
            f"{_bound_rule(v)}), "
            f"cached_vs_recompute={v.get('cached_vs_recompute_max_abs_diff'):.3g}")


def _bound_rule(v: dict) -> str:
    """How the image-feature bound of validation record `v` was set, in words."""
    from .validate import FP16_STEPS

    tol, scale = v["tolerances"]["image_features"], v.get("image_features_scale", 1.0)
    if v.get("precision", "fp32") == "fp32":
        return f"tol {tol:g} x max(1, largest feature {scale:.3g})"
    return f"tol {tol:g} + {FP16_STEPS} fp16 steps at the largest feature {scale:.3g}"


def _summary(o: ExportOptions, out: Path, m: dict, times: dict) -> dict[str, Any]:
    v = m.get("validation") or {}
    return {
        "output": str(out),
        "family": m["family"],
        "target": m["target"],
        "precision": m["precision"],
        "decoder_flavour": m["decoder"].get("flavour", "portable"),
        "decoder_flavours": [m["decoder"].get("flavour", "portable")] + (
            ["ort"] if manifest.ORT_DECODER in m["components"] else []),
        "random_weights": m["source"]["random_weights"],
        "files": {name: e["bytes"] for name, e in m["files"].items()},
        "total_bytes": sum(e["bytes"] for e in m["files"].values()),
        "validation": {k: v.get(k) for k in ("passed", "skipped", "reason", "tokens_match",
                                             "prompt_ids_match", "max_abs_diff_logits",
                                             "max_abs_diff_image_features",
                                             "image_features_scale", "image_features_bound",
                                             "tolerances",
                                             "cached_vs_recompute_max_abs_diff") if k in v}
        if v else None,
        "stage_seconds": times,
    }
