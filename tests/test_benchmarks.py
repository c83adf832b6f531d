"""The benchmarks' CPU smoke: the capacity search finds a known threshold exactly, every cache configuration's
capacity probe runs end to end on a tiny model, and capacity.py and decode.py write sane JSON, markdown and PNG;
the soak's warm-up covers every kind of call it makes and its baseline follows the warm-up.
(On the CPU the memory cap is a byte count: kvtier's own budget, the bytes any other cache holds.)"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import capacity  # noqa: E402
import capacity_probe  # noqa: E402
import common  # noqa: E402
import decode  # noqa: E402
import fidelity  # noqa: E402
import graph_decode  # noqa: E402
import quality  # noqa: E402
import soak  # noqa: E402
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
                            "--kvtier", "query_tile=16", "--out", str(tmp_path)])
    assert result["settings"]["kvtier_overrides"] == {"query_tile": 16}
    rows = {row["cache"]: row for row in result["rows"]}
    # dense holds 1 KB a token (2 layers, 2 KV heads, head dim 64, bf16): (n + 1 decoded) KB within 0.5 MB
    assert 384 <= rows["dense"]["max_tokens"] < 512 and rows["dense"]["status"] == "bisected"
    # INT4 pages hold a token in 304 of those 1024 bytes, after a hot tier of about 0.23 MB
    assert rows["kvtier-int4"]["x_dense"] > 1.8
    saved = json.loads((tmp_path / "capacity-cpu.json").read_text())
    assert saved["rows"][0]["max_tokens"] == rows["dense"]["max_tokens"]
    table = (tmp_path / "capacity-cpu.md").read_text()
    assert "| transformers DynamicCache |" in table and "| kvtier INT4, warm only |" in table
    assert "TierConfig {'query_tile': 16}" in table
    if common.pyplot() is not None:
        assert (tmp_path / "capacity-cpu.png").read_bytes()[:4] == b"\x89PNG"


def test_quality_passkey_parity_is_every_case_the_dense_cache_answers():
    dense = [True, False, True, False]
    more = quality.summarize("kvtier-int4", [], 76.0, [10.0], [True, True, True, False], dense, 128)
    fewer = quality.summarize("kvtier-int4", [], 76.0, [10.0], [True, True, False, True], dense, 128)
    assert more["passkey_parity"] and more["passkeys_lost"] == []  # answering a case dense misses is no loss
    assert not fewer["passkey_parity"] and fewer["passkeys_lost"] == [2]  # as many answered, but one dense answers


def test_capacity_plot_from_saved_results_joins_calls_under_one_cap(tmp_path):
    def saved(name, cap, rows):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"environment": {"device": "GPU"}, "settings": {"cap": cap}, "rows": rows}))
        return str(path)

    def row(cache, tokens, at_least=False):
        return {"cache": cache, "label": common.LABELS[cache], "max_tokens": tokens, "at_least": at_least,
                "status": "upper limit" if at_least else "bisected"}

    first = saved("first", "8 GB", [row("dense", 1000), row("kvtier-int4", 3500)])
    second = saved("second", "8 GB", [row("kvtier-int4-host", 16000, at_least=True), row("dense", 999)])
    joined = capacity.main(["--plot-from", first, second, "--out", str(tmp_path), "--name", "joined"])
    assert [r["cache"] for r in joined["rows"]] == ["dense", "kvtier-int4", "kvtier-int4-host"]  # each cache once
    assert [r["x_dense"] for r in joined["rows"]] == [1.0, 3.5, 16.0]  # against the first file's dense row
    if common.pyplot() is not None:
        assert (tmp_path / "joined.png").read_bytes()[:4] == b"\x89PNG"
    other_cap = saved("other", "9 GB", [row("dense", 1100)])
    with pytest.raises(SystemExit, match="one cap"):
        capacity.main(["--plot-from", first, other_cap, "--out", str(tmp_path)])


@pytest.mark.parametrize("budget_gb, fits", [(0.5, True), (0.0005, False)])
def test_capacity_probes_record_each_outcome_and_why_not(tmp_path, budget_gb, fits):
    result = capacity_probe.main(["--device", "cpu", "--tiny", "--probe", "dense", "300", "--probe", "kvtier-int4",
                                  "600", "--budget-gb", str(budget_gb), "--kvtier", "query_tile=16", "--decode", "2",
                                  "--out", str(tmp_path)])
    dense, tiered = result["rows"]
    assert dense["fit"] and len(dense["steps_ms"]) == 2 and "error" not in dense
    assert tiered["fit"] == fits and result["settings"]["kvtier"] == {"query_tile": 16}
    if not fits:  # the budget cannot hold the hot window: kvtier says so, and the row keeps it
        assert tiered["error"].startswith("BudgetTooSmallError: kvtier: budget_gb=0.0005")
    table = (tmp_path / "capacity-probe-cpu.md").read_text()
    assert "| kvtier INT4, warm only | 600 | 2.00x | " + ("fits" if fits else "does not fit (BudgetTooSmallError") in table
    if fits:  # the override reached the cache: scratch for 16-row query tiles, not 256
        default = capacity_probe.main(["--device", "cpu", "--tiny", "--probe", "kvtier-int4", "600", "--decode", "1",
                                       "--budget-gb", "0.5", "--kvtier", "--out", str(tmp_path)])  # TierConfig's own
        assert tiered["scratch_gb"] < default["rows"][0]["scratch_gb"] / 2


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
    a one-byte scale code and a float16 minimum per channel per 32 keys, a float16 scale base per 32 keys (a page's
    3 heads x 2 groups x 2 bytes, padded to 16 bytes), and a float16 scale and minimum per value."""
    codes = 2 * 64 // 2
    key_params = 64 * (1 + 2) / 32
    scale_bases = 16 / (64 * 3)
    value_params = 2 * 2
    assert fidelity.int4_bytes_per_head(3, 64, 32) == codes + key_params + scale_bases + value_params
    assert round(fidelity.int4_bytes_per_head(3, 64, 32), 3) == 74.083


SOAK_ARGS = dict(min_prompt=32, max_prompt=600, max_new=16, session_every=5, rss_tolerance_mb=64.0)


def test_the_soak_warm_up_makes_every_kind_of_call_the_soak_makes_at_its_longest():
    import argparse
    import random

    args = argparse.Namespace(**SOAK_ARGS)
    warmup = soak.warmup_calls(args)
    kinds = {(call.batch, call.session) for call in soak.soak_calls(args, 40, random.Random(0))}
    assert kinds == {(1, False), (2, False), (1, True), (2, True)}
    for batch, session in kinds:  # the longest prompt (cold pages at batch 2) and the most new tokens
        assert soak.Call(batch, 600, 16, session, warmup=True) in warmup
    assert soak.Call(2, 32, 16, False, warmup=True) in warmup  # and a short batch 2 (no cold pages)


def test_the_soak_baseline_is_the_sample_after_the_warm_up_and_only_later_calls_are_judged():
    import argparse

    warmup = len(soak.warmup_calls(argparse.Namespace(**SOAK_ARGS)))
    rss = [900.0] * (warmup - 1) + [1000.0, 1010.0, 1065.0, 1020.0]  # a call 65 MiB over the baseline fails
    rows = [{"call": index, "warmup": index < warmup, "session": False, "cold_tokens": 0, "rss_mib": value,
             "cuda_allocated_mib": 7.0, "pinned_held_mib": 30.0 + index, "pinned_in_use_mib": 0.0}
            for index, value in enumerate(rss)]
    summary = soak.summarize(rows, argparse.Namespace(**SOAK_ARGS))
    assert summary["baseline_rss_mib"] == 1000.0 and summary["max_rss_over_baseline_mib"] == 65.0
    assert summary["failures"] == [f"call {warmup + 1}: RSS +65.0 MiB"] and not summary["passed"]
    assert summary["baseline_pinned_held_mib"] == 30.0 + warmup - 1
    assert summary["max_pinned_held_over_baseline_mib"] == 3.0


@pytest.mark.parametrize("stats,expected", [
    ({"allocated_bytes.current": 3 << 20, "active_bytes.current": 1 << 20}, (3.0, 1.0)),  # torch's newer keys
    ({"reserved_bytes.current": 3 << 20, "allocated_bytes.current": 1 << 20}, (3.0, 1.0)),  # its older ones
    ({}, (0.0, 0.0)),  # nothing pinned yet
    ({"segment.current": 1}, (None, None)),  # keys it does not know
])
def test_the_soak_reads_pinned_host_memory_under_either_set_of_keys(monkeypatch, stats, expected):
    monkeypatch.setattr(torch.cuda, "host_memory_stats", lambda: stats, raising=False)
    sample = soak.pinned_host_memory()
    assert (sample["pinned_held_mib"], sample["pinned_in_use_mib"]) == expected


def test_the_soak_skips_pinned_host_memory_where_torch_has_no_statistics(monkeypatch):
    monkeypatch.delattr(torch.cuda, "host_memory_stats", raising=False)
    assert soak.pinned_host_memory() == {}
