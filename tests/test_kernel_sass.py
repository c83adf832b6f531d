"""The page kernel compiled offline for sm_90 (benchmarks/kernel_sass.py, no GPU needed): the INT4 warm loop issues
the tensor-core MMAs its tile shape implies, spills nothing to local memory, and per-page mass costs under 5% of its
instructions (the issue's bar for time, checked here as issued instructions; the GPU benchmark times it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from kvtier.kernels import decode_attention as kernel_module

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "kernel_sass.py"


def test_int4_warm_loop_and_the_cost_of_page_mass(tmp_path):
    # its own process: conftest runs Triton's interpreter here (no CUDA), which has no compiler to call
    environment = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, str(SCRIPT), "--formats", "int4", "int4-mass", "--out", str(tmp_path),
                    "--name", "sass"], env=environment, check=True, capture_output=True)
    written = json.loads((tmp_path / "sass.json").read_text())
    rows = {row["format"]: row for row in written["rows"]}
    plain, with_mass = rows["int4"]["warm_loop"], rows["int4-mass"]["warm_loop"]
    warps = kernel_module.LAUNCH["int4"][0]
    # per warp: q.k and p.v over a (16 rows x WARM_TILE tokens x HEAD_DIM) tile, m16n8k16 MMAs split over the warps
    tile_mmas = 2 * (kernel_module.WARM_TILE // 8) * (128 // 16) // warps  # head dim 128 (kernel_sass.HEAD_DIM)
    assert plain["mma"] == with_mass["mma"] == tile_mmas
    assert plain["local memory"] == 0
    assert with_mass["instructions"] < 1.05 * plain["instructions"], (plain["instructions"], with_mass["instructions"])
    assert list(rows) == ["int4", "int4-mass"]
    assert (tmp_path / "sass.md").read_text().count("\n| int4") == 2
