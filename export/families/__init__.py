"""Registered architecture families: one small module each."""
from __future__ import annotations

from vlmedge.errors import UnsupportedArchitectureError

from .base import Family
from .gemma3 import Gemma3
from .idefics3 import Idefics3
from .internvl import InternVL
from .llava import Llava
from .llava_next import LlavaNext, LlavaOnevision
from .paligemma import PaliGemma
from .qwen2_vl import Qwen2VL, Qwen3VL, Qwen25VL
from .smolvlm import SmolVLM

FAMILIES: dict[str, Family] = {f.name: f for f in (Llava(), Idefics3(), SmolVLM(), Qwen2VL(),
                                                    Qwen25VL(), LlavaNext(), LlavaOnevision(),
                                                    InternVL(), Gemma3(), PaliGemma(),
                                                    Qwen3VL())}


def register(family: Family) -> Family:
    FAMILIES[family.name] = family
    return family


def supported() -> str:
    return ", ".join(f"{f.name} ({'/'.join(f.architectures)})" for f in FAMILIES.values())


def family_for(config) -> Family:
    """The family for an HF config, by architecture name or model_type."""
    archs = list(getattr(config, "architectures", None) or [])
    model_type = getattr(config, "model_type", "")
    for fam in FAMILIES.values():
        if any(a in fam.architectures for a in archs) or model_type in fam.model_types:
            return fam
    raise UnsupportedArchitectureError(
        f"unsupported architecture {archs[0] if archs else model_type!r}",
        expected=f"one of the supported families: {supported()}",
        hint="see README 'Supported models'")
