"""llama.cpp's model of a VLM's language model, for vlm-bench's llama.cpp peer
(peer.py): the weights written as a GGUF file (the `gguf` package), then
quantized by llama.cpp itself (llama_model_quantize: q8_0, q4_0, with its
default choices, e.g. a higher-precision output tensor).

Written here rather than with llama.cpp's convert_hf_to_gguf.py, which ships
with llama.cpp's sources, not with the llama-cpp-python wheel. Only what a
decode needs is written: the "llama" architecture's hyperparameters and
tensors, and no tokenizer ("no_vocab" with the vocabulary's size): the peer
feeds token ids.

The one transform: llama.cpp's rotary takes the two halves of each head's
query and key rotated as interleaved pairs, so Q and K rows are reordered per
head, (heads, 2, d/2) -> (heads, d/2, 2), as its converter does; everything
else is the Hugging Face weights as they are.
"""
from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

import numpy as np

from vlmedge.errors import UnsupportedArchitectureError, UserInputError
from vlmedge.lazy import require

# our precision -> llama.cpp's file type of the same bit width (llama.h's
# LLAMA_FTYPE_*): 8-bit q8_0 and 4-bit q4_0, blocks of 32, one scale each
FTYPES = {"fp32": ("f32", 0), "int8": ("q8_0", 7), "int4": ("q4_0", 2)}
ARCHITECTURES = ("llama", "mistral")  # the text models written as llama.cpp's "llama"


def _rotary_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """(heads * d, in) -> the same rows, each head's halves interleaved."""
    d = w.shape[0] // heads
    return w.reshape(heads, 2, d // 2, -1).swapaxes(1, 2).reshape(w.shape)


def _tensor_names(layers: int) -> dict[str, str]:
    """Hugging Face language-model weight -> llama.cpp tensor, per layer."""
    pairs = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    return {f"blk.{i}.{g}.weight": f"layers.{i}.{h}.weight"
            for i in range(layers) for h, g in pairs.items()}


def _rope_theta(tc) -> float:
    theta = getattr(tc, "rope_theta", None)
    params = getattr(tc, "rope_parameters", None) or {}
    return float(theta or params.get("rope_theta") or 10000.0)


def write_f32(loaded, path: Path) -> None:
    """The language model and LM head of `loaded` (export/loading.py) as an f32 GGUF."""
    gguf = require("gguf", "the llama.cpp peer (pip install gguf)")
    fam, model = loaded.family, loaded.model
    tc = fam.text_config(model.config)
    if tc.model_type not in ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"the llama.cpp peer takes {' | '.join(ARCHITECTURES)} language models",
            got=tc.model_type, hint="leave out --peer llama.cpp")
    if getattr(tc, "rope_scaling", None) and tc.rope_scaling.get("rope_type", "default") \
            not in ("default", "dynamic"):
        raise UnsupportedArchitectureError("the llama.cpp peer takes plain rotary positions",
                                           got=str(tc.rope_scaling))
    heads, kv_heads = tc.num_attention_heads, tc.num_key_value_heads
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // heads
    state = {k: v.detach().float().numpy() for k, v in
             fam.language_model(model).state_dict().items()}
    head = fam.lm_head(model).weight.detach().float().numpy()
    embed = state["embed_tokens.weight"]
    names = _tensor_names(tc.num_hidden_layers)
    left = set(state) - set(names.values()) - {"embed_tokens.weight", "norm.weight"}
    left = {k for k in left if "rotary_emb" not in k}  # recomputed from the config
    if left:  # biases (attention_bias, mlp_bias) and the like: llama.cpp's llama has none
        raise UnsupportedArchitectureError(
            "the llama.cpp peer writes a plain llama language model",
            got=f"weights it has no place for: {sorted(left)[:3]}",
            hint="leave out --peer llama.cpp")

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(tc.max_position_embeddings)
    w.add_embedding_length(tc.hidden_size)
    w.add_block_count(tc.num_hidden_layers)
    w.add_feed_forward_length(tc.intermediate_size)
    w.add_rope_dimension_count(head_dim)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(tc.rms_norm_eps)
    w.add_rope_freq_base(_rope_theta(tc))
    w.add_vocab_size(embed.shape[0])
    w.add_file_type(0)  # all f32
    w.add_tokenizer_model("no_vocab")

    w.add_tensor("token_embd.weight", embed)
    rotary = {"attn_q": heads, "attn_k": kv_heads}  # rows reordered per head
    for ours, theirs in names.items():
        kind = ours.split(".")[2]
        value = state[theirs]
        w.add_tensor(ours, _rotary_rows(value, rotary[kind]) if kind in rotary else value)
    w.add_tensor("output_norm.weight", state["norm.weight"])
    if not np.shares_memory(head, embed) and not np.array_equal(head, embed):
        w.add_tensor("output.weight", head)  # tied embeddings: llama.cpp reuses token_embd
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def quiet_llama(lib) -> None:
    """Initialises llama.cpp with only its errors reaching stderr (it logs every
    load and every quantized tensor, and prints progress dots)."""
    lib.llama_backend_init()

    @ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
    def log(level, text, data):
        if level == 4 and text:  # GGML_LOG_LEVEL_ERROR
            sys.stderr.write(text.decode(errors="replace"))

    quiet_llama.keep = log  # the callback must outlive this call
    lib.llama_log_set(log, ctypes.c_void_p())


def quantize(f32: Path, out: Path, precision: str, threads: int = 0) -> None:
    """llama.cpp's own quantizer: `f32` GGUF -> `out` at the file type of `precision`."""
    if precision not in FTYPES:
        raise UserInputError("the llama.cpp peer takes", expected=" | ".join(FTYPES),
                             got=precision)
    llama_cpp = require("llama_cpp", "the llama.cpp peer (pip install llama-cpp-python)")
    quiet_llama(llama_cpp)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[precision][1]
    params.nthread = threads or (os.cpu_count() or 1)
    code = llama_cpp.llama_model_quantize(str(f32).encode(), str(out).encode(),
                                          ctypes.byref(params))
    if code != 0:
        raise UserInputError(f"llama.cpp could not quantize the peer to "
                             f"{FTYPES[precision][0]}", got=f"status {code}")
