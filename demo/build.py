"""Builds the demo VLM's tokenizer, processor and config (no weights).

The demo model is a real `LlavaForConditionalGeneration`: a CLIP vision tower
(128x128 input, 32x32 patches -> 16 patch tokens, one per scene-grid cell,
after CLIP's class token, which is kept as a scene summary: 17 image tokens,
select strategy "full"), a 2-layer
GELU MLP projector and a Llama decoder with grouped-query attention. Its
vocabulary is the scene world's words, tokenized word by word.

Needs torch + transformers (the `export` extra); training uses it, the
runtime never does.
"""
from __future__ import annotations

import json
from pathlib import Path

from . import scenes

IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "<end>", "<user>", "<assistant>", IMAGE_TOKEN]

# One user turn, then the assistant's answer, each closed by <end>. Accepts
# content as a string or as a list of {"type": "image"|"text"} parts, as
# LlavaProcessor.apply_chat_template passes it.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '<user> ' }}{% else %}{{ '<assistant> ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<image> ' }}{% else %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ ' <end>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<assistant>' }}{% endif %}"
)

IMAGE_SIZE = scenes.IMAGE_SIZE
PATCH = 32
# CLIP's class token first (the scene summary the counts are read from), then
# the 16 patch tokens, one per scene-grid cell in row-major order.
NUM_CELLS = (IMAGE_SIZE // PATCH) ** 2
NUM_IMAGE_TOKENS = 1 + NUM_CELLS
SELECT_STRATEGY = "full"  # keep the class token (LLaVA's "default" drops it)

# Sizes of the demo model and of the tiny smoke-test variant.
SIZES = {
    "demo": dict(v_hidden=128, v_layers=4, v_heads=4, v_ffn=512,
                 t_hidden=192, t_layers=4, t_heads=6, t_kv=2, t_ffn=512),
    "tiny": dict(v_hidden=32, v_layers=1, v_heads=2, v_ffn=64,
                 t_hidden=32, t_layers=1, t_heads=4, t_kv=2, t_ffn=64),
}


def vocab() -> dict[str, int]:
    words = SPECIAL_TOKENS + scenes.vocabulary()
    return {w: i for i, w in enumerate(words)}


def make_tokenizer():
    """A word-level `PreTrainedTokenizerFast`: one id per scene-world word."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab(), unk_token="<unk>"))
    # Words, box coordinates ("0.21", one word each) and each punctuation mark apart.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Split(Regex(r"\d+\.\d+|\w+|[^\w\s]"), behavior="isolated")])
    # WordPiece's decoder joins with spaces and cleans " ," / " ?" back up
    # (a box answer reads "[ 0.21, 0.33, 0.35, 0.47 ]").
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tok.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="<end>", pad_token="<pad>",
        unk_token="<unk>", extra_special_tokens={"image_token": IMAGE_TOKEN},
        model_input_names=["input_ids", "attention_mask"],
    )


def make_processor():
    from transformers import CLIPImageProcessor, LlavaProcessor

    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_resize=True, do_center_crop=True, do_rescale=True, do_normalize=True,
        do_convert_rgb=True, resample=3,  # bicubic, as CLIP
    )
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=make_tokenizer(), patch_size=PATCH,
        vision_feature_select_strategy=SELECT_STRATEGY, chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN, num_additional_image_tokens=1,
    )


def make_config(size: str = "demo"):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    s = SIZES[size]
    v = vocab()
    vision = CLIPVisionConfig(
        hidden_size=s["v_hidden"], intermediate_size=s["v_ffn"], num_hidden_layers=s["v_layers"],
        num_attention_heads=s["v_heads"], image_size=IMAGE_SIZE, patch_size=PATCH,
        projection_dim=s["v_hidden"], hidden_act="quick_gelu",
    )
    text = LlamaConfig(
        vocab_size=len(v), hidden_size=s["t_hidden"], intermediate_size=s["t_ffn"],
        num_hidden_layers=s["t_layers"], num_attention_heads=s["t_heads"],
        num_key_value_heads=s["t_kv"], max_position_embeddings=256, rms_norm_eps=1e-5,
        rope_theta=10000.0, bos_token_id=v["<s>"], eos_token_id=v["<end>"],
        pad_token_id=v["<pad>"], tie_word_embeddings=True,
    )
    return LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=v[IMAGE_TOKEN],
        projector_hidden_act="gelu", vision_feature_select_strategy=SELECT_STRATEGY,
        vision_feature_layer=-1, image_seq_length=NUM_IMAGE_TOKENS,
        tie_word_embeddings=True,
    )


def save_model_dir(model, out: Path) -> None:
    """Writes weights (safetensors), config, generation config, tokenizer and
    processor configs: everything `from_pretrained(out)` needs offline."""
    from transformers import GenerationConfig

    out.mkdir(parents=True, exist_ok=True)
    v = vocab()
    model.generation_config = GenerationConfig(
        bos_token_id=v["<s>"], eos_token_id=[v["<end>"]], pad_token_id=v["<pad>"],
        do_sample=False, max_new_tokens=24,
    )
    model.save_pretrained(out, safe_serialization=True)
    make_processor().save_pretrained(out)
    (out / "scene_world.json").write_text(json.dumps({
        "image_size": IMAGE_SIZE, "question_kinds": list(scenes.QUESTION_KINDS),
        "eval_seed_base": scenes.EVAL_SEED_BASE,
    }, indent=2) + "\n")
