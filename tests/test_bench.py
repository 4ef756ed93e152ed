"""vlm-bench: end to end on the tiny LLaVA (one run, no timing assertions),
the JSON's documented keys, the report files, one-line errors, and the
parts that compute (FLOP counting, tegrastats parsing, ratios)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

SYSTEM_KEYS = {"name", "preprocess_ms", "vision_ms", "prefill_ms", "ttft_ms", "decode_ms_p50",
               "decode_ms_p90", "decode_ms_p99", "decode_tokens_per_s", "end_to_end_ms",
               "peak_rss_mb", "bandwidth_efficiency", "vision_compute_efficiency",
               "weight_bytes", "decode_bytes_per_token"}
MACHINE_KEYS = {"cpu", "threads", "bandwidth_gb_s", "gemm_gflops"}


def _bench(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "vlmedge.benchmarks.bench_cli", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def bench_run(tiny_llava_artifact, tmp_path_factory):
    art, _ = tiny_llava_artifact
    out = tmp_path_factory.mktemp("bench")
    r = _bench(art, "--baseline", "torch", "--runs", 1, "--warmup", 0, "--new-tokens", 4,
               "--threads", 1, "--sweep", "prompt-len", "--json", out / "bench.json",
               "--report", out / "report", "--quiet")
    assert r.returncode == 0, r.stderr[-3000:]
    return r, out


def test_runs_end_to_end_with_torch_baseline(bench_run):
    r, _ = bench_run
    assert "torch-eager-fp32" in r.stdout and "onnx-fp32" in r.stdout
    assert "onnx-fp32/torch-eager-fp32" in r.stdout  # the ratios table


def test_json_has_the_documented_keys(bench_run):
    _, out = bench_run
    res = json.loads((out / "bench.json").read_text())
    assert MACHINE_KEYS <= set(res["machine"])
    assert res["machine"]["threads"] == 1
    names = [s["name"] for s in res["systems"]]
    assert names == ["torch-eager-fp32", "onnx-fp32"]
    for s in res["systems"]:
        assert SYSTEM_KEYS <= set(s), SYSTEM_KEYS - set(s)
        assert s["new_tokens"] == 4  # forced: stop tokens never end a run early
        assert len(s["decode_ms_by_position"]) == 3
        assert s["peak_rss_mb"] > 0 and s["vision_gflop"] > 0
    onnx, torch_ = res["systems"][1], res["systems"][0]
    assert onnx["prompt_tokens"] == torch_["prompt_tokens"]  # the same work
    # where the peak is reached: a high-water mark, so it never falls stage to stage
    by = onnx["peak_growth_by_stage_mb"]
    assert list(by) == ["load", "vision", "prefill", "decode"]
    assert 0 < by["load"] <= by["vision"] <= by["prefill"] <= by["decode"] <= \
        onnx["rss_growth_mb"]
    assert torch_["peak_growth_by_stage_mb"] is None  # one generate() call: no stages
    for s in res["systems"]:
        assert 0 < s["rss_anon_mb"] and 0 < s["rss_file_mb"]
        assert s["rss_anon_mb"] + s["rss_file_mb"] <= s["rss_after_runs_mb"] + 1
    ratio = res["ratios"]["onnx-fp32/torch-eager-fp32"]
    assert {"decode_speedup", "ttft_speedup", "peak_rss_ratio"} <= set(ratio)
    assert any("decode tokens/s" in t["target"] for t in res["targets"])
    points = res["sweeps"]["prompt-len"]
    assert [p["value"] for p in points] == [1, 4, 16, 64]
    assert "skipped" in points[-1]  # 64 x the prompt exceeds the tiny model's context


def test_report_files_are_written(bench_run):
    _, out = bench_run
    report = out / "report"
    md = (report / "report.md").read_text()
    for section in ("## Latency per stage", "## Ratios", "## Roofline", "## Memory",
                    "## Sweep: prompt-len"):
        assert section in md
    assert "peak growth after load / vision / prefill / decode MB" in md
    for png in ("stages.png", "decode_latency.png", "sweep_prompt-len.png"):
        assert (report / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({png})" in md
    assert json.loads((report / "results.json").read_text())["systems"]


@pytest.mark.parametrize("args, message", [
    ([], "no artifact directory given"),
    (["{art}", "--sweep", "resolution"], "unknown --sweep 'resolution'"),
    (["{art}", "--runs", "0"], "--runs must be positive"),
    (["{art}", "--new-tokens", "1"], "--new-tokens must be >= 2"),
    (["{art}", "--baseline", "tensorflow"], "unknown --baseline"),
    (["{missing}"], "does not exist"),
    (["{art}", "--image", "{missing}"], "is not a file"),
])
def test_bad_arguments_get_one_clear_line(args, message, tiny_llava_artifact, tmp_path):
    art, _ = tiny_llava_artifact
    args = [a.format(art=art, missing=tmp_path / "nope") for a in args]
    r = _bench(*args, timeout=60)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vlm-bench: error: "), r.stderr
    assert message in lines[0]
    assert r.stdout == ""


def test_missing_baseline_model_is_one_line(tiny_llava_artifact, tmp_path):
    art, _ = tiny_llava_artifact
    r = _bench(art, "--baseline", "torch", "--model", tmp_path / "nope", timeout=60)
    assert r.returncode == 2 and "does not exist" in r.stderr
    assert r.stderr.strip().count("\n") == 0


def test_vision_flops_from_the_graph_equal_the_config(tiny_llava_artifact, tiny_llava_dir):
    """2 x multiply-adds of CLIP's patch conv, attention and MLP, and the projector."""
    from transformers import AutoConfig

    from vlmedge.benchmarks.bench import roofline

    art, _ = tiny_llava_artifact
    cfg = AutoConfig.from_pretrained(tiny_llava_dir)
    v, t = cfg.vision_config, cfg.text_config
    n, size, p, d, f = 2, v.image_size, v.patch_size, v.hidden_size, v.intermediate_size
    patches = (size // p) ** 2
    tokens = patches + 1  # + class token
    conv = 2 * patches * d * 3 * p * p
    layer = 2 * tokens * (4 * d * d + 2 * d * f) + 2 * 2 * tokens * tokens * d
    projected = tokens if cfg.vision_feature_select_strategy == "full" else patches
    projector = 2 * projected * (d * t.hidden_size + t.hidden_size * t.hidden_size)
    want = n * (conv + v.num_hidden_layers * layer + projector)
    got = roofline.graph_flops(art / "vision.onnx", {"pixel_values": [n, 3, size, size]})
    assert got == want


def test_decoder_bytes_are_its_initializers(tiny_llava_artifact):
    from vlmedge.benchmarks.bench import roofline

    art, _ = tiny_llava_artifact
    m = json.loads((art / "manifest.json").read_text())
    got = roofline.initializer_bytes(art / "decoder.onnx")
    data = m["files"]["decoder.onnx.data"]["bytes"]
    assert data <= got < data + m["files"]["decoder.onnx"]["bytes"]


def test_roofline_probe_reports_positive_rates():
    from vlmedge.benchmarks.bench import roofline

    r = roofline.measure(threads=1, repeats=2, matrix_mib=16)
    assert r["bandwidth_gb_s"] > 0 and r["gemm_gflops"] > 0
    assert "1 thread" in r["probe"]


def test_tegrastats_lines_parse():
    from vlmedge.benchmarks.bench.tegrastats import Tegrastats, parse

    orin = ("11-27-2026 03:45:01 RAM 2728/7620MB (lfb 1x4MB) SWAP 0/3810MB (cached 0MB) "
            "CPU [2%@1510,0%@1510] EMC_FREQ 0% GR3D_FREQ 12% cpu@47.5C VDD_IN 4811mW/4700mW "
            "VDD_CPU_GPU_CV 479mW/479mW VDD_SOC 1357mW/1357mW")
    got = parse(orin)
    assert got["ram_used_mb"] == 2728 and got["gpu_load_pct"] == 12
    assert got["power_mw"] == 4811 and got["vdd_soc_mw"] == 1357
    nano = "RAM 1534/3964MB (lfb 4x4MB) CPU [5%@102,off,off,off] GR3D_FREQ 0% POM_5V_IN 2342/2342"
    assert parse(nano)["power_mw"] == 2342
    t = Tegrastats()
    t.samples = [(1.0, {"power_mw": 10.0, "ram_used_mb": 5.0}), (2.0, {"power_mw": 20.0,
                                                                       "ram_used_mb": 7.0}),
                 (9.0, {"power_mw": 99.0})]
    s = t.summary([(0.5, 2.5)])
    assert s == {"samples": 2, "power_mw": 15.0, "ram_used_mb": 7.0}


def test_ratios_and_targets():
    from vlmedge.benchmarks.bench import stats

    base = {"name": "torch-eager-fp32", "decode_tokens_per_s": 10.0, "ttft_ms": 300.0,
            "preprocess_ms": 10.0, "vision_ms": 100.0, "prefill_ms": 100.0,
            "end_to_end_ms": 1000.0, "peak_rss_mb": 1000.0}
    fp32 = {**base, "name": "onnx-fp32", "target": "onnx", "precision": "fp32",
            "decode_tokens_per_s": 20.0, "ttft_ms": 150.0,
            "peak_rss_mb": 500.0, "bandwidth_efficiency": 0.6, "rss_over_weights_kv": 1.2}
    int8 = {**fp32, "name": "onnx-int8", "precision": "int8", "decode_tokens_per_s": 40.0,
            "bandwidth_efficiency": 0.4}
    rat = stats.ratios([base, fp32, int8], "torch-eager-fp32")
    assert set(rat) == {"onnx-fp32/torch-eager-fp32", "onnx-int8/torch-eager-fp32",
                        "onnx-int8/onnx-fp32"}
    assert rat["onnx-fp32/torch-eager-fp32"]["decode_speedup"] == 2.0
    assert rat["onnx-fp32/torch-eager-fp32"]["ttft_speedup"] == 2.0
    assert rat["onnx-fp32/torch-eager-fp32"]["peak_rss_ratio"] == 0.5
    assert rat["onnx-int8/onnx-fp32"]["decode_speedup"] == 2.0
    met = {t["target"]: t["met"] for t in stats.targets([base, fp32, int8], rat,
                                                        "torch-eager-fp32")}
    assert met["onnx-int8 decode tokens/s >= 2.5x torch-eager-fp32"] is True
    assert met["onnx-int8 decode at >= 50% of the bandwidth bound"] is False
    assert met["onnx-fp32 preprocessing <= 5% of TTFT"] is False  # 10 / 150 ms


def test_ort_flavour_ratios_and_targets():
    """ort-flavour systems: each against the portable system of its precision and
    its own flavour's fp32; the issue's decode targets by bit width (int8 vision
    keeps the decoder's target); RSS at 1.3x for the weight-only ones."""
    from vlmedge.benchmarks.bench import stats

    base = {"name": "torch-eager-fp32", "decode_tokens_per_s": 10.0, "ttft_ms": 300.0,
            "preprocess_ms": 1.0, "vision_ms": 100.0, "prefill_ms": 100.0,
            "end_to_end_ms": 1000.0, "peak_rss_mb": 1000.0}
    port = {**base, "name": "onnx-fp32", "target": "onnx", "precision": "fp32",
            "decoder_flavour": "portable", "decode_tokens_per_s": 20.0}
    ort32 = {**port, "name": "ort-fp32", "decoder_flavour": "ort", "decode_tokens_per_s": 40.0}
    ort4 = {**ort32, "name": "ort-int4-vint8", "precision": "int4", "ttft_ms": 100.0,
            "decode_tokens_per_s": 120.0, "rss_over_weights_kv": 1.4,
            "bandwidth_efficiency": 0.5}
    rat = stats.ratios([base, port, ort32, ort4], "torch-eager-fp32")
    assert rat["ort-fp32/onnx-fp32"]["decode_speedup"] == 2.0
    assert rat["ort-int4-vint8/ort-fp32"]["decode_speedup"] == 3.0  # its flavour's fp32
    met = {t["target"]: t["met"] for t in stats.targets([base, port, ort32, ort4], rat,
                                                        "torch-eager-fp32")}
    assert met["ort-int4-vint8 decode tokens/s >= 11.5x torch-eager-fp32"] is True
    assert met["ort-int4-vint8 TTFT >= 2x faster than torch-eager-fp32"] is True
    assert met["ort-fp32 decode tokens/s >= 3.5x torch-eager-fp32"] is True
    assert met["ort-int4-vint8 RSS growth <= 1.3x (weights + KV cache)"] is False
    assert met["ort-int4-vint8 decode at >= 45% of the bandwidth bound (bytes read)"] is True
    # a block other than 32 names the system (ort-int4-b128) and keeps the 4-bit target
    b128 = {**ort4, "name": "ort-int4-b128-vint8:smol-fast", "decode_tokens_per_s": 100.0}
    rat = stats.ratios([base, ort32, b128], "torch-eager-fp32")
    met = {t["target"]: t["met"] for t in stats.targets([base, ort32, b128], rat,
                                                        "torch-eager-fp32")}
    assert met["ort-int4-b128-vint8:smol-fast decode tokens/s >= 11.5x torch-eager-fp32"] is False


def test_decode_targets_carry_the_bandwidth_ceiling():
    """A decode speed-up target says how far the machine's bandwidth bound lets
    the system go: its speed-up at 100% of the bound (speed-up / efficiency),
    and whether the goal lies beyond it; the report prints both."""
    from vlmedge.benchmarks.bench import report, stats

    base = {"name": "torch-eager-fp32", "decode_tokens_per_s": 20.0, "ttft_ms": 300.0,
            "preprocess_ms": 1.0, "vision_ms": 100.0, "prefill_ms": 100.0,
            "end_to_end_ms": 1000.0, "peak_rss_mb": 1000.0}
    # int8 at 140 tokens/s = 7x eager, reading at 80% of the bound: at most 8.75x here
    int8 = {**base, "name": "ort-int8", "target": "onnx", "precision": "int8",
            "decoder_flavour": "ort", "decode_tokens_per_s": 140.0,
            "bandwidth_efficiency": 0.8, "rss_over_weights_kv": 1.2}
    # int4 at 6x eager, at 40% of the bound: 15x allowed, 11.5x is reachable
    int4 = {**int8, "name": "ort-int4", "precision": "int4", "decode_tokens_per_s": 120.0,
            "bandwidth_efficiency": 0.4}
    # the probe's 128 MiB matrix in a 512 MiB cache: the same regime as the systems'
    machine = {"last_level_cache_bytes": 512 << 20, "bandwidth_probe_bytes": 128 << 20}
    rat = stats.ratios([base, int8, int4], "torch-eager-fp32")
    res = {t["target"]: t for t in stats.targets([base, int8, int4], rat, "torch-eager-fp32",
                                                 machine)}
    t8 = res["ort-int8 decode tokens/s >= 9.5x torch-eager-fp32"]
    t4 = res["ort-int4 decode tokens/s >= 11.5x torch-eager-fp32"]
    assert t8["ceiling"] == pytest.approx(8.75) and t8["beyond_bound"] is True
    assert t4["ceiling"] == pytest.approx(15.0) and t4["beyond_bound"] is False
    assert t8["met"] is False and t4["met"] is False
    assert "ceiling" not in res["ort-int8 TTFT >= 2x faster than torch-eager-fp32"]
    table = report.targets_table({"targets": list(res.values())})
    assert "8.75x: goal beyond it" in table and "15.00x" in table
    # no ceiling where the bound does not bind: a system past 100% of it, or one
    # whose weights sit in a cache the probe's matrix did not fit in
    fast = {**int8, "bandwidth_efficiency": 1.2}
    cached = {**int8, "decode_fits_in_cache": True}
    for system, where in ((fast, machine), (cached, {**machine, "bandwidth_probe_bytes": 1 << 30})):
        rat = stats.ratios([base, system], "torch-eager-fp32")
        t = {t["target"]: t for t in stats.targets([base, system], rat, "torch-eager-fp32",
                                                   where)}
        assert "ceiling" not in t["ort-int8 decode tokens/s >= 9.5x torch-eager-fp32"]
    rat = stats.ratios([base, cached], "torch-eager-fp32")  # both in cache: comparable
    t = {t["target"]: t for t in stats.targets([base, cached], rat, "torch-eager-fp32", machine)}
    assert t["ort-int8 decode tokens/s >= 9.5x torch-eager-fp32"]["ceiling"] == pytest.approx(8.75)


# -- the onnxruntime-genai peer (--peer onnxruntime-genai) ---------------------------------------

@pytest.fixture(scope="module")
def ort_demo(tmp_path_factory):
    """The demo model exported with the ort decoder flavour (fp32)."""
    pytest.importorskip("onnxruntime_genai")
    from vlmedge.export import exporter
    from vlmedge.models import demo_model_dir

    out = tmp_path_factory.mktemp("peer") / "demo-ort-fp32"
    exporter.run_export(exporter.ExportOptions(model_dir=demo_model_dir(), output=out,
                                               decoder_flavour="ort", validate=False),
                        log=lambda line: None)
    return out


@pytest.mark.slow
def test_peer_runs_beside_its_partner(ort_demo, tmp_path):
    cache = tmp_path / "peers"
    r = _bench(ort_demo, "--peer", "onnxruntime-genai", "--peer-cache", cache, "--runs", 2,
               "--warmup", 0, "--new-tokens", 5, "--threads", 1, "--json",
               tmp_path / "b.json", "--report", tmp_path / "report", "--quiet", timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]  # every worker quit cleanly
    res = json.loads((tmp_path / "b.json").read_text())
    ours, peer = res["systems"]
    assert (ours["name"], peer["name"]) == ("ort-fp32", "genai-fp32")
    assert peer["peer_of"] == "ort-fp32" and peer["precision"] == "fp32"
    # the same work: as many positions attended (image tokens included), as many tokens
    assert peer["prompt_tokens"] == ours["prompt_tokens"] > 16
    assert peer["new_tokens"] == ours["new_tokens"] == 5
    assert len(peer["decode_ms_by_position"]) == 4 and peer["decode_tokens_per_s"] > 0
    assert peer["vision_ms"] is None and peer["preprocess_ms"] is None
    # bytes per decode step: the peer's graph less its embedding table, the same
    # weights as the artifact's decoder (whose table lives in embed.onnx)
    assert peer["decode_bytes_per_token"] == pytest.approx(ours["decode_bytes_per_token"],
                                                           rel=0.02)
    vs_peer = res["ratios"]["ort-fp32/genai-fp32"]
    assert vs_peer["decode_speedup"] > 0 and vs_peer["prefill_speedup"] > 0
    # no vision in the peer: its TTFT, end to end and memory do not compare
    assert vs_peer["ttft_speedup"] is vs_peer["end_to_end_speedup"] is None
    assert vs_peer["peak_rss_ratio"] is None
    target = [t for t in res["targets"] if ">= genai-fp32 (same weights" in t["target"]]
    assert len(target) == 1 and target[0]["goal"] == 1.0
    assert not any(t["target"].startswith("genai-fp32") for t in res["targets"])
    assert "genai-fp32 (onnxruntime-genai " in (tmp_path / "report" / "report.md").read_text()
    # built once into the cache, whole, and found there by the next run
    built = [p for p in cache.iterdir()]
    assert len(built) == 1 and (built[0] / "genai_config.json").is_file()
    from vlmedge.benchmarks.bench import peer as peer_mod
    from vlmedge.benchmarks.bench.systems import artifact_specs

    lines = []
    again = peer_mod.peer_specs(artifact_specs([ort_demo]), ["onnxruntime-genai"], cache,
                                lines.append)
    assert again[0].path == built[0] and "built before" in lines[0]
    assert (built[0] / "vlmedge-peer.json").is_file() and not list(cache.glob(".building-*"))


def test_peer_needs_an_ort_flavour_artifact(tiny_llava_artifact, tmp_path):
    art, _ = tiny_llava_artifact
    r = _bench(art, "--peer", "onnxruntime-genai", "--peer-cache", tmp_path, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "needs an ort-flavour artifact" in lines[0], r.stderr
    assert not any(tmp_path.iterdir())  # nothing built, nothing left behind


@pytest.mark.parametrize("args, message", [
    (["--peer", "tvm"], "unknown --peer 'tvm'"),
    (["--peer", "onnxruntime-genai", "--provider", "cuda"], "runs on the CPU provider only"),
])
def test_bad_peer_options_are_one_line(args, message, tiny_llava_artifact):
    art, _ = tiny_llava_artifact
    r = _bench(art, *args, timeout=60)
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert r.stderr.strip().count("\n") == 0


# -- the llama.cpp peer (--peer llama.cpp) -----------------------------------------------------

@pytest.fixture(scope="module")
def demo_gguf(tmp_path_factory):
    """The demo model's language model written as an f32 GGUF (gguf_model.py)."""
    pytest.importorskip("gguf")
    from vlmedge.benchmarks.bench import gguf_model
    from vlmedge.export import loading
    from vlmedge.models import demo_model_dir

    loaded = loading.load(demo_model_dir())
    path = tmp_path_factory.mktemp("gguf") / "demo-f32.gguf"
    gguf_model.write_f32(loaded, path)
    return path, loaded


def test_gguf_holds_the_language_model(demo_gguf):
    """Every tensor llama.cpp's llama architecture reads, with the Hugging Face
    values (Q and K rows reordered per head, and nothing else)."""
    import gguf

    from vlmedge.benchmarks.bench.gguf_model import _rotary_rows

    path, loaded = demo_gguf
    tc = loaded.family.text_config(loaded.model.config)
    state = {k: v.detach().numpy() for k, v in
             loaded.family.language_model(loaded.model).state_dict().items()}
    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: np.asarray(t.data) for t in reader.tensors}
    assert len(tensors) == 2 + 9 * tc.num_hidden_layers  # tied: no output.weight
    np.testing.assert_array_equal(tensors["token_embd.weight"], state["embed_tokens.weight"])
    for i in range(tc.num_hidden_layers):
        q = state[f"layers.{i}.self_attn.q_proj.weight"]
        got = tensors[f"blk.{i}.attn_q.weight"]
        np.testing.assert_array_equal(got, _rotary_rows(q, tc.num_attention_heads))
        assert not np.array_equal(got, q)  # reordered, not copied
        np.testing.assert_array_equal(tensors[f"blk.{i}.ffn_down.weight"],
                                      state[f"layers.{i}.mlp.down_proj.weight"])
    fields = reader.fields
    assert bytes(fields["general.architecture"].parts[-1]).decode() == "llama"
    assert int(fields["llama.block_count"].parts[-1][0]) == tc.num_hidden_layers
    assert int(fields["llama.vocab_size"].parts[-1][0]) == tc.vocab_size


def test_rotary_rows_pair_each_heads_halves():
    from vlmedge.benchmarks.bench.gguf_model import _rotary_rows

    w = np.arange(2 * 8 * 3).reshape(16, 3)  # 2 heads of 8 rows
    got = _rotary_rows(w, 2)[:, 0] // 3
    assert got.tolist() == [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]


def test_llama_cpp_computes_the_same_logits_as_pytorch(demo_gguf):
    """llama.cpp on the f32 GGUF against the PyTorch language model, on the same
    ids: the peer is the same model (a wrong rotary order breaks this)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    import torch

    from vlmedge.benchmarks.bench.gguf_model import quiet_llama

    path, loaded = demo_gguf
    ids = [5, 17, 42, 9, 77, 3, 120, 64]
    lib = llama_cpp
    quiet_llama(lib)
    model = lib.llama_model_load_from_file(str(path).encode(), lib.llama_model_default_params())
    params = lib.llama_context_default_params()
    params.n_ctx = params.n_batch = params.n_ubatch = 64
    params.n_threads = params.n_threads_batch = 1
    ctx = lib.llama_init_from_model(model, params)
    try:
        batch = (lib.llama_token * len(ids))(*ids)
        assert lib.llama_decode(ctx, lib.llama_batch_get_one(batch, len(ids))) == 0
        vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(model))
        got = np.ctypeslib.as_array(lib.llama_get_logits_ith(ctx, -1), shape=(vocab,)).copy()
    finally:
        lib.llama_free(ctx)
        lib.llama_model_free(model)
    fam, m = loaded.family, loaded.model
    with torch.inference_mode():
        hidden = fam.language_model(m)(input_ids=torch.tensor([ids])).last_hidden_state
        want = fam.lm_head(m)(hidden)[0, -1].float().numpy()
    assert int(np.argmax(got)) == int(np.argmax(want))
    assert np.abs(got - want).max() < 1e-2 * max(1.0, np.abs(want).max())


@pytest.mark.slow
def test_llama_cpp_peer_runs_beside_its_partner(ort_demo, tmp_path):
    pytest.importorskip("llama_cpp")
    pytest.importorskip("gguf")
    cache = tmp_path / "peers"
    r = _bench(ort_demo, "--peer", "llama.cpp", "--peer-cache", cache, "--runs", 2, "--warmup",
               0, "--new-tokens", 5, "--threads", 1, "--json", tmp_path / "b.json", "--quiet",
               timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]  # every worker quit cleanly
    res = json.loads((tmp_path / "b.json").read_text())
    ours, peer = res["systems"]
    assert peer["name"] == "llamacpp-f32" and peer["peer_of"] == "ort-fp32"
    assert peer["prompt_tokens"] == ours["prompt_tokens"] and peer["new_tokens"] == 5
    assert peer["decode_tokens_per_s"] > 0 and peer["vision_ms"] is None
    assert peer["peer_version"].startswith("llama-cpp-python ")
    # the weights counted are the GGUF's tensors: the file less its header and metadata
    gguf_file = next(cache.iterdir()) / "model.gguf"
    assert 0.98 * gguf_file.stat().st_size < peer["weight_bytes"] <= gguf_file.stat().st_size
    assert res["ratios"]["ort-fp32/llamacpp-f32"]["decode_speedup"] > 0


def test_gguf_bytes_count_the_lm_head_once(demo_gguf):
    """A tied model's table is its LM head: a decode step reads all of it."""
    from vlmedge.benchmarks.bench import roofline

    path, loaded = demo_gguf
    total, decode = roofline.gguf_bytes(path)
    params = sum(p.numel() for p in loaded.family.language_model(loaded.model).parameters())
    assert total == decode == 4 * params  # f32, the table counted once
    assert total < path.stat().st_size


def test_lookup_table_bytes_are_gather_only_tables(tmp_path):
    """An embedding only a Gather reads is a lookup table; one the LM head's
    MatMul also reads (tied) is not."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    from vlmedge.benchmarks.bench import roofline

    table = numpy_helper.from_array(np.zeros((50, 8), np.float32), "table")
    tied = numpy_helper.from_array(np.zeros((50, 8), np.float32), "tied")
    w = numpy_helper.from_array(np.zeros((8, 4), np.float32), "w")
    nodes = [helper.make_node("Gather", ["table", "ids"], ["a"]),
             helper.make_node("Gather", ["tied", "ids"], ["b"]),
             helper.make_node("MatMul", ["b", "tied_t"], ["c"]),
             helper.make_node("Transpose", ["tied"], ["tied_t"]),
             helper.make_node("MatMul", ["a", "w"], ["d"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64,
                                                                         [3])],
                              [helper.make_tensor_value_info("d", TensorProto.FLOAT, None)],
                              [table, tied, w])
    path = tmp_path / "g.onnx"
    onnx.save(helper.make_model(graph), str(path))
    assert roofline.lookup_table_bytes(path) == 50 * 8 * 4  # "table" only
    assert roofline.initializer_bytes(path) == (2 * 50 * 8 + 8 * 4) * 4


def test_peer_ratios_and_targets():
    """Each artifact against its peer: decode and prefill only; one target per
    pair; no vlmedge targets for a peer."""
    from vlmedge.benchmarks.bench import stats

    def rec(name, tps, prefill, **kw):
        return {"name": name, "decode_tokens_per_s": tps, "prefill_ms": prefill, "ttft_ms": 400.0,
                "end_to_end_ms": 900.0, "peak_rss_mb": 300.0, "preprocess_ms": 2.0, **kw}

    systems = [rec("torch-eager-fp32", 20.0, 150.0, precision="fp32"),
               rec("ort-int4", 150.0, 100.0, precision="int4", decoder_flavour="ort",
                   target="onnx"),
               rec("llamacpp-q4_0", 100.0, 110.0, precision="int4", peer_of="ort-int4",
                   ttft_ms=110.0, preprocess_ms=None)]
    rat = stats.ratios(systems, "torch-eager-fp32")
    pair = rat["ort-int4/llamacpp-q4_0"]
    assert pair["decode_speedup"] == pytest.approx(1.5)
    assert pair["prefill_speedup"] == pytest.approx(1.1)
    assert pair["ttft_speedup"] is pair["end_to_end_speedup"] is pair["peak_rss_ratio"] is None
    assert rat["llamacpp-q4_0/torch-eager-fp32"]["ttft_speedup"] is None
    targets = stats.targets(systems, rat, "torch-eager-fp32")
    vs_peer = [t for t in targets if "llamacpp-q4_0 (same weights" in t["target"]]
    assert len(vs_peer) == 1 and vs_peer[0]["met"] is True and vs_peer[0]["goal"] == 1.0
    assert not any(t["target"].startswith("llamacpp-q4_0") for t in targets)
    # without a baseline a peer is compared with its partner only
    alone = stats.ratios(systems[1:], None)
    assert set(alone) == {"ort-int4/llamacpp-q4_0"}


def test_peer_cache_sweeps_dead_builds_only(tmp_path):
    """A build killed mid-way leaves its scratch folder: the next build removes
    it, but never a live process's; a folder without its marker is no model."""
    import subprocess as sp

    from vlmedge.benchmarks.bench import peer

    dead = sp.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    gone = tmp_path / f".building-abc-{dead.pid}"
    alive = tmp_path / f".building-abc-{os.getpid()}"
    for d in (gone, alive):
        (d / "sub").mkdir(parents=True)
    peer._sweep(tmp_path)
    assert not gone.exists() and alive.exists()
    half = tmp_path / "0123456789abcdef"
    (half / "model.gguf").parent.mkdir()
    (half / "model.gguf").write_bytes(b"GGUF")
    assert not peer._whole(half)
    (half / "vlmedge-peer.json").write_text("[]\n")
    assert peer._whole(half)
