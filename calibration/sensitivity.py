"""Per-node sensitivity and the exclusion loop of the accuracy gate.

Sensitivity is measured leave-one-out: the quantized pipeline with one node
put back to fp32, on the first SENSITIVITY_IMAGES held-out images. A node's
gain is how much that improves the figure that failed (image-feature cosine
for the vision graph; mean KL(fp32 || int8) end to end otherwise: smooth
where top-1 agreement moves in steps). The loop then keeps nodes in fp32 in
order of gain, re-measuring the whole gate after each, until it passes or
MAX_EXCLUDED_FRACTION of the quantized nodes are fp32 (past that INT8 no
longer pays) or no node helps.

Leave-one-out ranks a node that does harm on its own; harm that needs two
nodes together to undo shows as a small gain for each, and the loop, which
re-measures after every exclusion, still reaches it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from .gate import Figures

SENSITIVITY_IMAGES = 8
MAX_EXCLUDED_FRACTION = 0.25
MIN_GAIN = 1e-9


@dataclass(frozen=True)
class Node:
    graph: str  # "vision" | "decoder"
    name: str


@dataclass
class Ranked:
    node: Node
    gain: float
    figure: float  # the figure with this node in fp32


@dataclass
class LoopResult:
    excluded: list[Node] = field(default_factory=list)
    steps: list[dict] = field(default_factory=list)  # {"graph", "node", "figures", "failures"}
    figures: Figures | None = None
    failures: list[str] = field(default_factory=list)


def rank(candidates: list[Node], figure_without: Callable[[Node], float], base: float,
         higher_is_better: bool, log: Callable[[str], None]) -> list[Ranked]:
    """Leave-one-out gains, largest first; only nodes that help."""
    out = []
    for i, node in enumerate(candidates):
        value = figure_without(node)
        gain = value - base if higher_is_better else base - value
        out.append(Ranked(node, gain, value))
        log(f"  sensitivity {i + 1}/{len(candidates)}: {node.graph}:{node.name} gain {gain:+.3g}")
    return sorted((r for r in out if r.gain > MIN_GAIN), key=lambda r: -r.gain)


def exclude_until(ranked: list[Ranked], excluded: list[Node], cap: int,
                  apply: Callable[[list[Node]], tuple[Figures, list[str]]],
                  log: Callable[[str], None]) -> LoopResult:
    """Adds ranked nodes to `excluded` one at a time, re-measuring with
    `apply(excluded) -> (figures, failures)`, until no failures or the cap."""
    result = LoopResult(excluded=list(excluded))
    for r in ranked:
        if len(result.excluded) >= cap:
            log(f"[gate] stopping: {cap} nodes in fp32 is the most the gate allows")
            break
        result.excluded.append(r.node)
        figures, fails = apply(result.excluded)
        result.figures, result.failures = figures, fails
        result.steps.append({"graph": r.node.graph, "node": r.node.name, "gain": r.gain,
                             "figures": figures.to_dict(), "failures": fails})
        log(f"[gate] {r.node.graph}:{r.node.name} kept in fp32 -> "
            + ("passes" if not fails else "; ".join(fails)))
        if not fails:
            break
    return result
