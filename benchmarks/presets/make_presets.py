"""Writes the architecture presets: config directories of full-size public
VLMs, for `vlm-export --model benchmarks/presets/NAME --random-weights`.

    python benchmarks/presets/make_presets.py            # rewrites every preset
    python benchmarks/presets/make_presets.py smolvlm-256m

Each directory holds the architecture-defining values of the model's
published config.json (sources in README.md; training-only keys left out),
its image processor settings and chat template, and a SMALL stand-in
tokenizer: a byte-level BPE of ~1,000 tokens trained on the demo scene
world's English, with every special token the processor and chat template
need at the real model's id (e.g. SmolVLM's <image> = 49190). Prompt ids
therefore have the real image-token layout, while plain text takes roughly
as many tokens as with the real tokenizer; the answers of a random-weight
model mean nothing anyway. No weights: the models exist for latency
planning only.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

# -- published configs (architecture-defining keys) ---------------------------
# HuggingFaceTB/SmolVLM-256M-Instruct and -500M-Instruct (and SmolVLM2-500M):
# SigLIP-base/16 at 512 px, pixel shuffle x4 (64 tokens per 512 px tile),
# SmolLM2-135M / -360M.
_SMOLVLM_VISION = {
    "hidden_size": 768, "image_size": 512, "intermediate_size": 3072,
    "max_image_size": {"longest_edge": 512}, "model_type": "idefics3_vision",
    "num_attention_heads": 12, "num_hidden_layers": 12, "patch_size": 16,
    "size": {"longest_edge": 2048}, "tie_word_embeddings": False, "use_base_siglip": False}


def _smolvlm(text: dict, v2: bool = False) -> dict:
    """SmolVLM (v1: Idefics3ForConditionalGeneration) or SmolVLM2
    (SmolVLMForConditionalGeneration, model_type "smolvlm"): the same
    architecture, tokens and image settings under another class name."""
    arch, model_type = ("SmolVLM", "smolvlm") if v2 else ("Idefics3", "idefics3")
    return {
        "architectures": [f"{arch}ForConditionalGeneration"], "image_token_id": 49190,
        "model_type": model_type, "scale_factor": 4, "tie_word_embeddings": False,
        "torch_dtype": "float32" if v2 else "bfloat16", "use_cache": True, "vocab_size": 49280,
        "text_config": {"architectures": ["VLlama3ForCausalLM"], "head_dim": 64,
                        "hidden_act": "silu", "is_llama_config": True,
                        "max_position_embeddings": 8192, "model_type": "llama",
                        "pad_token_id": 2, "rms_norm_eps": 1e-05, "rope_theta": 100000,
                        "tie_word_embeddings": False, "vocab_size": 49280,
                        "bos_token_id": 1, "eos_token_id": 2, **text},
        "vision_config": {**_SMOLVLM_VISION, "model_type": f"{model_type}_vision"}}


SMOLVLM_256M = _smolvlm({"hidden_size": 576, "intermediate_size": 1536,
                         "num_attention_heads": 9, "num_hidden_layers": 30,
                         "num_key_value_heads": 3, "initializer_range": 0.041666666666666664})
SMOLVLM_500M = _smolvlm({"hidden_size": 960, "intermediate_size": 2560,
                         "num_attention_heads": 15, "num_hidden_layers": 32,
                         "num_key_value_heads": 5, "initializer_range": 0.02})
# HuggingFaceTB/SmolVLM2-500M-Video-Instruct: SmolVLM-500M's architecture as
# transformers' SmolVLMForConditionalGeneration (processor SmolVLMProcessor).
SMOLVLM2_500M = _smolvlm({"hidden_size": 960, "intermediate_size": 2560,
                          "num_attention_heads": 15, "num_hidden_layers": 32,
                          "num_key_value_heads": 5, "initializer_range": 0.02}, v2=True)

# llava-hf/llava-1.5-7b-hf's vision tower and projector (CLIP ViT-L/14 at 336
# px, second-to-last layer, 576 patch tokens, 2-layer GELU MLP) with the
# Llama of TinyLlama/TinyLlama-1.1B-Chat-v1.0: the layout of
# bczhou/tiny-llava-v1-hf. Vocabulary padded to 32064 as llava-hf does.
LLAVA_15_TINYLLAMA = {
    "architectures": ["LlavaForConditionalGeneration"], "image_token_index": 32000,
    "model_type": "llava", "pad_token_id": 32001, "projector_hidden_act": "gelu",
    "image_seq_length": 576, "tie_word_embeddings": False, "torch_dtype": "float16",
    "vision_feature_layer": -2, "vision_feature_select_strategy": "default",
    "vocab_size": 32064,
    "vision_config": {"hidden_act": "quick_gelu", "hidden_size": 1024, "image_size": 336,
                      "intermediate_size": 4096, "layer_norm_eps": 1e-05,
                      "model_type": "clip_vision_model", "num_attention_heads": 16,
                      "num_hidden_layers": 24, "patch_size": 14, "projection_dim": 768},
    "text_config": {"architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2,
                    "hidden_act": "silu", "hidden_size": 2048, "intermediate_size": 5632,
                    "max_position_embeddings": 2048, "model_type": "llama",
                    "num_attention_heads": 32, "num_hidden_layers": 22, "num_key_value_heads": 4,
                    "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "tie_word_embeddings": False,
                    "vocab_size": 32064, "pad_token_id": 32001},
}

# Qwen/Qwen2-VL-2B-Instruct: 675M ViT (14 px patches, 2x2 merge) + Qwen2-1.5B.
QWEN2_VL_2B = {
    "architectures": ["Qwen2VLForConditionalGeneration"], "bos_token_id": 151643,
    "eos_token_id": 151645, "vision_start_token_id": 151652, "vision_end_token_id": 151653,
    "vision_token_id": 151654, "image_token_id": 151655, "video_token_id": 151656,
    "hidden_act": "silu", "hidden_size": 1536, "initializer_range": 0.02,
    "intermediate_size": 8960, "max_position_embeddings": 32768, "max_window_layers": 28,
    "model_type": "qwen2_vl", "num_attention_heads": 12, "num_hidden_layers": 28,
    "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "sliding_window": 32768, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "use_cache": True, "use_sliding_window": False, "vocab_size": 151936,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]},
    "vision_config": {"depth": 32, "embed_dim": 1280, "mlp_ratio": 4, "num_heads": 16,
                      "in_chans": 3, "hidden_size": 1536, "patch_size": 14,
                      "spatial_merge_size": 2, "spatial_patch_size": 14,
                      "temporal_patch_size": 2},
}

# llava-hf/llava-onevision-qwen2-0.5b-ov-hf: SigLIP so400m/14 at 384 px (26
# layers: the checkpoint drops so400m's last one and reads the new last,
# 1152 wide), "anyres_max_9" tiling over 36 grid pinpoints (up to 6 x 6 tiles
# of 384 px, features shrunk past ~9 tiles' worth), 2-layer GELU MLP, a
# learned image_newline, Qwen2-0.5B (24 layers, 896 wide, 14 heads / 2 KV).
_OV_PINPOINTS = [[h, w] for h in range(384, 2305, 384) for w in range(384, 2305, 384)]
LLAVA_ONEVISION_05B = {
    "architectures": ["LlavaOnevisionForConditionalGeneration"], "image_token_index": 151646,
    "video_token_index": 151647, "model_type": "llava_onevision",
    "projector_hidden_act": "gelu", "tie_word_embeddings": True, "torch_dtype": "float16",
    "vision_aspect_ratio": "anyres_max_9", "vision_feature_layer": -1,
    "vision_feature_select_strategy": "full", "image_grid_pinpoints": _OV_PINPOINTS,
    "vision_config": {"hidden_size": 1152, "image_size": 384, "intermediate_size": 4304,
                      "model_type": "siglip_vision_model", "num_attention_heads": 16,
                      "num_hidden_layers": 26, "patch_size": 14, "vision_use_head": False},
    "text_config": {"architectures": ["Qwen2ForCausalLM"], "bos_token_id": 151643,
                    "eos_token_id": 151645, "hidden_act": "silu", "hidden_size": 896,
                    "intermediate_size": 4864, "max_position_embeddings": 32768,
                    "max_window_layers": 24, "model_type": "qwen2", "num_attention_heads": 14,
                    "num_hidden_layers": 24, "num_key_value_heads": 2, "rms_norm_eps": 1e-06,
                    "rope_theta": 1000000.0, "sliding_window": None,
                    "tie_word_embeddings": True, "use_sliding_window": False,
                    "vocab_size": 152000},
}

# OpenGVLab/InternVL3-1B-hf: InternViT-300M-448px-V2_5 (24 layers, 1024 wide,
# 16 heads, 14 px patches at 448 px, qkv bias, layer scale, no qk-norm), pixel
# shuffle 0.5 (256 tokens a tile), LayerNorm + 2-layer GELU MLP, Qwen2.5-0.5B
# (24 layers, 896 wide, 14 heads / 2 KV, vocab 151674 with InternVL's <img>
# </img> <IMG_CONTEXT> ... tokens; dynamic NTK rope x2 past 32k positions,
# which the artifact's context never reaches). GotOcr2 tiling: 1..12 tiles of
# 448 px + a thumbnail (InternVLProcessor turns crop_to_patches on).
INTERNVL3_1B = {
    "architectures": ["InternVLForConditionalGeneration"], "downsample_ratio": 0.5,
    "image_seq_length": 256, "image_token_id": 151667, "model_type": "internvl",
    "projector_hidden_act": "gelu", "torch_dtype": "bfloat16",
    "vision_feature_layer": -1, "vision_feature_select_strategy": "default",
    "vision_config": {"architectures": ["InternVisionModel"], "attention_bias": True,
                      "attention_dropout": 0.0, "hidden_act": "gelu", "hidden_size": 1024,
                      "image_size": [448, 448], "intermediate_size": 4096,
                      "layer_norm_eps": 1e-06, "layer_scale_init_value": 0.1,
                      "model_type": "internvl_vision", "norm_type": "layer_norm",
                      "num_attention_heads": 16, "num_channels": 3, "num_hidden_layers": 24,
                      "patch_size": [14, 14], "use_absolute_position_embeddings": True,
                      "use_mask_token": False, "use_mean_pooling": True, "use_qk_norm": False},
    "text_config": {"architectures": ["Qwen2ForCausalLM"], "bos_token_id": 151643,
                    "eos_token_id": 151645, "hidden_act": "silu", "hidden_size": 896,
                    "intermediate_size": 4864, "max_position_embeddings": 32768,
                    "max_window_layers": 70, "model_type": "qwen2", "num_attention_heads": 14,
                    "num_hidden_layers": 24, "num_key_value_heads": 2, "rms_norm_eps": 1e-06,
                    "rope_scaling": {"factor": 2.0, "rope_type": "dynamic", "type": "dynamic"},
                    "rope_theta": 1000000.0, "sliding_window": None,
                    "tie_word_embeddings": False, "use_sliding_window": False,
                    "vocab_size": 151674},
    "tie_word_embeddings": False,
}

# Qwen/Qwen3-VL-2B-Instruct: a 24-block ViT (1024 wide, 16 px patches, 2x2
# merge, a 48x48 learned position table) with deepstack features from blocks
# 5, 11 and 17; Qwen3-1.7B (28 layers, 2048 wide, 16 heads / 8 KV heads of
# 128, tied embeddings) with interleaved mrope.
QWEN3_VL_2B = {
    "architectures": ["Qwen3VLForConditionalGeneration"], "image_token_id": 151655,
    "model_type": "qwen3_vl", "tie_word_embeddings": True, "video_token_id": 151656,
    "vision_end_token_id": 151653, "vision_start_token_id": 151652,
    "text_config": {"attention_bias": False, "bos_token_id": 151643, "eos_token_id": 151645,
                    "head_dim": 128, "hidden_act": "silu", "hidden_size": 2048,
                    "intermediate_size": 6144, "max_position_embeddings": 262144,
                    "model_type": "qwen3_vl_text", "num_attention_heads": 16,
                    "num_hidden_layers": 28, "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
                    "rope_scaling": {"mrope_interleaved": True, "mrope_section": [24, 20, 20],
                                     "rope_type": "default"},
                    "rope_theta": 5000000, "tie_word_embeddings": True, "vocab_size": 151936},
    "vision_config": {"deepstack_visual_indexes": [5, 11, 17], "depth": 24,
                      "hidden_act": "gelu_pytorch_tanh", "hidden_size": 1024, "in_channels": 3,
                      "intermediate_size": 4096, "model_type": "qwen3_vl", "num_heads": 16,
                      "num_position_embeddings": 2304, "out_hidden_size": 2048,
                      "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2},
}

# google/gemma-3-4b-it: SigLIP-so400m/14 at 896 px (27 layers), 4096 patches
# average-pooled to 256 tokens; Gemma 3 4B (34 layers, 2560 wide, 8 heads / 4 KV
# heads of 256, five sliding-window layers of 1024 to each global one).
GEMMA3_4B = {
    "architectures": ["Gemma3ForConditionalGeneration"], "boi_token_index": 255999,
    "eoi_token_index": 256000, "eos_token_id": [1, 106], "image_token_index": 262144,
    "initializer_range": 0.02, "mm_tokens_per_image": 256, "model_type": "gemma3",
    "torch_dtype": "bfloat16",
    "text_config": {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
                    "num_hidden_layers": 34, "num_attention_heads": 8,
                    "num_key_value_heads": 4, "head_dim": 256, "query_pre_attn_scalar": 256,
                    "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                    "sliding_window": 1024, "vocab_size": 262208,
                    "max_position_embeddings": 131072},
    "vision_config": {"hidden_size": 1152, "image_size": 896, "intermediate_size": 4304,
                      "model_type": "siglip_vision_model", "num_attention_heads": 16,
                      "num_hidden_layers": 27, "patch_size": 14, "vision_use_head": False},
}

# -- chat templates (the published ones; LLaVA's without its {% generation %}
# training markers, which only transformers' jinja environment knows) --------
SMOLVLM_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")
# SmolVLM2's: SmolVLM's with a <video> branch (vlmedge exports images only).
SMOLVLM2_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% elif line['type'] == 'video' %}"
    "{{ '<video>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")
LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}"
    "{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")
QWEN2_VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

LLAVA_ONEVISION_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + ' '}}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}"
    "{{ '<video>' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ '\n' + content['text'] }}{% endfor %}{{'<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

# Gemma 3's: a system message goes before the first user turn's text; the
# assistant's role is "model".
GEMMA3_TEMPLATE = (
    "{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}{%- else -%}"
    "{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}{%- else -%}{%- set first_user_prefix = \"\" -%}"
    "{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}"
    "{%- if message['content'] is string -%}{{ message['content'] | trim }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<start_of_image>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] | trim }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}{{ '<end_of_turn>\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}")
# transformers' convert_internvl_weights_to_hf.py writes this one for the -hf checkpoints.
INTERNVL_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "{{ '<IMG_CONTEXT>\n' }}{% elif content['type'] == 'video' %}{{ '<video>\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}"
    "{% endif %}{{'<|im_end|>\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{'<|im_start|>assistant\n' }}{% endif %}")

# -- special tokens at the real ids ---------------------------------------------
SMOLVLM_SPECIALS = {
    "<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2, "<global-img>": 49152,
    **{f"<row_{r}_col_{c}>": 49152 + (r - 1) * 6 + c for r in range(1, 7) for c in range(1, 7)},
    "<fake_token_around_image>": 49189, "<image>": 49190,
    **{f"<|reserved_special_token_{i}|>": 49191 + i for i in range(88)},
    "<end_of_utterance>": 49279}
LLAVA_SPECIALS = {"<unk>": 0, "<s>": 1, "</s>": 2, "<image>": 32000, "<pad>": 32001}
QWEN_SPECIALS = {
    "<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645,
    "<|object_ref_start|>": 151646, "<|object_ref_end|>": 151647, "<|box_start|>": 151648,
    "<|box_end|>": 151649, "<|quad_start|>": 151650, "<|quad_end|>": 151651,
    "<|vision_start|>": 151652, "<|vision_end|>": 151653, "<|vision_pad|>": 151654,
    "<|image_pad|>": 151655, "<|video_pad|>": 151656}

ONEVISION_SPECIALS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645,
                      "<image>": 151646, "<video>": 151647}

# Qwen2.5-VL's tokenizer (InternVL's -hf conversion starts from it) + InternVL's
# tokens; <video> is added after them, outside the 151674-row embedding table.
# Gemma 3: <pad> <eos> <bos> <unk> <mask> [multimodal] and 99 unused tokens take
# ids 0-104 (the stand-in's base tokens), then the turn and image tokens.
GEMMA3_BASE = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "[multimodal]"] + \
    [f"<unused{i}>" for i in range(99)] + ["<start_of_turn>", "<end_of_turn>"]
GEMMA3_SPECIALS = {**{t: i for i, t in enumerate(GEMMA3_BASE)}, "<start_of_image>": 255999,
                   "<end_of_image>": 256000, "<image_soft_token>": 262144}

INTERNVL_SPECIALS = {
    **QWEN_SPECIALS, "<tool_call>": 151657, "</tool_call>": 151658, "<|fim_prefix|>": 151659,
    "<|fim_middle|>": 151660, "<|fim_suffix|>": 151661, "<|fim_pad|>": 151662,
    "<|repo_name|>": 151663, "<|file_sep|>": 151664, "<img>": 151665, "</img>": 151666,
    "<IMG_CONTEXT>": 151667, "<quad>": 151668, "</quad>": 151669, "<ref>": 151670,
    "</ref>": 151671, "<box>": 151672, "</box>": 151673, "<video>": 151674}
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def corpus() -> list[str]:
    """English to train the stand-in BPE on: the demo scene world's questions
    and captions, and chat words."""
    sys.path.insert(0, str(HERE.parents[1]))
    from demo import scenes

    lines = ["User: Assistant: USER: ASSISTANT: system user assistant",
             "You are a helpful assistant. Describe the image. What is in this picture?",
             "Can you describe this image? What do you see? Answer the question."]
    for seed in range(300):
        scene = scenes.make_scene(seed)
        lines.append(scenes.caption(scene))
        # without the box kind (added later): the presets' tokenizers regenerate as committed
        lines += [q.question + " " + q.answer for q in scenes.questions(scene) if q.kind != "box"]
    return lines


def build_tokenizer(specials: dict[str, int], base: list[str], vocab_size: int = 1024,
                    bos: str | None = None):
    """A byte-level BPE whose `base` tokens take ids 0.. and whose other special
    tokens sit at their given (real-model) ids, gaps allowed."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=base,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus(), trainer)
    data = json.loads(tok.to_str())
    assert all(data["model"]["vocab"][t] == specials[t] for t in base)
    top = max(data["model"]["vocab"].values())
    for text, i in specials.items():
        if text in base:
            continue
        assert i > top, f"{text} id {i} collides with the trained vocabulary"
        data["model"]["vocab"][text] = i  # in the model's vocab: the id is kept as is
        data["added_tokens"].append({"id": i, "content": text, "single_word": False,
                                     "lstrip": False, "rstrip": False, "normalized": False,
                                     "special": True})
    tok = Tokenizer.from_str(json.dumps(data))
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, specials[bos])])
    for text, i in specials.items():
        assert tok.encode(text, add_special_tokens=False).ids == [i], text
    return tok


def fast_tokenizer(tok, **kw):
    from transformers import PreTrainedTokenizerFast
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_input_names=["input_ids",
                                                                            "attention_mask"], **kw)


def write_smolvlm(out: Path, config: dict) -> None:
    from transformers import Idefics3ImageProcessor, Idefics3Processor

    tok = fast_tokenizer(build_tokenizer(SMOLVLM_SPECIALS, ["<|endoftext|>", "<|im_start|>",
                                                            "<|im_end|>"]),
                         bos_token="<|im_start|>", eos_token="<end_of_utterance>",
                         pad_token="<|im_end|>", unk_token="<|endoftext|>")
    ip = Idefics3ImageProcessor(
        do_convert_rgb=True, do_resize=True, size={"longest_edge": 2048}, resample=1,
        do_image_splitting=True, max_image_size={"longest_edge": 512}, do_rescale=True,
        rescale_factor=1 / 255, do_normalize=True, image_mean=[0.5] * 3, image_std=[0.5] * 3,
        do_pad=True)
    Idefics3Processor(image_processor=ip, tokenizer=tok, image_seq_len=64,
                      chat_template=SMOLVLM_TEMPLATE).save_pretrained(out)
    _json(out / "generation_config.json", {"bos_token_id": 1, "eos_token_id": [2, 49279],
                                           "pad_token_id": 2})
    _json(out / "config.json", config)


def write_smolvlm2(out: Path, config: dict) -> None:
    """The published layout: tokenizer (naming its image tokens, where
    SmolVLMProcessor reads them), preprocessor_config.json (the image
    processor), processor_config.json (image_seq_len) and the chat template.
    Not written through SmolVLMProcessor, which needs a video processor
    (torchvision) and num2words; the smolvlm family builds an image-only one."""
    from transformers.models.smolvlm.image_processing_pil_smolvlm import (
        SmolVLMImageProcessorPil)

    tok = fast_tokenizer(build_tokenizer(SMOLVLM_SPECIALS, ["<|endoftext|>", "<|im_start|>",
                                                            "<|im_end|>"]),
                         bos_token="<|im_start|>", eos_token="<end_of_utterance>",
                         pad_token="<|im_end|>", unk_token="<|endoftext|>",
                         extra_special_tokens={
                             "fake_image_token": "<fake_token_around_image>",
                             "image_token": "<image>", "global_image_token": "<global-img>",
                             "end_of_utterance_token": "<end_of_utterance>"})
    tok.save_pretrained(out)
    SmolVLMImageProcessorPil(
        do_convert_rgb=True, do_resize=True, size={"longest_edge": 2048}, resample=1,
        do_image_splitting=True, max_image_size={"longest_edge": 512}, do_rescale=True,
        rescale_factor=1 / 255, do_normalize=True, image_mean=[0.5] * 3, image_std=[0.5] * 3,
        do_pad=True).save_pretrained(out)
    _json(out / "processor_config.json", {"image_seq_len": 64,
                                          "processor_class": "SmolVLMProcessor"})
    (out / "chat_template.jinja").write_text(SMOLVLM2_TEMPLATE)
    _json(out / "generation_config.json", {"bos_token_id": 1, "eos_token_id": [2, 49279],
                                           "pad_token_id": 2})
    _json(out / "config.json", config)


def write_llava(out: Path, config: dict) -> None:
    from transformers import CLIPImageProcessor, LlavaProcessor

    tok = fast_tokenizer(build_tokenizer(LLAVA_SPECIALS, ["<unk>", "<s>", "</s>"], bos="<s>"),
                         bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                         extra_special_tokens={"image_token": "<image>"})
    ip = CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                            do_resize=True, do_center_crop=True, do_rescale=True,
                            do_normalize=True, do_convert_rgb=True, resample=3,
                            image_mean=CLIP_MEAN, image_std=CLIP_STD)
    LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=14,
                   vision_feature_select_strategy="default", chat_template=LLAVA_TEMPLATE,
                   image_token="<image>", num_additional_image_tokens=1).save_pretrained(out)
    _json(out / "generation_config.json", {"bos_token_id": 1, "eos_token_id": 2,
                                           "pad_token_id": 32001})
    _json(out / "config.json", config)


def write_qwen2_vl(out: Path, config: dict, qwen3: bool = False) -> None:
    """Tokenizer, image processor and chat template; no processor config:
    Qwen2VLProcessor wants a video processor (torchvision); the qwen2_vl
    family builds an image-only one from these files. qwen3: Qwen3-VL's image
    settings (16 px patches, mean and std 0.5, 64k..16M pixels); its chat
    template is Qwen2-VL's, which renders a user turn of images and text as
    Qwen3-VL's longer template does (tools and thinking left out)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil)

    tok = fast_tokenizer(build_tokenizer(QWEN_SPECIALS, []), eos_token="<|im_end|>",
                         pad_token="<|endoftext|>", unk_token=None,
                         extra_special_tokens={"image_token": "<|image_pad|>",
                                               "video_token": "<|video_pad|>"})
    tok.save_pretrained(out)
    images = dict(patch_size=16, min_pixels=65536, max_pixels=16777216, image_mean=[0.5] * 3,
                  image_std=[0.5] * 3) if qwen3 else \
        dict(patch_size=14, min_pixels=56 * 56, max_pixels=28 * 28 * 16384,
             image_mean=CLIP_MEAN, image_std=CLIP_STD)
    Qwen2VLImageProcessorPil(temporal_patch_size=2, merge_size=2, **images).save_pretrained(out)
    (out / "chat_template.jinja").write_text(QWEN2_VL_TEMPLATE)
    _json(out / "generation_config.json", {"bos_token_id": 151643, "eos_token_id":
                                           [151645, 151643], "pad_token_id": 151643})
    _json(out / "config.json", config)


def write_llava_onevision(out: Path, config: dict) -> None:
    """Tokenizer, image processor, processor_config.json and chat template, as
    published; not through LlavaOnevisionProcessor, which needs a video
    processor (torchvision): the llava_onevision family builds an image-only one."""
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil)

    tok = fast_tokenizer(build_tokenizer(ONEVISION_SPECIALS, []), eos_token="<|im_end|>",
                         pad_token="<|endoftext|>", unk_token=None,
                         extra_special_tokens={"image_token": "<image>",
                                               "video_token": "<video>"})
    tok.save_pretrained(out)
    LlavaOnevisionImageProcessorPil(
        do_convert_rgb=True, do_resize=True, size={"height": 384, "width": 384}, resample=3,
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True, image_mean=[0.5] * 3,
        image_std=[0.5] * 3, do_pad=True, image_grid_pinpoints=_OV_PINPOINTS).save_pretrained(out)
    _json(out / "processor_config.json", {"image_token": "<image>", "num_image_tokens": 729,
                                          "processor_class": "LlavaOnevisionProcessor",
                                          "video_token": "<video>",
                                          "vision_feature_select_strategy": "full"})
    (out / "chat_template.jinja").write_text(LLAVA_ONEVISION_TEMPLATE)
    _json(out / "generation_config.json", {"bos_token_id": 151643, "eos_token_id":
                                           [151645, 151643], "pad_token_id": 151643})
    _json(out / "config.json", config)


def write_internvl(out: Path, config: dict) -> None:
    """Tokenizer (naming <img> </img> <IMG_CONTEXT> <video>, where
    InternVLProcessor reads them), preprocessor_config.json (GotOcr2, 448 px
    tiles, 1..12), processor_config.json (image_seq_length) and the chat
    template, as published; not through InternVLProcessor, which needs a video
    processor (torchvision): the internvl family builds an image-only one."""
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import (
        GotOcr2ImageProcessorPil)

    tok = fast_tokenizer(build_tokenizer(INTERNVL_SPECIALS, []), eos_token="<|im_end|>",
                         pad_token="<|endoftext|>", unk_token=None,
                         extra_special_tokens={"start_image_token": "<img>",
                                               "end_image_token": "</img>",
                                               "context_image_token": "<IMG_CONTEXT>",
                                               "video_token": "<video>"})
    tok.save_pretrained(out)
    GotOcr2ImageProcessorPil(
        do_resize=True, size={"height": 448, "width": 448}, resample=3, do_rescale=True,
        rescale_factor=1 / 255, do_normalize=True, image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD, do_convert_rgb=True, crop_to_patches=False, min_patches=1,
        max_patches=12).save_pretrained(out)
    _json(out / "processor_config.json", {"image_seq_length": 256,
                                          "processor_class": "InternVLProcessor"})
    (out / "chat_template.jinja").write_text(INTERNVL_TEMPLATE)
    _json(out / "generation_config.json", {"bos_token_id": 151643, "eos_token_id": 151645,
                                           "pad_token_id": 151643})
    _json(out / "config.json", config)


def write_gemma3(out: Path, config: dict) -> None:
    """Tokenizer (naming boi/eoi/image tokens, where Gemma3Processor reads
    them), Gemma 3's image processor (896 px, bilinear, no pan-and-scan),
    processor_config.json (image_seq_length) and the chat template."""
    from transformers import Gemma3Processor
    from transformers.models.gemma3.image_processing_pil_gemma3 import (
        Gemma3ImageProcessorPil)

    tok = fast_tokenizer(build_tokenizer(GEMMA3_SPECIALS, GEMMA3_BASE),
                         bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                         unk_token="<unk>",
                         extra_special_tokens={"boi_token": "<start_of_image>",
                                               "eoi_token": "<end_of_image>",
                                               "image_token": "<image_soft_token>"})
    ip = Gemma3ImageProcessorPil(
        do_convert_rgb=True, do_resize=True, size={"height": 896, "width": 896}, resample=2,
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True, image_mean=[0.5] * 3,
        image_std=[0.5] * 3, do_pan_and_scan=False)
    Gemma3Processor(image_processor=ip, tokenizer=tok, chat_template=GEMMA3_TEMPLATE,
                    image_seq_length=256).save_pretrained(out)
    _json(out / "generation_config.json", {"bos_token_id": 2, "eos_token_id": [1, 106],
                                           "pad_token_id": 0})
    _json(out / "config.json", config)


def _json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


PRESETS = {
    "smolvlm-256m": (write_smolvlm, SMOLVLM_256M),
    "smolvlm-500m": (write_smolvlm, SMOLVLM_500M),
    "smolvlm2-500m": (write_smolvlm2, SMOLVLM2_500M),
    "llava-1.5-tinyllama": (write_llava, LLAVA_15_TINYLLAMA),
    "qwen2-vl-2b": (write_qwen2_vl, QWEN2_VL_2B),
    "llava-onevision-0.5b": (write_llava_onevision, LLAVA_ONEVISION_05B),
    "internvl3-1b": (write_internvl, INTERNVL3_1B),
    "gemma-3-4b": (write_gemma3, GEMMA3_4B),
    "qwen3-vl-2b": (lambda out, config: write_qwen2_vl(out, config, qwen3=True), QWEN3_VL_2B),
}


def main(names: list[str]) -> None:
    for name in names or list(PRESETS):
        write, config = PRESETS[name]
        out = HERE / name
        for f in out.glob("*") if out.exists() else []:
            f.unlink()
        out.mkdir(exist_ok=True)
        write(out, config)
        sizes = {f.name: f.stat().st_size for f in sorted(out.iterdir())}
        print(f"{name}: {sizes}")


if __name__ == "__main__":
    main(sys.argv[1:])
