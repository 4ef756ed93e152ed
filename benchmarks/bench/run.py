"""One vlm-bench run: probe the machine, start one worker per system, time
them interleaved (A B A B ...) so drift hits all alike, sweep, probe again,
and assemble the results (the --json object)."""
from __future__ import annotations

import os
import platform
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from vlmedge.errors import ContextOverflowError

from . import peer, roofline, stats
from .systems import SystemProcess, Spec, artifact_specs, torch_spec
from .tegrastats import Tegrastats

SWEEPS = {
    "prompt-len": (1, 4, 16, 64),  # the prompt repeated k times
    "new-tokens": (8, 16, 32, 64, 128),
    "image-size": ((320, 240), (640, 480), (1280, 720), (1920, 1080)),
}
DEFAULT_PROMPT = "describe the image."


@dataclass
class Options:
    artifacts: list[Path]
    baseline: str | None = None
    model: str | None = None
    image: Path | None = None
    prompt: str = DEFAULT_PROMPT
    new_tokens: int = 32
    runs: int = 5
    warmup: int = 1
    threads: int = 1
    provider: str = "cpu"
    sweeps: list[str] = field(default_factory=list)
    verify: bool = True  # check the artifacts' sha256 before benchmarking them
    # image-token budget for every system (runtime/image_budget.py; the baseline's
    # HF processor gets the same settings): None = each model's own preprocessing
    max_image_tokens: int | None = None
    # peer runtimes on their own model of each ort-flavour artifact's language
    # model, side by side (peer.py: "onnxruntime-genai", "llama.cpp"); built into peer_cache
    peers: list[str] = field(default_factory=list)
    peer_cache: Path | None = None


def default_image(directory: Path, size=(640, 480)) -> Path:
    """A camera-sized frame: a demo scene (shapes on a background), scaled up
    and centred on a grey 640x480 canvas."""
    from PIL import Image

    from vlmedge.demo import scenes

    scene = scenes.make_scene(scenes.EVAL_SEED_BASE + 1).image.convert("RGB")
    side = min(size)
    frame = Image.new("RGB", size, (128, 128, 128))
    frame.paste(scene.resize((side, side), Image.BICUBIC), ((size[0] - side) // 2, 0))
    path = directory / f"frame_{size[0]}x{size[1]}.png"
    frame.save(path)
    return path


def resized(image: Path, size: tuple[int, int], directory: Path) -> Path:
    from PIL import Image
    with Image.open(image) as im:
        out = directory / f"sweep_{size[0]}x{size[1]}.png"
        im.convert("RGB").resize(size, Image.BICUBIC).save(out)
    return out


def specs_for(o: Options, log: Callable[[str], None] = lambda line: None) -> list[Spec]:
    specs = artifact_specs(o.artifacts, verify=o.verify)
    if o.baseline == "torch":
        specs.insert(0, torch_spec(o.model, specs[0]))
    if o.peers:  # after the artifacts: each round, a peer runs after its partner
        specs += peer.peer_specs(specs, o.peers, o.peer_cache or peer.default_cache(), log)
    return specs


def interleaved(systems: list[SystemProcess], image: Path, prompt: str, new_tokens: int,
                runs: int, warmup: int, tick: Callable[[], None],
                windows: dict[str, list]) -> dict[str, list[dict]]:
    """Rounds of one run per system in a fixed order; warm-up rounds dropped.
    A peer takes its partner's prompt length of the same round."""
    out: dict[str, list[dict]] = {s.name: [] for s in systems}
    for r in range(warmup + runs):
        this_round: dict[str, dict] = {}
        for s in systems:
            partner = this_round.get(s.spec.partner) if s.spec.partner else None
            t0 = time.perf_counter()
            result = s.run(image, prompt, new_tokens,
                           partner["prompt_tokens"] if partner else None)
            this_round[s.name] = result
            windows[s.name].append((t0, time.perf_counter()))
            if r >= warmup:
                out[s.name].append(result)
            tick()
    return out


def sweep_points(kind: str, o: Options, image: Path, directory: Path):
    """(value, image, prompt, new_tokens) per point of a sweep."""
    for v in SWEEPS[kind]:
        if kind == "prompt-len":
            yield v, image, " ".join([o.prompt] * v), o.new_tokens
        elif kind == "new-tokens":
            yield v, image, o.prompt, v
        else:
            yield f"{v[0]}x{v[1]}", resized(image, v, directory), o.prompt, o.new_tokens


_SWEEP_FIGURES = ("prompt_tokens", "new_tokens", "preprocess_ms", "vision_ms", "prefill_ms",
                  "ttft_ms", "decode_ms_p50", "decode_tokens_per_s", "end_to_end_ms")


def run_sweep(kind: str, systems, o: Options, image: Path, directory: Path, tick,
              windows) -> list[dict[str, Any]]:
    points = []
    for value, img, prompt, n in sweep_points(kind, o, image, directory):
        try:
            runs = interleaved(systems, img, prompt, n, o.runs, o.warmup, tick, windows)
        except ContextOverflowError as e:
            points.append({"value": value, "skipped": str(e)})
            for _ in range((o.warmup + o.runs) * len(systems)):
                tick()  # keep the progress total honest
            continue
        figs = {name: {k: stats.summarize(r)[k] for k in _SWEEP_FIGURES}
                for name, r in runs.items()}
        points.append({"value": value, "systems": figs})
    return points


def run_bench(o: Options, progress: Callable[[int, int], None],
              log: Callable[[str], None]) -> dict[str, Any]:
    specs = specs_for(o, log)
    with tempfile.TemporaryDirectory(prefix="vlm-bench-") as tmp:
        tmp = Path(tmp)
        image = o.image or default_image(tmp)
        log(f"roofline probe ({o.threads} thread(s)) ...")
        before = roofline.measure(o.threads)
        systems = [SystemProcess(s, o.threads, o.provider, o.max_image_tokens) for s in specs]
        try:
            for s in systems:
                log(f"loading {s.name} ({s.spec.path}) in its own process ...")
                s.spec.facts = s.start()
            points = sum(len(SWEEPS[k]) for k in o.sweeps)
            total = (o.warmup + o.runs) * len(systems) * (1 + points)
            done = [0]

            def tick():
                done[0] += 1
                progress(done[0], total)

            windows: dict[str, list] = {s.name: [] for s in systems}
            with Tegrastats() as tegra:
                runs = interleaved(systems, image, o.prompt, o.new_tokens, o.runs, o.warmup, tick,
                                   windows)
                # Peak RSS is a high-water mark: read it before the sweeps' bigger inputs.
                memory = {s.name: s.memory() for s in systems}
                sweeps = {k: run_sweep(k, systems, o, image, tmp, tick, windows)
                          for k in o.sweeps}
        finally:
            for s in systems:
                s.close()
        log("roofline probe again ...")
        machine = machine_facts(o, roofline.combine(before, roofline.measure(o.threads)),
                                tegra.available)
        image_size = _image_size(image)
    records = [record(s.spec, runs[s.name], memory[s.name], machine) for s in systems]
    add_flops(records, specs, runs, machine)
    for rec, s in zip(records, systems):
        rec["tegrastats"] = tegra.summary(windows[s.name]) if tegra.available else None
    rat = stats.ratios(records, "torch-eager-fp32" if o.baseline else None)
    return {
        "machine": machine,
        "config": {"artifacts": [str(a) for a in o.artifacts], "baseline": o.baseline,
                   "image": str(o.image) if o.image else "default 640x480 demo-scene frame",
                   "image_size": image_size, "prompt": o.prompt, "new_tokens": o.new_tokens,
                   "runs": o.runs, "warmup": o.warmup, "provider": o.provider,
                   "max_image_tokens": o.max_image_tokens,
                   "sweeps": list(o.sweeps), "order": [s.name for s in systems]},
        "systems": records,
        "ratios": rat,
        "targets": stats.targets(records, rat, "torch-eager-fp32" if o.baseline else None,
                                 machine),
        "sweeps": sweeps,
    }


def _image_size(path: Path) -> list[int]:
    from PIL import Image
    with Image.open(path) as im:
        return list(im.size)


def machine_facts(o: Options, probe: dict[str, Any], tegrastats: bool) -> dict[str, Any]:
    import onnxruntime
    return {"cpu": roofline.cpu_name(), "cores": os.cpu_count(), "threads": o.threads,
            "last_level_cache_bytes": roofline.last_level_cache_bytes(),
            **probe, "load_average": list(os.getloadavg()), "platform": platform.platform(),
            "python": platform.python_version(), "onnxruntime": onnxruntime.__version__,
            "tegrastats": tegrastats}


def _weights(spec: Spec) -> tuple[int, int]:
    """(bytes of all weights, bytes a decode step reads of them): the graphs
    this system runs (of an artifact with both decoder flavours, its own)."""
    if spec.kind == "torch":
        return spec.facts["weight_bytes"], spec.facts["decode_weight_bytes"]
    if spec.kind == "genai":  # all but the embedding table, of which a step reads a row
        graph = peer.model_file(spec.kind, spec.path)
        total = roofline.initializer_bytes(graph)
        if total is None:  # no onnx package: the files' sizes
            return (sum(f.stat().st_size for f in graph.parent.glob(graph.name + "*")),) * 2
        return total, total - roofline.lookup_table_bytes(graph)
    if spec.kind == "llamacpp":
        return roofline.gguf_bytes(peer.model_file(spec.kind, spec.path))
    m = spec.manifest
    roles = m.flavour_components(spec.decoder_flavour or m.decoder.flavour)
    sizes = {}
    for role, key in roles.items():  # the other flavour's graphs: on disk, never loaded
        comp = m.components[key]
        b = roofline.initializer_bytes(_graph(spec, key))
        if b is None:  # no onnx package: the files' sizes
            b = sum(m.files[f].bytes for f in (comp.file, comp.data_file) if f)
        sizes[role] = b
    return sum(sizes.values()), sizes["decoder"]


def _artifact_bytes(spec: Spec) -> int:
    """The bytes of the files this system loads: of an artifact with both
    decoder flavours, all but the other flavour's graphs (a weights file both
    vision graphs read counts, once)."""
    m = spec.manifest
    own = m.flavour_components(spec.decoder_flavour or m.decoder.flavour).values()
    mine = {f for key in own for f in m.component_files(key)}
    other = {f for key in m.components if key not in own
             for f in m.component_files(key)} - mine
    return sum(e.bytes for name, e in m.files.items() if name not in other)


def record(spec: Spec, runs: list[dict], memory: dict, machine: dict) -> dict[str, Any]:
    """One entry of `systems`: timings, memory, sizes, roofline shares."""
    rec: dict[str, Any] = {"name": spec.name, "kind": spec.kind, "path": str(spec.path),
                           "random_weights": spec.random_weights}
    if spec.kind in peer.KINDS:
        rec.update(precision=spec.precision, peer_of=spec.partner,
                   providers=spec.facts.get("providers"),
                   peer_version=spec.facts.get("peer_version"))
    elif spec.manifest:
        m = spec.manifest
        rec.update(family=m.family, target=m.target, precision=m.precision,
                   decoder_flavour=spec.facts.get("decoder_flavour") or spec.decoder_flavour,
                   providers=spec.facts.get("providers"),
                   artifact_bytes=_artifact_bytes(spec))
    else:
        rec.update(precision="fp32", torch_version=spec.facts.get("torch_version"))
    rec.update(stats.summarize(runs))
    weight_bytes, decode_weights = _weights(spec)
    kv = runs[-1].get("kv_cache_bytes") or 0
    before = spec.facts["rss_before_load_mb"]
    rec.update(
        load_s=spec.facts["load_s"], weight_bytes=weight_bytes,
        peak_rss_mb=memory["peak_rss_mb"], rss_before_load_mb=before,
        rss_after_load_mb=spec.facts["rss_after_load_mb"], rss_after_runs_mb=memory["rss_mb"],
        rss_growth_mb=memory["peak_rss_mb"] - before, gpu_memory_mb=memory.get("gpu_memory_mb"),
        kv_cache_bytes=kv, weights_kv_mb=(weight_bytes + kv) / 2**20)
    rec["rss_over_weights_kv"] = rec["rss_growth_mb"] / rec["weights_kv_mb"] \
        if rec["weights_kv_mb"] else None
    # Where the peak is reached: the high-water mark's growth over the RSS before
    # loading, after loading and after each stage of the first run (artifacts only).
    stages = memory.get("peak_by_stage_mb")
    after_load = spec.facts.get("peak_after_load_mb")
    rec["peak_growth_by_stage_mb"] = (
        {"load": after_load - before, **{k: v - before for k, v in stages.items()}}
        if stages and after_load is not None else None)
    rec["rss_anon_mb"], rec["rss_file_mb"] = memory.get("rss_anon_mb"), memory.get("rss_file_mb")
    # Decode's share of the bandwidth bound: bytes read per token x tokens/s / bandwidth.
    # rows the cache's memory holds: a preallocated buffer's capacity, else its length
    positions = runs[-1].get("kv_cache_rows") or \
        max(runs[-1]["prompt_tokens"] + runs[-1]["new_tokens"] - 1, 1)
    per_token = roofline.decode_bytes_per_token(decode_weights, kv / positions,
                                                rec["prompt_tokens"], rec["new_tokens"])
    bw = machine["bandwidth_gb_s"] * 1e9
    rec["decode_bytes_per_token"] = per_token
    rec["bandwidth_bound_tokens_per_s"] = bw / per_token
    tps = rec.get("decode_tokens_per_s")
    rec["bandwidth_efficiency"] = tps * per_token / bw if tps else None
    # Weights that fit in the last-level cache need not come from DRAM each step:
    # the DRAM bound then says little (efficiency can pass 100%).
    llc = machine.get("last_level_cache_bytes")
    rec["decode_fits_in_cache"] = bool(llc and per_token < llc)
    return rec


def add_flops(records: list[dict], specs: list[Spec], runs: dict, machine: dict) -> None:
    """Vision's and prefill's FLOPs from the ONNX graphs at the shapes run,
    and their share of the compute bound (the fp32 GEMM rate). The PyTorch
    baseline does the same arithmetic as the fp32 graphs: it takes theirs."""
    flops: dict[str, tuple] = {}
    for spec in specs:
        if spec.kind != "onnx":
            continue
        r = runs[spec.name][-1]
        vision = roofline.graph_flops(_graph(spec, "vision"), r["input_shapes"])
        decoder = spec.manifest.decoder_component(spec.decoder_flavour
                                                  or spec.manifest.decoder.flavour)
        prefill = roofline.graph_flops(_graph(spec, decoder),
                                       decoder_shapes(spec.manifest, r["prompt_tokens"]))
        flops[spec.name] = (vision, prefill)
    ref = next((v for k, v in flops.items() if k.startswith("onnx-fp32")),
               next(iter(flops.values()), (None, None)))
    gemm = machine["gemm_gflops"] * 1e9
    for rec in records:
        # the baseline takes the fp32 graphs' FLOPs; the peer has no vision to count
        vision, prefill = flops.get(rec["name"], ref if rec["kind"] == "torch" else (None, None))
        rec["vision_gflop"] = vision / 1e9 if vision else None
        rec["prefill_gflop"] = prefill / 1e9 if prefill else None
        for stage, f in (("vision", vision), ("prefill", prefill)):
            ms = rec.get(f"{stage}_ms")
            rec[f"{stage}_compute_efficiency"] = f / (ms / 1e3) / gemm if f and ms else None


def decoder_shapes(m, prompt_tokens: int) -> dict[str, list[int]]:
    """The decoder's input shapes for the prefill of `prompt_tokens` (empty
    past); m: the typed Manifest."""
    d = m.decoder
    shapes = {"inputs_embeds": [1, prompt_tokens, d.inputs_width],  # Qwen3-VL: deepstack too
              "attention_mask": [1, prompt_tokens],
              "position_ids": [3, 1, prompt_tokens] if d.position_ids == "mrope"
              else [1, prompt_tokens]}
    if d.attention_groups:
        shapes["attention_groups"] = [1, prompt_tokens]
    for name in d.past_names():
        shapes[name] = [1, d.num_kv_heads, 0, d.head_dim]
    return shapes


def _graph(spec: Spec, comp: str) -> Path:
    """A component's graph file, through the artifact's containment check."""
    from vlmedge import containment
    c = spec.manifest.components[comp]
    return containment.checked_graph(spec.path, c.file, f"components.{comp}.file",
                                     spec.manifest.files,
                                     allowed={c.data_file} if c.data_file else set())
