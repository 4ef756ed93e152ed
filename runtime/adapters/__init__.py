"""One runtime adapter per family's image layout (DESIGN.md, "Layers on top of
the session"): what differs at run time between families, in one place.

An adapter answers, for its layout: which tiling preprocesses an image and
what its image grid is (typed, checked); how an image-token budget narrows
that tiling; how each image placeholder of a rendered prompt expands; how
the vision graph is fed (tile by tile, or one call with host-computed
inputs) and how its output becomes the prompt's image features; and the
decoder's positions (1-D or mrope). The session, the chat tokenizer and the
budget pick it once, from the manifest's image section (`image.expand`: the
family's layout, one per family or shared by families of one layout), and
never switch on family strings.

    layout     families                               adapter
    repeat     llava, paligemma                       fixed.Repeat
    wrap       gemma3                                 fixed.Wrap
    idefics3   idefics3, smolvlm                      idefics3.Idefics3
    qwen2_vl   qwen2_vl, qwen2_5_vl, qwen3_vl         qwen.Qwen
    anyres     llava_next, llava_onevision            anyres.AnyRes
    internvl   internvl                               internvl.InternVL

A new family with a new layout adds one module here and one line below.
"""
from __future__ import annotations

from vlmedge.errors import ArtifactError

from .anyres import AnyRes
from .base import Adapter
from .fixed import Repeat, Wrap
from .idefics3 import Idefics3
from .internvl import InternVL
from .qwen import Qwen

ADAPTERS: dict[str, type[Adapter]] = {a.layout: a for a in (Repeat, Wrap, Idefics3, Qwen,
                                                              AnyRes, InternVL)}


def adapter_for(image) -> Adapter:
    """The adapter of a manifest's image section (typed ImageFacts)."""
    cls = ADAPTERS.get(image.expand)
    if cls is None:
        raise ArtifactError(f"unknown image layout {image.expand!r}",
                            expected=" | ".join(ADAPTERS),
                            hint="upgrade vlmedge or re-export the artifact")
    return cls(image)


__all__ = ["ADAPTERS", "Adapter", "adapter_for"]
