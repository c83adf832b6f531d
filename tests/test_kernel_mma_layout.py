"""The Gluon INT4 decode trial (benchmarks/kernel_mma_layout.py): its value-token order is a permutation that gives
each thread its operand tokens as one run, its warm loop compiles for sm_90 with no shared-memory traffic or spills
and the MMAs its shape implies, and on a GPU it matches a float64 reference (output and page mass) over batch rows
with different windows, hot rows and any number of splits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import kernel_mma_layout as trial  # noqa: E402


def test_value_token_positions_group_each_threads_operand_tokens():
    positions = trial.VALUE_TOKEN_POSITIONS
    assert sorted(positions) == list(range(trial.STEP))
    # the tokens a thread of a quad holds in an m16n8k16 operand (2t + e and 2t + 8 + e, per 16) are one run of 8
    for thread in range(4):
        held = [k for k in range(trial.STEP) if (k // 2) % 4 == thread]
        assert sorted(positions[k] for k in held) == list(range(8 * thread, 8 * thread + 8))


def test_reference_dequantizes_the_logical_codes():
    """The float64 reference against a direct computation for one row and one token window: output and page mass."""
    pages = trial.build_pages(1, 128, seed=3, device="cpu")
    logical = pages["logical"]
    query = torch.randn(1, trial.QUERY_HEADS, trial.HEAD_DIM)
    kv_start, kv_end = torch.tensor([5]), torch.tensor([100])
    got, mass = trial.reference(query, logical, kv_start, kv_end, 0.1)
    head, kv_head = 9, 9 // (trial.QUERY_HEADS // trial.KV_HEADS)
    keys, values = [], []
    for token in range(5, 100):
        page, inside = divmod(token, 64)
        key_bytes = logical["key_codes"][page, kv_head, inside].long()
        value_bytes = logical["value_codes"][page, kv_head, inside].long()
        key_codes = torch.cat([key_bytes & 15, key_bytes >> 4]).double()
        value_codes = torch.cat([value_bytes & 15, value_bytes >> 4]).double()
        keys.append(key_codes * logical["key_scale"][page, kv_head, inside // 32].double()
                    + logical["key_min"][page, kv_head, inside // 32].double())
        values.append(value_codes * logical["value_scale"][page, kv_head, inside].double()
                      + logical["value_min"][page, kv_head, inside].double())
    weights = (torch.stack(keys) @ query[0, head].double() * 0.1).softmax(0)
    torch.testing.assert_close(got[0, head], weights @ torch.stack(values), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mass[0, head], torch.stack([weights[:59].sum(), weights[59:].sum()]), rtol=1e-12,
                               atol=1e-12)  # tokens 5-63 in page 0, 64-99 in page 1


def test_warm_loop_compiles_without_shared_memory_or_spills(tmp_path):
    """Offline for sm_90 with the installed Triton (its own process: conftest sets Triton's interpreter here)."""
    environment = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, str(BENCHMARKS / "kernel_mma_layout.py"), "--sass", "--out", str(tmp_path),
                    "--name", "trial"], env=environment, check=True, capture_output=True)
    (written,) = tmp_path.glob("trial-sass-triton*.json")
    counts = json.loads(written.read_text())
    plain, with_mass = counts["plain"], counts["with_mass"]
    assert plain["stack_bytes"] == with_mass["stack_bytes"] == 0
    opcodes = plain["warm_loop"]
    assert not any(name in opcodes for name in ("LDS", "LDSM", "STS", "STSM", "LDL", "STL", "BAR"))
    # a page an iteration, two key groups, products transposed (tokens as rows, 8 columns): q.k 2 m-tiles x 4
    # k-steps per half of the channels, minimums and offsets 4 x 4, p.v 4 m-tiles x 2 k-steps per half, the weights'
    # sum 2
    assert opcodes["HMMA"] == with_mass["warm_loop"]["HMMA"] == 2 * (2 * 8 + 16 + 2 * 8 + 2)
    assert with_mass["warm_loop_instructions"] < 1.05 * plain["warm_loop_instructions"]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("batch, tokens, pages_per_split", [(2, 4096, 1), (2, 4096, 4), (4, 4096, 64),
                                                            (1, 16384, 256), (3, 8192, 7)])
def test_kernel_matches_float64(batch, tokens, pages_per_split):
    row = trial.check(batch, tokens, pages_per_split, seed=tokens + batch)
    assert row["relative_error"] < 1e-2, row  # bf16 output
    assert row["mass_error"] < 1e-3, row  # page shares of a softmax that sums to 1
