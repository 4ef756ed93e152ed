"""export/families/attention.py: the decoder's grouped-query attention for export."""
from __future__ import annotations

import onnx
import pytest

torch = pytest.importorskip("torch")


def _llama_attention(heads=6, kv=2, head_dim=8):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaAttention

    cfg = LlamaConfig(hidden_size=heads * head_dim, num_attention_heads=heads,
                      num_key_value_heads=kv, head_dim=head_dim)
    return LlamaAttention(cfg, layer_idx=0).eval()


@pytest.mark.parametrize("q_len", [1, 5])
def test_grouped_attention_equals_hf_eager(q_len):
    """Same outputs as transformers' eager attention (repeat_kv), with a padded,
    causal additive mask, for a decode step and a prefill."""
    from transformers.models.llama.modeling_llama import eager_attention_forward

    from vlmedge.export.families.attention import grouped_attention_forward

    torch.manual_seed(0)
    attn = _llama_attention()
    b, past = 2, 7
    s = past + q_len
    q = torch.randn(b, 6, q_len, 8)
    k, v = torch.randn(b, 2, s, 8), torch.randn(b, 2, s, 8)
    mask = torch.zeros(b, 1, q_len, s)
    mask[:, :, :, s - q_len:] = torch.triu(torch.full((q_len, q_len), -1e9), diagonal=1)
    mask[1, :, :, :3] = -1e9  # left padding of the second sequence
    want, _ = eager_attention_forward(attn, q, k, v, mask, scaling=attn.scaling)
    got, _ = grouped_attention_forward(attn, q, k, v, mask, scaling=attn.scaling)
    assert got.shape == want.shape == (b, q_len, 6, 8)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_a_wrong_head_order_would_be_caught():
    """Guard on the test above: swapping which KV head a query head reads
    (h % KV instead of h // (H/KV)) changes the output."""
    from transformers.models.llama.modeling_llama import eager_attention_forward

    from vlmedge.export.families.attention import grouped_attention_forward

    torch.manual_seed(1)
    attn = _llama_attention()
    q, k, v = torch.randn(1, 6, 1, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8)
    want, _ = eager_attention_forward(attn, q, k, v, None, scaling=attn.scaling)
    shuffled = q.reshape(1, 3, 2, 1, 8).transpose(1, 2).reshape(1, 6, 1, 8)
    got, _ = grouped_attention_forward(attn, shuffled, k, v, None, scaling=attn.scaling)
    assert not torch.allclose(got, want, atol=1e-3)


def test_the_config_keeps_its_own_attention_after_tracing(tiny_llava_dir):
    """Only the traced graph uses the grouped form: the PyTorch model that
    export validates against keeps its implementation."""
    from transformers import LlavaForConditionalGeneration

    from vlmedge.export.families.attention import NAME, grouped_attention

    model = LlavaForConditionalGeneration.from_pretrained(tiny_llava_dir)
    tc = model.config.text_config
    before = tc._attn_implementation
    with grouped_attention(tc):
        assert tc._attn_implementation == NAME
    assert tc._attn_implementation == before != NAME


def test_sliding_window_decoders_keep_hf_attention():
    from transformers import Qwen2Config

    from vlmedge.export.families.attention import applies_to

    assert applies_to(Qwen2Config(num_attention_heads=4, num_key_value_heads=2,
                                  use_sliding_window=False))
    assert not applies_to(Qwen2Config(num_attention_heads=4, num_key_value_heads=2,
                                      use_sliding_window=True))


def test_exported_decoder_does_not_repeat_the_cache(tiny_llava_artifact):
    """No Expand of a (unsqueezed) present key/value: repeat_kv's copy of the
    whole cache per layer per step is gone from the graph."""
    art, _ = tiny_llava_artifact
    g = onnx.load(art / "decoder.onnx", load_external_data=False).graph
    present = {o.name for o in g.output if o.name.startswith("present.")}
    producers = {out: n for n in g.node for out in n.output}
    for n in g.node:
        if n.op_type != "Expand":
            continue
        src = producers.get(n.input[0])
        while src is not None and src.op_type in ("Unsqueeze", "Reshape", "Identity"):
            if src.input[0] in present:
                break
            src = producers.get(src.input[0])
        assert src is None or src.input[0] not in present, f"{n.name} expands the KV cache"
    assert len(present) == 2  # tiny: 1 layer (a key and a value)
