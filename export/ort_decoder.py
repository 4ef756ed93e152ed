"""The onnxruntime-native decoder flavour ("ort"), built with onnxruntime-genai's
model builder (DESIGN.md, "The artifact directory"; runtime/decoders.py runs it).

The builder is what the field maintains for exactly this graph: per layer a
GroupQueryAttention with rotary inside (no position_ids input), the RMSNorm +
residual fusions, optionally MatMulNBits 4/8-bit block-quantized weights, and a
KV cache shared by past and present. It takes a Hugging Face *text* model, so
the VLM's language model and LM head are saved as a plain CausalLM checkpoint
(same weights, same config) in a scratch directory first. Options used:

    exclude_embeds=true   the graph takes inputs_embeds (the image features are
                          scattered into them by the runtime, as for the portable graph)
    prune_lm_head=true    logits of the last position only, (B, 1, V), as the
                          portable graph (a 1,000-token prefill skips 999 LM-head rows)
    filename=decoder.onnx the artifact's component file (+ decoder.onnx.data)

Weight-only precisions: "int8" / "int4" are the builder's MatMulNBits with
block size 32 (or --weight-block-size), symmetric, round-to-nearest;
onnxruntime's CPU kernels quantize the activations to int8 on the fly
(accuracy_level 4). `gptq` makes the same
format from the fp32 graph with onnxruntime's GPTQ, calibrated on the user's
images and prompts.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

from vlmedge.errors import UnsupportedArchitectureError, UserInputError
from vlmedge.lazy import require

# The text decoders the builder takes with inputs_embeds, by the text config's
# model_type -> the CausalLM architecture name it dispatches on.
TEXT_MODELS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
               "mistral": "MistralForCausalLM"}
BUILDER_PRECISIONS = {"fp32": "fp32", "int8": "int8", "int4": "int4"}
GQA_HEAD_MULTIPLE = 16  # onnxruntime's GroupQueryAttention kernels (CPU and CUDA)
# MatMulNBits block: 32 weights share one scale by default (llama.cpp q4_0's
# block); --weight-block-size takes these (onnxruntime's kernels' sizes).
BLOCK_SIZE = 32
BLOCK_SIZES = (16, 32, 64, 128, 256)


def check(loaded) -> None:
    """Refuse in one line a model whose decoder the ort flavour cannot take."""
    fam, model = loaded.family, loaded.model
    tc = fam.text_config(model.config)
    if fam.decoder_facts(model, 0)["position_ids"] != "1d":
        raise UnsupportedArchitectureError(
            f"--decoder-flavour ort does not take {fam.name} yet: its decoder uses mrope "
            "positions from the image grid, and the ort flavour computes 1-D rotary "
            "positions inside its attention", hint="use --decoder-flavour portable")
    if fam.attention_groups:
        raise UnsupportedArchitectureError(
            f"--decoder-flavour ort does not take {fam.name}: its image tokens attend to each "
            "other both ways, and the ort flavour's attention is causal only",
            expected="a decoder with causal attention only",
            got=f"attention groups ({fam.attention_groups})", hint="use --decoder-flavour portable")
    head = fam.decoder_facts(model, 0)["head_dim"]
    if head % GQA_HEAD_MULTIPLE:
        raise UnsupportedArchitectureError(
            f"--decoder-flavour ort cannot take head size {head}: onnxruntime's "
            f"GroupQueryAttention needs a multiple of {GQA_HEAD_MULTIPLE}",
            hint="use --decoder-flavour portable")
    if tc.model_type not in TEXT_MODELS:
        raise UnsupportedArchitectureError(
            f"--decoder-flavour ort does not take a {tc.model_type!r} language model",
            expected=f"one of {', '.join(sorted(TEXT_MODELS))}",
            hint="use --decoder-flavour portable")


def _plain_dynamic_rope(config) -> None:
    """Dynamic NTK rope (InternVL3's Qwen2.5, factor 2) as the default rope,
    which the builder takes (it refuses "dynamic"). Below
    max_position_embeddings the two are the same rope (inv_freq is only
    rescaled past it), and an artifact serves no more than that
    (Family.max_context); export/families/internvl.py traces the portable
    graph the same way, and validation holds either to the eager model."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    if not isinstance(params, dict) or "dynamic" not in str(params.get("rope_type") or
                                                            params.get("type")):
        return
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    plain = {"rope_type": "default", **({"rope_theta": theta} if theta is not None else {})}
    if hasattr(config, "rope_parameters"):
        config.rope_parameters = plain
    else:
        config.rope_scaling = None


def _save_text_model(loaded, out: Path) -> None:
    """The VLM's language model + LM head as a CausalLM checkpoint in `out`
    (config.json, safetensors, tokenizer): what the builder reads."""
    transformers = require("transformers", "building the ort decoder flavour")
    fam, model = loaded.family, loaded.model
    tc = fam.text_config(model.config)
    config = type(tc).from_dict(tc.to_dict())
    config.architectures = [TEXT_MODELS[tc.model_type]]
    _plain_dynamic_rope(config)
    lm = getattr(transformers, TEXT_MODELS[tc.model_type])(config)
    state = {f"model.{k}": v for k, v in fam.language_model(model).state_dict().items()}
    state["lm_head.weight"] = fam.lm_head(model).weight
    missing, unexpected = lm.load_state_dict(state, strict=False)
    # rotary inv_freq buffers are recomputed from the config, not weights
    missing = [k for k in missing if "rotary_emb" not in k]
    if missing or unexpected:
        raise UnsupportedArchitectureError(
            "the language model's weights do not map onto a plain CausalLM",
            expected="the same parameter names", got=f"missing {missing[:3]}, unexpected "
                                                     f"{unexpected[:3]}",
            hint="use --decoder-flavour portable")
    lm.save_pretrained(out)
    loaded.processor.tokenizer.save_pretrained(out)


def build(loaded, staging: Path, precision: str, log: Callable[[str], None],
          name: str = "decoder", block_size: int = BLOCK_SIZE) -> None:
    """Writes the ort-flavour `name`.onnx (+ .data) at `precision` into
    `staging`, replacing any graph of that name there (name "decoder_ort":
    the second decoder of --decoder-flavour both)."""
    if precision not in BUILDER_PRECISIONS:
        raise UserInputError(f"--decoder-flavour ort takes --precision "
                             f"{' | '.join(BUILDER_PRECISIONS)}", got=precision)
    require("onnxruntime_genai", "--decoder-flavour ort")
    with tempfile.TemporaryDirectory(prefix="vlmedge-ort-") as work:
        work = Path(work)
        opts = ["exclude_embeds=true", "prune_lm_head=true", "hf_token=false",
                f"filename={name}.onnx"]
        if precision in ("int4", "int8"):
            opts.append(f"block_size={block_size}")
        args = [None, str(work / "text"), str(work / "out"), BUILDER_PRECISIONS[precision],
                "cpu", str(work / "cache")]
        with quiet():
            _save_text_model(loaded, work / "text")
        _run_builder(args, opts)
        for file in (f"{name}.onnx", f"{name}.onnx.data"):
            dst = staging / file
            dst.unlink(missing_ok=True)
            src = work / "out" / file
            if src.exists():
                shutil.move(str(src), str(dst))
    log(f"[decoder-ort] onnxruntime-genai builder: {precision}, GroupQueryAttention, "
        f"{'MatMulNBits block ' + str(block_size) if precision != 'fp32' else 'fp32 MatMul'}")


def build_text_model(loaded, out: Path, precision: str, block_size: int = BLOCK_SIZE) -> None:
    """onnxruntime-genai's own model of the VLM's language model, as its
    builder makes it for a text model: input_ids in (the embedding table in
    the graph), genai_config.json and the tokenizer beside it, for
    onnxruntime-genai's generator to run (vlm-bench's peer). Same weights,
    precision and block as build(); `out` is written whole or not at all."""
    if precision not in BUILDER_PRECISIONS:
        raise UserInputError(f"onnxruntime-genai's builder takes "
                             f"{' | '.join(BUILDER_PRECISIONS)}", got=precision)
    require("onnxruntime_genai", "onnxruntime-genai's model")
    out = Path(out)
    with tempfile.TemporaryDirectory(prefix="vlmedge-genai-") as work:
        work = Path(work)
        opts = ["hf_token=false"] + ([f"block_size={block_size}"] if precision != "fp32" else [])
        with quiet():
            _save_text_model(loaded, work / "text")
        _run_builder([None, str(work / "text"), str(work / "out"), BUILDER_PRECISIONS[precision],
                      "cpu", str(work / "cache")], opts)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(work / "out"), str(out))


# The builder runs in a child process: it loads the language model again in
# PyTorch and quantizes it, and the memory it took stayed with the exporter
# (+0.6 GB per build on SmolVLM-256M, two builds in an int4 export). The
# child's ends with it.
_BUILDER = """
import json, sys
from onnxruntime_genai.models import builder
args, opts = json.loads(sys.argv[1])
builder.create_model(*args, **builder.parse_extra_options(*args, opts))
"""


def _run_builder(args: list, opts: list[str]) -> None:
    """onnxruntime-genai's create_model(args, opts) in a child process; its
    per-node prints are kept from the terminal and shown only if it fails."""
    env = {**os.environ, "TQDM_DISABLE": "1"}
    done = subprocess.run([sys.executable, "-c", _BUILDER, json.dumps([args, opts])],
                          capture_output=True, text=True, env=env)
    if done.returncode:
        lines = (done.stderr or done.stdout).strip().splitlines()
        raise UnsupportedArchitectureError(
            "onnxruntime-genai's model builder failed on this language model",
            got=(lines[-1] if lines else f"exit status {done.returncode}")[:300],
            hint="use --decoder-flavour portable")


# GPTQ loads the whole graph into one protobuf (onnxruntime's implementation runs it
# from bytes), and protobuf stops at 2 GiB.
GPTQ_MAX_BYTES = 2_000_000_000
GPTQ_MAX_SEQUENCES = 32  # calibration prompts fed to GPTQ (its Hessians converge fast)


def gptq(staging: Path, precision: str, feeds: list[dict], log: Callable[[str], None],
         block_size: int = BLOCK_SIZE) -> None:
    """Replaces the fp32 ort-flavour decoder.onnx in `staging` by its GPTQ
    block-quantized version (onnxruntime's MatMulNBitsQuantizer with its GPTQ
    config: per-block error-compensated rounding on the Hessian of each
    MatMul's inputs, collected by running `feeds`, the decoder's prefill inputs
    on the user's calibration images and prompts). Same MatMulNBits format,
    block and accuracy level as the builder's round-to-nearest."""
    onnx = require("onnx", "GPTQ weight quantization")
    q = require("onnxruntime.quantization.matmul_nbits_quantizer", "GPTQ weight quantization")
    from onnxruntime.quantization.calibrate import CalibrationDataReader

    src = staging / "decoder.onnx"
    size = sum(p.stat().st_size for p in (src, staging / "decoder.onnx.data") if p.exists())
    if size > GPTQ_MAX_BYTES:
        raise UserInputError("--weight-method gptq takes fp32 decoders under 2 GB",
                             got=f"{size / 1e9:.1f} GB",
                             hint="use --weight-method rtn (the default) for this model")

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(feeds[:GPTQ_MAX_SEQUENCES])

        def get_next(self):
            return next(self.it, None)

    config = q.GPTQWeightOnlyQuantConfig(calibration_data_reader=Reader(), block_size=block_size)
    with quiet():
        quantizer = q.MatMulNBitsQuantizer(onnx.load(str(src)), bits=int(precision[3:]),
                                           block_size=block_size, is_symmetric=True,
                                           accuracy_level=4, algo_config=config)
        quantizer.process()
    for name in ("decoder.onnx", "decoder.onnx.data"):
        (staging / name).unlink(missing_ok=True)
    onnx.save_model(quantizer.model.model, str(src), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="decoder.onnx.data",
                    size_threshold=1024)
    log(f"[decoder-ort] GPTQ {precision}: MatMulNBits block {block_size} on "
        f"{min(len(feeds), GPTQ_MAX_SEQUENCES)} calibration prompts")


@contextlib.contextmanager
def quiet(least: int = logging.WARNING):
    """The builder's prints and its quantizer's logging below `least`, swallowed."""
    quant_log = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = quant_log.level
    quant_log.setLevel(least)
    sink = io.StringIO()
    env = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"
    try:
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            yield
    finally:
        quant_log.setLevel(level)
        if env is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = env
