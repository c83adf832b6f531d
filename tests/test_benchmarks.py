"""The benchmarks' CPU smoke: the capacity search finds a known threshold exactly, every cache configuration's
capacity probe runs end to end on a tiny model, and capacity.py and decode.py write sane JSON, markdown and PNG.
(On the CPU the memory cap is a byte count: kvtier's own budget, the bytes any other cache holds.)"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import capacity  # noqa: E402
import common  # noqa: E402
import decode  # noqa: E402
import fidelity  # noqa: E402
import graph_decode  # noqa: E402
from search import ProbeTimeout, find_capacity  # noqa: E402

from kvtier.eval import chunked_perplexity  # noqa: E402


@pytest.mark.parametrize("threshold", [1, 255, 256, 1000, 4097, 65535])
def test_search_finds_a_known_threshold_exactly(threshold):
    probed = []

    def fits(tokens):
        probed.append(tokens)
        return tokens <= threshold

    result = find_capacity(fits, start=256, limit=1 << 20, resolution=0.0, granule=1)
    if threshold < 256:
        assert (result.max_tokens, result.status, probed) == (0, "none fit", [256])
    else:
        assert result.max_tokens == threshold and result.first_failure == threshold + 1
        assert result.status == "bisected" and not result.at_least
        assert len(probed) <= 2 * 20  # doubling and bisection, not a scan


def test_search_stops_at_the_limit_and_the_resolution():
    result = find_capacity(lambda tokens: True, start=1000, limit=5000)
    assert (result.max_tokens, result.status, result.at_least) == (5000, "upper limit", True)
    assert [probe[0] for probe in result.probes] == [1000, 2000, 4000, 5000]
    coarse = find_capacity(lambda tokens: tokens <= 70000, start=8192, limit=1 << 21, resolution=0.05, granule=1024)
    assert coarse.first_failure - coarse.max_tokens <= max(1024, 0.05 * coarse.max_tokens)
    assert coarse.max_tokens <= 70000 < coarse.first_failure and coarse.max_tokens % 1024 == 0


def test_search_reports_at_least_when_time_runs_out():
    now = [0.0]

    def fits(tokens):
        now[0] += 10.0  # each probe takes 10 s of a fake clock
        if tokens >= 4096:
            raise ProbeTimeout
        return True

    result = find_capacity(fits, start=1024, limit=1 << 20, time_limit_s=100.0, clock=lambda: now[0])
    assert (result.max_tokens, result.status, result.at_least) == (2048, "time limit", True)
    stopped = find_capacity(fits, start=1024, limit=1 << 20, time_limit_s=15.0, clock=lambda: now[0])
    assert (stopped.max_tokens, stopped.status) == (2048, "time limit")  # 2 probes, then the limit


@pytest.fixture(scope="module")
def tiny_model():
    return common.random_model(common.tiny_shape(), "cpu")


# tokens past a 0.5 MB cap: dense holds 1 KB a token; the others (host tiers with 0.5 MB more) fail at 4096
TOO_MANY = {"dense": 1024}


def test_every_capacity_probe_runs_end_to_end(tiny_model):
    args = capacity.parse(["--device", "cpu", "--tiny", "--decode", "1"])
    cap = 2**19
    for name in common.CACHES:
        reason = common.unavailable_reason(name, "cpu")
        if reason:
            assert name in ("offloaded", "quanto-int4")
            continue
        prober = capacity.Prober(name, tiny_model, args, cap / common.GB, cap / common.GB, cap)
        assert prober(256), name
        assert prober.last["tokens"] == 256 and prober.last["median_step_ms"] > 0
        assert not prober(TOO_MANY.get(name, 4096)), name
        assert getattr(tiny_model, "_kvtier", None) is None  # detached after every probe


def test_a_probe_cut_short_by_the_time_limit_detaches_kvtier(tiny_model):
    """The GPU run that found this: the warm-only search ran out of time mid-fill, and the next kvtier configuration
    could not attach ("kvtier is already attached")."""
    args = capacity.parse(["--device", "cpu", "--tiny", "--decode", "1"])
    cap = 2**19
    prober = capacity.Prober("kvtier-int4", tiny_model, args, cap / common.GB, cap / common.GB, cap)
    prober.ends_at = 0.0  # the search's time is already spent: the fill raises at its first chunk
    with pytest.raises(ProbeTimeout):
        prober(1024)
    assert getattr(tiny_model, "_kvtier", None) is None


def test_capacity_smoke_writes_sane_results(tmp_path):
    result = capacity.main(["--device", "cpu", "--tiny", "--caches", "dense", "kvtier-int4", "--decode", "1",
                            "--cpu-cache-mb", "0.5", "--start", "256", "--granule", "64", "--resolution", "0.25",
                            "--out", str(tmp_path)])
    rows = {row["cache"]: row for row in result["rows"]}
    # dense holds 1 KB a token (2 layers, 2 KV heads, head dim 64, bf16): (n + 1 decoded) KB within 0.5 MB
    assert 384 <= rows["dense"]["max_tokens"] < 512 and rows["dense"]["status"] == "bisected"
    # INT4 pages hold a token in 304 of those 1024 bytes, after a hot tier of about 0.23 MB
    assert rows["kvtier-int4"]["x_dense"] > 1.8
    saved = json.loads((tmp_path / "capacity-cpu.json").read_text())
    assert saved["rows"][0]["max_tokens"] == rows["dense"]["max_tokens"]
    table = (tmp_path / "capacity-cpu.md").read_text()
    assert "| transformers DynamicCache |" in table and "| kvtier INT4, warm only |" in table
    if common.pyplot() is not None:
        assert (tmp_path / "capacity-cpu.png").read_bytes()[:4] == b"\x89PNG"


def test_decode_smoke_writes_sane_results(tmp_path):
    result = decode.main(["--device", "cpu", "--tiny", "--contexts", "1024", "--batches", "1", "--steps", "1",
                          "--warmup", "0", "--caches", "dense", "kvtier-int4", "kvtier-int4-host", "offloaded",
                          "--out", str(tmp_path)])
    rows = {row["cache"]: row for row in result["rows"]}
    assert rows["dense"]["ms_per_token"] > 0 and rows["kvtier-int4"]["cold_tokens"] == 0
    assert rows["kvtier-int4-host"]["cold_tokens"] > 0  # the CPU budget sends most pages to the host tier
    assert rows["offloaded"]["skipped"].startswith("DynamicCache(offloading=True) needs a CUDA device")
    assert set(rows["kvtier-int4"]["speedup"]) == {"dense"}
    saved = json.loads((tmp_path / "decode-cpu.json").read_text())
    assert len(saved["rows"]) == 4
    assert "skipped: DynamicCache(offloading=True)" in (tmp_path / "decode-cpu.md").read_text()
    if common.pyplot() is not None:
        assert (tmp_path / "decode-cpu.png").read_bytes()[:4] == b"\x89PNG"


def test_graph_decode_smoke_writes_sane_results(tmp_path):
    """On the CPU the graph's fixed-shape step runs uncaptured: every timed step must take it (no eager fallback)."""
    result = graph_decode.main(["--device", "cpu", "--tiny", "--contexts", "512", "--steps", "1", "--warmup", "1",
                                "--caches", "kvtier-graph", "kvtier-eager", "dynamic-eager", "--out", str(tmp_path)])
    rows = {row["cache"]: row for row in result["rows"]}
    assert all(row["ms_per_token"] > 0 for row in rows.values())
    assert rows["kvtier-graph"]["graph"]["eager_steps"] == 0 and not rows["kvtier-graph"]["graph"]["captured"]
    table = (tmp_path / "graph-decode-cpu.md").read_text()
    assert "| kvtier INT4 (CUDA graph) | kvtier INT4 (eager) | DynamicCache (eager) |" in table
    assert len(json.loads((tmp_path / "graph-decode-cpu.json").read_text())["rows"]) == 3
    assert [(row["cache"], row["ttft_s"] > 0) for row in result["ttft"]] == [("kvtier", True), ("dynamic", True)]
    assert "Time to first token" in table


def test_chunked_perplexity_of_the_dense_cache_is_the_full_forward_one(smollm2):
    from transformers import DynamicCache

    model, tokenizer = smollm2
    ids = tokenizer("The grass is green. The sky is blue. " * 12, return_tensors="pt").input_ids[:, :96]
    with torch.no_grad():
        logits = model(ids).logits[0, :-1].double()
    losses = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
    expected = torch.exp(losses[40:].mean()).item()
    assert chunked_perplexity(model, ids, DynamicCache(), chunk=32, skip=40) == pytest.approx(expected, rel=1e-4)


def test_an_allocation_failure_reads_as_out_of_memory():
    assert common.is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert common.is_out_of_memory(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate"))
    assert not common.is_out_of_memory(RuntimeError("shape mismatch"))
    assert not common.is_out_of_memory(ValueError("out of memory"))


def test_fidelity_format_names_map_to_tier_config_fields():
    assert fidelity.format_settings("tq3+qjlmin") == {"warm_format": "turboquant", "turboquant_bits": 3,
                                                      "turboquant_qjl": True, "turboquant_center_keys": True,
                                                      "turboquant_qjl_estimator": "min_mse"}
    assert fidelity.format_settings("tq4+qjl-nomean") == {"warm_format": "turboquant", "turboquant_bits": 4,
                                                          "turboquant_qjl": True, "turboquant_center_keys": False,
                                                          "turboquant_qjl_estimator": "unbiased"}
    with pytest.raises(SystemExit, match=r"unknown format 'tq3\+qjlmax'"):
        fidelity.format_settings("tq3+qjlmax")


def test_fidelity_prints_int4_bytes_per_token_exactly():
    """SmolLM2's shape (3 KV heads, head dim 64, 64-token pages, key groups of 32): key and value codes at 4 bits,
    a float16 scale and minimum per channel per 32 keys and per value."""
    codes = 2 * 64 // 2
    key_params = 2 * 64 * 2 / 32
    value_params = 2 * 2
    assert fidelity.int4_bytes_per_head(3, 64, 32) == codes + key_params + value_params == 76
