"""The page kernel compiled offline for sm_90 (benchmarks/kernel_sass.py, no GPU needed): the INT4 warm loop issues
the tensor-core MMAs its tile shape implies, spills nothing to local memory, and per-page mass costs under 5% of its
instructions (the issue's bar for time, checked here as issued instructions; the GPU benchmark times it); the INT4
codes are unpacked by the lop3 PTX."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvtier.kernels import decode_attention as kernel_module

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "kernel_sass.py"


def compile_and_count(directory: Path, *options: str) -> dict:
    """kernel_sass.py's rows by format, for ``options``. Its own process: conftest runs Triton's interpreter here (no
    CUDA), which has no compiler to call."""
    environment = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    subprocess.run([sys.executable, str(SCRIPT), *options, "--out", str(directory), "--name", "sass"],
                   env=environment, check=True, capture_output=True)
    written = json.loads((directory / "sass.json").read_text())
    return {row["format"]: row for row in written["rows"]}


@pytest.fixture(scope="module")
def default_rows(tmp_path_factory) -> dict:
    """The INT4 loop without and with per-page mass, as the launcher compiles it by default (compiled once): its rows
    by format, and the markdown table the tool wrote."""
    directory = tmp_path_factory.mktemp("default")
    rows = compile_and_count(directory, "--formats", "int4", "int4-mass")
    return {"rows": rows, "markdown": (directory / "sass.md").read_text()}


def test_int4_warm_loop_and_the_cost_of_page_mass(default_rows):
    rows = default_rows["rows"]
    plain, with_mass = rows["int4"]["warm_loop"], rows["int4-mass"]["warm_loop"]
    warps = kernel_module.LAUNCH["int4"][0]
    # per warp: q.k and p.v over a (16 rows x WARM_TILE tokens x HEAD_DIM) tile, m16n8k16 MMAs split over the warps
    tile_mmas = 2 * (kernel_module.WARM_TILE // 8) * (128 // 16) // warps  # head dim 128 (kernel_sass.HEAD_DIM)
    assert plain["mma"] == with_mass["mma"] == tile_mmas
    assert plain["local memory"] == 0
    assert with_mass["instructions"] < 1.05 * plain["instructions"], (plain["instructions"], with_mass["instructions"])
    assert list(rows) == ["int4", "int4-mass"]
    assert default_rows["markdown"].count("\n| int4") == 2


def test_lop3_unpacking_is_on_and_cuts_byte_permutes(default_rows, tmp_path):
    """The default compile takes the lop3 PTX for INT4 codes (keys and values): without it each code byte is moved
    to a 16-bit lane by a byte permute of its own (258 a tile and warp with Triton 3.6, 114 with lop3)."""
    default = default_rows["rows"]["int4"]["warm_loop"]
    plain = compile_and_count(tmp_path, "--formats", "int4", "--variant", "base")["int4"]["warm_loop"]
    assert default["byte permutes"] < 0.6 * plain["byte permutes"], (default["byte permutes"], plain["byte permutes"])
    assert default["instructions"] < plain["instructions"]
