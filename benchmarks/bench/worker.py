"""One benchmarked system in its own process: `python -m vlmedge.benchmarks.bench.worker`.

Each system (PyTorch eager, each artifact) runs in a process of its own so
that its peak RSS is its own (VmHWM of the worker: the interpreter, its
libraries, the weights, the KV cache and every transient of loading and
running), and one system's allocator state cannot slow another's.

Protocol: JSON lines. The first line on stdin is the spec
{"kind": "onnx"|"torch"|"genai"|"llamacpp", "path": ..., "threads": n, "provider": ...}; the
worker answers {"ready": ...facts}. Then each line is a command,
{"cmd": "run", "image": PATH, "prompt": TEXT, "new_tokens": N} -> timings,
{"cmd": "memory"} -> RSS figures, {"cmd": "quit"}. A user error answers
{"error": message, "type": error class}. Answers go to the original stdout; the
worker's fd 1 is pointed at stderr so a library's print cannot corrupt them.

Generation is greedy and forced to exactly N new tokens: stop tokens are
masked out of the argmax (transformers' min_new_tokens does the same for the
baseline), so every system does the same work.
"""
from __future__ import annotations

import functools
import json
import os
import resource
import sys
import time
from typing import Any

_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_mb() -> float:
    """Resident set size now, from /proc/self/statm (Linux)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE / 2**20
    except OSError:
        return float("nan")


def peak_rss_mb() -> float:
    """The process's high-water RSS: VmHWM of /proc/self/status (Linux), the
    peak of this process's own address space. Not getrusage's ru_maxrss: on
    Linux that also keeps the high-water mark of the address space replaced
    by exec, i.e. of the forking parent (vlm-bench, with its 128 MiB probe)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # macOS: bytes, own process
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def rss_split_mb() -> dict[str, float | None]:
    """RSS now as anonymous memory (heaps, arenas, copies of weights) and
    file-backed pages (libraries' code, weights mapped from the artifact's
    files: onnxruntime maps external data; how many of a file's pages a read
    maps depends on the page cache, so this part varies between runs), from
    /proc/self/status (Linux; None elsewhere)."""
    out: dict[str, float | None] = {"rss_anon_mb": None, "rss_file_mb": None}
    keys = {"RssAnon:": "rss_anon_mb", "RssFile:": "rss_file_mb"}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key = keys.get(line.split(":", 1)[0] + ":")
                if key:
                    out[key] = int(line.split()[1]) / 1024
    except OSError:
        pass
    return out


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000.0


class OnnxSystem:
    """An artifact through the vlmedge runtime's stages (runtime/session.py)."""

    def __init__(self, path: str, threads: int, provider: str, max_image_tokens=None,
                 decoder_flavour: str | None = None):
        from vlmedge.runtime import VLMSession

        # verify=False: vlm-bench checked the hashes before starting the workers
        self.session = VLMSession(path, provider=provider, threads=threads, verify=False,
                                  max_image_tokens=max_image_tokens,
                                  decoder_flavour=decoder_flavour)
        self.images: dict[str, Any] = {}
        # the high-water RSS after each stage of the first run: where the peak is reached
        self.peak_by_stage: dict[str, float] | None = None

    def facts(self) -> dict[str, Any]:
        return {"providers": self.session.providers,
                "decoder_flavour": self.session.decoder_flavour}

    def run(self, image_path: str, prompt: str, new_tokens: int) -> dict[str, Any]:
        from vlmedge.errors import ContextOverflowError

        s = self.session
        image = _cached_image(self.images, image_path)
        t_start = time.perf_counter()
        pixels, grid = s.preprocess(image, copy=False)  # as generate() does: no copy timed
        preprocess_ms = _ms(t_start)
        ids = s.chat.prompt_ids(prompt, with_image=True, image_grid=grid)
        if len(ids) + new_tokens > s.context_length:
            raise ContextOverflowError(
                "prompt + image tokens + new tokens exceed the context length",
                expected=f"<= {s.context_length}", got=f"{len(ids)} + {new_tokens}")
        t = time.perf_counter()
        feats = s.encode_image(pixels, grid)
        vision_ms = _ms(t)
        # the first run (a warm-up, unless --warmup 0) reads where the peak is
        # reached: three reads of /proc, ~30 us each, between the stages' own
        # timings (that run's TTFT and total hold them)
        first = self.peak_by_stage is None
        peaks = [peak_rss_mb()] if first else []
        t = time.perf_counter()
        logits, cache = s.prefill(ids, feats, s.empty_cache(), grid)
        prefill_ms = _ms(t)
        # The session's own decode loop, its stop tokens masked: exactly new_tokens.
        timings: dict = {}
        peaks += [peak_rss_mb()] if first else []
        tokens = list(s.decode(logits, cache, new_tokens, force_length=True, timings=timings,
                               t_start=t_start))
        if first:
            self.peak_by_stage = dict(zip(("vision", "prefill", "decode"),
                                          peaks + [peak_rss_mb()]))
        decode_ms, ttft_ms = timings["decode_ms"], timings["ttft_ms"]
        return {"preprocess_ms": preprocess_ms, "vision_ms": vision_ms, "prefill_ms": prefill_ms,
                "ttft_ms": ttft_ms, "decode_ms": decode_ms, "total_ms": _ms(t_start),
                "prompt_tokens": len(ids), "new_tokens": len(tokens), "token_ids": tokens[:8],
                "kv_cache_bytes": timings["kv_cache_bytes"],
                "kv_cache_rows": timings["kv_cache_rows"],
                "input_shapes": _vision_shapes(s, pixels, grid)}


def _vision_shapes(session, pixels, grid) -> dict[str, list[int]]:
    """Concrete shapes of the vision graph's inputs for this image (FLOP counting)."""
    shapes = {session.vision.input_names[0]: list(pixels.shape)}
    extra = session.vision.input_names[1:]
    if extra:
        from vlmedge.runtime import mrope
        io = {t.name: list(t.shape) for t in session.manifest.components["vision"].inputs}
        feeds = mrope.vision_inputs(extra, grid, session.image_facts, io)
        shapes.update({k: list(v.shape) for k, v in feeds.items()})
    return shapes


def _cached_image(cache: dict, path: str):
    """The decoded image (PIL, RGB), loaded once: decoding a file is not a stage."""
    if path not in cache:
        from PIL import Image
        with Image.open(path) as im:
            cache[path] = im.convert("RGB")
    return cache[path]


class TorchSystem:
    """PyTorch eager through transformers' generate() with its KV cache: the
    baseline. Stages are measured on the same boundaries as OnnxSystem:
    preprocess = the HF processor call (chat template, tokenization and image
    processing); vision = get_image_features inside the forward pass (timed
    by wrapping it); prefill = from generate() to the first token, less
    vision; TTFT and decode per token from a stopping criterion, which
    generate() calls once per new token."""

    def __init__(self, path: str, threads: int, random_weights: bool,
                 max_image_tokens: int | None = None):
        from pathlib import Path

        from vlmedge.export import loading
        from vlmedge.lazy import require

        torch = require("torch", "the PyTorch baseline")
        transformers = require("transformers", "the PyTorch baseline")
        transformers.logging.set_verbosity_error()
        torch.set_num_threads(threads)
        self.torch = torch
        loaded = loading.load(Path(path), random_weights=random_weights)
        self.family, self.model, self.processor = loaded.family, loaded.model, loaded.processor
        self.max_image_tokens = max_image_tokens
        self.images: dict[str, Any] = {}
        self.vision_ms: list[float] = []
        inner = self.model.model
        original = inner.get_image_features

        # wraps: generate() reads the signature to pick the encoder's arguments.
        @functools.wraps(original)
        def timed_image_features(*args, **kwargs):
            t = time.perf_counter()
            out = original(*args, **kwargs)
            self.vision_ms.append(_ms(t))
            return out

        inner.get_image_features = timed_image_features  # instance attribute: forward() finds it

    def _budget(self, image) -> None:
        if not hasattr(self, "_budget_facts"):  # image_facts runs the vision tower once
            self._budget_facts = _budget_facts(self.family, self.model, self.processor)
        _budget_processor(self.processor, self._budget_facts, image, self.max_image_tokens)

    def facts(self) -> dict[str, Any]:
        """Bytes a decode step reads: the decoder's weights (without the
        embedding table, of which it reads one row) plus the LM head."""
        fam, model = self.family, self.model
        lm = fam.language_model(model)
        head = fam.lm_head(model)
        emb = model.get_input_embeddings().weight
        params = {id(p): p for p in lm.parameters() if p is not emb}
        params.update({id(p): p for p in head.parameters()})
        weight_bytes = sum(p.numel() * p.element_size() for p in params.values())
        all_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        return {"decode_weight_bytes": weight_bytes, "weight_bytes": all_bytes,
                "torch_version": self.torch.__version__}

    def run(self, image_path: str, prompt: str, new_tokens: int) -> dict[str, Any]:
        torch = self.torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        image = _cached_image(self.images, image_path)
        marks: list[float] = []

        class Mark(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                marks.append(time.perf_counter())
                return torch.zeros(input_ids.shape[0], dtype=torch.bool)

        self.vision_ms.clear()
        t_start = time.perf_counter()
        if self.max_image_tokens is not None:
            self._budget(image)
        inputs = self.family.hf_inputs(self.processor, image, prompt)
        preprocess_ms = _ms(t_start)
        prompt_tokens = int(inputs["input_ids"].shape[1])
        limit = self.family.max_context(self.model)
        if prompt_tokens + new_tokens > limit:
            from vlmedge.errors import ContextOverflowError
            raise ContextOverflowError(
                "prompt + image tokens + new tokens exceed the context length",
                expected=f"<= {limit}", got=f"{prompt_tokens} + {new_tokens}")
        t_gen = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(
                **inputs, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                use_cache=True, stopping_criteria=StoppingCriteriaList([Mark()]),
                return_dict_in_generate=True)
        total_ms = _ms(t_start)
        vision_ms = sum(self.vision_ms)
        tokens = out.sequences[0, prompt_tokens:].tolist()
        return {"preprocess_ms": preprocess_ms, "vision_ms": vision_ms,
                "prefill_ms": (marks[0] - t_gen) * 1000.0 - vision_ms,
                "ttft_ms": (marks[0] - t_start) * 1000.0,
                "decode_ms": [(b - a) * 1000.0 for a, b in zip(marks, marks[1:])],
                "total_ms": total_ms, "prompt_tokens": prompt_tokens,
                "new_tokens": len(tokens), "token_ids": tokens[:8],
                "kv_cache_bytes": _cache_bytes(out)}


class GenaiSystem:
    """The onnxruntime-genai peer (peer.py): its generator over its own model
    of the same language model. Text only: a prompt of `prompt_tokens` tokens
    (the partner artifact's whole prompt, image tokens included, so every
    decode step attends over as many positions), exactly new_tokens tokens
    (min_length = max_length), greedy. append_tokens is the prefill; each
    generate_next_token after the first runs one decoder step and picks a
    token, the same span as a decode_ms entry of the artifacts."""

    def __init__(self, path: str, threads: int):
        from vlmedge.lazy import require

        og = require("onnxruntime_genai", "the onnxruntime-genai peer")
        self.og = og
        from tokenizers import Tokenizer

        from vlmedge.errors import ArtifactError
        try:
            config = og.Config(path)
            options = {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
            config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
            config.clear_providers()  # the CPU (vlm-bench refuses --peer with another provider)
            self.model = og.Model(config)
            # the prompt's ids through the tokenizers package: onnxruntime-genai's own
            # tokenizer does not read every tokenizer.json (the demo model's, for one)
            self.tokenizer = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
            with open(os.path.join(path, "genai_config.json")) as f:
                self.config = json.load(f)["model"]
        except Exception as e:  # onnxruntime-genai and tokenizers raise untyped errors
            raise ArtifactError(f"the peer model in {path} does not load: "
                                f"{str(e).strip().splitlines()[0][:200] if str(e) else e!r}",
                                hint="delete that folder and vlm-bench builds it again") from None

    def facts(self) -> dict[str, Any]:
        # weight bytes are counted by vlm-bench from the graph file (run.py),
        # not here: the onnx package would add to this process's RSS
        return {"providers": ["CPUExecutionProvider"],
                "peer_version": f"onnxruntime-genai {self.og.__version__}"}

    def run(self, image_path: str, prompt: str, new_tokens: int,
            prompt_tokens: int | None = None) -> dict[str, Any]:
        import numpy as np

        og = self.og
        ids = self.tokenizer.encode(prompt, add_special_tokens=False).ids or [0]
        n = prompt_tokens or len(ids)
        ids = np.array((ids * (n // len(ids) + 1))[:n], dtype=np.int32)
        if n + new_tokens > self.config["context_length"]:
            from vlmedge.errors import ContextOverflowError
            raise ContextOverflowError(
                "prompt + new tokens exceed the peer model's context length",
                expected=f"<= {self.config['context_length']}", got=f"{n} + {new_tokens}")
        params = og.GeneratorParams(self.model)
        params.set_search_options(do_sample=False, max_length=n + new_tokens,
                                  min_length=n + new_tokens)
        generator = og.Generator(self.model, params)
        t_start = time.perf_counter()
        generator.append_tokens(ids)
        prefill_ms = _ms(t_start)
        marks = []
        while not generator.is_done():
            generator.generate_next_token()
            marks.append(time.perf_counter())
        tokens = list(generator.get_sequence(0))[n:]
        d = self.config["decoder"]
        # the fp32 cache (a CPU build): one buffer max_length long, past and present shared
        kv = 2 * d["num_hidden_layers"] * d["num_key_value_heads"] * d["head_size"] * 4 * \
            (n + new_tokens)
        return _peer_run(t_start, prefill_ms, marks, n, tokens, kv, n + new_tokens)


def _peer_run(t_start: float, prefill_ms: float, marks: list[float], prompt_tokens: int,
              tokens: list[int], kv_bytes: int, kv_rows: int) -> dict[str, Any]:
    """A peer's run record: `marks` are the times each token was chosen, so
    decode_ms[i] spans one decoder step and one sample, as the artifacts'."""
    return {"preprocess_ms": None, "vision_ms": None, "prefill_ms": prefill_ms,
            "ttft_ms": (marks[0] - t_start) * 1000.0,
            "decode_ms": [(b - a) * 1000.0 for a, b in zip(marks, marks[1:])],
            "total_ms": _ms(t_start), "prompt_tokens": prompt_tokens, "new_tokens": len(tokens),
            "token_ids": [int(t) for t in tokens[:8]], "kv_cache_bytes": kv_bytes,
            "kv_cache_rows": kv_rows}


class LlamaCppSystem:
    """The llama.cpp peer (peer.py): llama.cpp through llama-cpp-python's C
    API, on its model of the same language model (gguf_model.py). Like
    GenaiSystem: text only, a prompt of `prompt_tokens` ids (the partner's
    length), exactly new_tokens tokens, greedy with llama.cpp's own sampler;
    one llama_decode of the prompt is the prefill, then each token is one
    llama_decode of the previous token and a sample (a decode_ms entry)."""

    def __init__(self, path: str, threads: int):
        from vlmedge.lazy import require

        lib = require("llama_cpp", "the llama.cpp peer")
        self.lib, self.threads = lib, threads
        from .gguf_model import quiet_llama
        quiet_llama(lib)
        params = lib.llama_model_default_params()
        params.n_gpu_layers = 0  # the CPU, as the artifacts (a GPU build would offload all)
        gguf = os.path.join(path, "model.gguf")
        self.model = lib.llama_model_load_from_file(gguf.encode(), params)
        if not self.model:
            from vlmedge.errors import ArtifactError
            raise ArtifactError(f"llama.cpp could not load the peer model {gguf}")
        self.ctx, self.n_ctx = None, 0
        self.sampler = lib.llama_sampler_init_greedy()

    def _context(self, need: int):
        """A context with room for `need` positions (made again only to grow)."""
        lib = self.lib
        if self.ctx is None or need > self.n_ctx:
            if self.ctx is not None:
                lib.llama_free(self.ctx)
            params = lib.llama_context_default_params()
            self.n_ctx = max(512, -(-need // 256) * 256)
            params.n_ctx = params.n_batch = params.n_ubatch = self.n_ctx
            params.n_threads = params.n_threads_batch = self.threads
            params.no_perf = True
            params.offload_kqv = params.op_offload = False
            self.ctx = lib.llama_init_from_model(self.model, params)
            if not self.ctx:
                from vlmedge.errors import ArtifactError
                raise ArtifactError(f"llama.cpp could not make a context of {self.n_ctx} "
                                    "positions for the peer model")
        lib.llama_memory_clear(lib.llama_get_memory(self.ctx), True)
        return self.ctx

    def facts(self) -> dict[str, Any]:
        return {"providers": ["llama.cpp CPU"],
                "peer_version": f"llama-cpp-python {self.lib.__version__}"}

    def run(self, image_path: str, prompt: str, new_tokens: int,
            prompt_tokens: int | None = None) -> dict[str, Any]:
        lib = self.lib
        n = prompt_tokens or 16
        vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(self.model))
        ids = [(7 * i + 3) % vocab for i in range(n)]  # any ids: the weights set the pace
        ctx = self._context(n + new_tokens)
        t_start = time.perf_counter()
        prompt_ids = (lib.llama_token * n)(*ids)
        if lib.llama_decode(ctx, lib.llama_batch_get_one(prompt_ids, n)) != 0:
            from vlmedge.errors import ArtifactError
            raise ArtifactError("llama.cpp failed to decode the prompt")
        prefill_ms = _ms(t_start)
        tokens, marks = [], []
        one = (lib.llama_token * 1)()
        for i in range(new_tokens):
            if i:
                one[0] = tokens[-1]
                if lib.llama_decode(ctx, lib.llama_batch_get_one(one, 1)) != 0:
                    from vlmedge.errors import ArtifactError
                    raise ArtifactError(f"llama.cpp failed to decode token {i} of the peer")
            tokens.append(int(lib.llama_sampler_sample(self.sampler, ctx, -1)))
            marks.append(time.perf_counter())
        m = self.model  # the KV cache: f16 keys and values, n_ctx rows per layer
        per_row = 2 * 2 * lib.llama_model_n_layer(m) * lib.llama_model_n_head_kv(m) * \
            (lib.llama_model_n_embd(m) // lib.llama_model_n_head(m))
        kv = per_row * self.n_ctx
        return _peer_run(t_start, prefill_ms, marks, n, tokens, kv, self.n_ctx)

    def close(self) -> None:
        """llama.cpp's sampler, context and model, freed (its memory is its own)."""
        lib = self.lib
        lib.llama_sampler_free(self.sampler)
        if self.ctx is not None:
            lib.llama_free(self.ctx)
        lib.llama_model_free(self.model)


def _budget_facts(family, model, processor):
    """(the artifact's tiling config, its image facts) as the exporter writes
    them: what the budget is computed from. Computed once per worker (outside
    the timed runs): image_facts runs the vision tower on a blank tile."""
    from types import SimpleNamespace

    return (family.preprocess_config(processor).get("tiling"),
            SimpleNamespace(**family.image_facts(model, processor)))


def _budget_processor(processor, facts, image, max_tokens: int) -> None:
    """Sets the HF image processor to the tiling the runtime's image-token budget
    picks for `image` (runtime/image_budget.py), so the baseline encodes the
    same tokens: Idefics3/SmolVLM longest_edge, Qwen2-VL max_pixels.
    facts: _budget_facts()."""
    from vlmedge.runtime.image_budget import budget_tiling

    tiling_config, image_facts = facts
    tiling = budget_tiling(tiling_config, image_facts, (image.height, image.width), max_tokens)
    ip = processor.image_processor
    if tiling is None:  # a fixed-size image: nothing to set
        return
    if tiling["method"] == "idefics3":
        ip.size = _with(ip.size, longest_edge=tiling["longest_edge"])
    else:  # qwen2_vl: max_pixels, where this transformers keeps it
        ip.max_pixels = tiling["max_pixels"]
        key = "max_pixels" if "max_pixels" in ip.size else "longest_edge"
        ip.size = _with(ip.size, **{key: tiling["max_pixels"]})


def _with(size, **changes):
    """An image processor's `size` (a dict, or transformers' SizeDict dataclass)
    with `changes` applied."""
    import dataclasses
    if dataclasses.is_dataclass(size):
        return dataclasses.replace(size, **changes)
    return {**size, **changes}


def _cache_bytes(out) -> int | None:
    cache = getattr(out, "past_key_values", None)
    layers = getattr(cache, "layers", None)
    if not layers:
        return None
    return int(sum(l.keys.numel() * l.keys.element_size() + l.values.numel() *
                   l.values.element_size() for l in layers if getattr(l, "keys", None) is not None))


def _open(spec: dict[str, Any]):
    if spec["kind"] == "genai":
        return GenaiSystem(spec["path"], spec["threads"])
    if spec["kind"] == "llamacpp":
        return LlamaCppSystem(spec["path"], spec["threads"])
    if spec["kind"] == "onnx":
        return OnnxSystem(spec["path"], spec["threads"], spec.get("provider", "cpu"),
                          spec.get("max_image_tokens"), spec.get("decoder_flavour"))
    return TorchSystem(spec["path"], spec["threads"], bool(spec.get("random_weights")),
                       spec.get("max_image_tokens"))


def _gpu_memory_mb() -> float | None:
    """This process's GPU memory from nvidia-smi, where there is one."""
    import shutil
    import subprocess
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True,
                             timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        pid, _, mem = line.partition(",")
        if pid.strip() == str(os.getpid()):
            return float(mem)
    return None


def _import_libraries(kind: str) -> None:
    """Imports what the system needs before its model loads, so that RSS
    growth from here on is the model's (weights, caches, arenas)."""
    import numpy  # noqa: F401
    import onnxruntime  # noqa: F401
    import PIL.Image  # noqa: F401

    import vlmedge.runtime  # noqa: F401
    if kind == "genai":
        import onnxruntime_genai  # noqa: F401
    if kind == "llamacpp":
        import llama_cpp  # noqa: F401
    if kind == "torch":
        import torch  # noqa: F401
        import transformers

        import vlmedge.export.loading  # noqa: F401
        transformers.utils.logging.disable_progress_bar()


def serve(inp, out) -> None:
    from vlmedge.errors import VlmedgeError

    def send(obj):
        out.write(json.dumps(obj) + "\n")
        out.flush()

    spec = json.loads(inp.readline())
    at_start = rss_mb()
    _import_libraries(spec["kind"])
    before = rss_mb()  # the model's share of RSS is measured from here
    t = time.perf_counter()
    try:
        system = _open(spec)
    except VlmedgeError as e:
        send({"error": str(e), "type": type(e).__name__})
        return
    send({"ready": True, "load_s": time.perf_counter() - t, "rss_at_start_mb": at_start,
          "rss_before_load_mb": before, "rss_after_load_mb": rss_mb(),
          "peak_after_load_mb": peak_rss_mb(), **system.facts()})
    for line in inp:
        cmd = json.loads(line)
        if cmd["cmd"] == "quit":
            if hasattr(system, "close"):
                system.close()
            return
        if cmd["cmd"] == "memory":
            send({"peak_rss_mb": peak_rss_mb(), "rss_mb": rss_mb(), **rss_split_mb(),
                  "peak_by_stage_mb": getattr(system, "peak_by_stage", None),
                  "gpu_memory_mb": _gpu_memory_mb()})
            continue
        try:
            # a peer's prompt length, its partner's (peers only are sent one)
            extra = {"prompt_tokens": cmd["prompt_tokens"]} if cmd.get("prompt_tokens") else {}
            send(system.run(cmd["image"], cmd["prompt"], int(cmd["new_tokens"]), **extra))
        except VlmedgeError as e:
            send({"error": str(e), "type": type(e).__name__})


def main() -> None:
    # Answers go to the real stdout; anything printed by a library goes to stderr.
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    serve(sys.stdin, out)


if __name__ == "__main__":
    main()
