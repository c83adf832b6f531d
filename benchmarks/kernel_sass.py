"""The decode kernels' machine code without a GPU: compile the Triton page kernel and the Gluon INT4 kernel
(gluon-* formats) for sm_90 (Hopper) with the installed Triton and count the SASS instructions of their loops, by
opcode.

Pointer arguments are marked 16-byte aligned and the hot buffer's strides divisible by 16, as the JIT specializes
them at a launch (without the marks, loads come out byte by byte and the counts mean nothing). Counts are per warp and
loop iteration: the page kernel's warm loop reads one tile of WARM_TILE tokens, the Gluon kernel's one page of BLOCK,
the hot loops one hot page of up to HOT_TILE. They are instruction
counts, not timings; the GPU's own Triton may emit different code, so compile with the version the GPU has (its wheel
installs on the CPU machine: ``pip install --target DIR triton==X`` and put DIR first on PYTHONPATH).

    python benchmarks/kernel_sass.py [--formats int4 int4-mass turboquant3] [--variant base] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import subprocess
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kvtier.formats import Int4Format, TurboQuantFormat
from kvtier.kernels import decode_attention as kernel_module
from kvtier.kernels import int4_mma_decode
from kvtier.pages import ALIGNMENT, PageLayout

HOPPER = GPUTarget("cuda", 90, 32)
TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
QUERY_HEADS, KV_HEADS, HEAD_DIM, BLOCK = 32, 8, 128, 64  # Llama-3.1-8B's heads and head dim, kvtier's default page
POINTER_TYPES = {"query_ptr": "*bf16", "page_base_ptr": "*u8", "warm_offset_ptr": "*i64", "warm_position_ptr": "*i32",
                 "warm_count_ptr": "*i32", "hot_keys_ptr": "*bf16", "hot_values_ptr": "*bf16", "hot_table_ptr": "*i32",
                 "kv_start_ptr": "*i32", "kv_end_ptr": "*i32"}  # every other pointer: float32
FORMATS = {"int4": (Int4Format(32), False), "int4-mass": (Int4Format(32), True),
           "turboquant3": (TurboQuantFormat(3, True, 32), False)}
# the Gluon INT4 kernel (kernels/int4_mma_decode.py, one warp a program): (head dim, rotated, per-page mass)
GLUON_FORMATS = {"gluon-int4": (128, True, False), "gluon-int4-mass": (128, True, True),
                 "gluon-int4-d64": (64, True, False), "gluon-int4-unrotated": (128, False, False)}
# opcode families reported as columns: tensor-core MMAs, global loads, copies from global to shared memory (cp.async),
# shared-memory traffic, byte permutes, selects, barriers
COLUMNS = {"mma": ("HMMA",), "global loads": ("LDG",), "async copies": ("LDGSTS",), "shared loads": ("LDS", "LDSM"),
           "shared stores": ("STS", "STSM"), "byte permutes": ("PRMT",), "selects": ("FSEL", "SEL"),
           "barriers": ("BAR",), "local memory": ("LDL", "STL")}


def constants(page_format, with_mass: bool) -> dict:
    """The page kernel's constexprs for one layer's decode launch, as decode_attention passes them on a GPU (its
    variant switches included): the page count on the device, as a CUDA graph replays it, or with per-page mass on
    the host, as an eager call passes it."""
    layout = PageLayout(1, KV_HEADS, BLOCK, HEAD_DIM, page_format)
    page = kernel_module._page_constants(layout, kernel_module.WARM_TILE)
    return dict(page, KV_HEADS=KV_HEADS, GROUP_PAD=kernel_module.row_blocks(QUERY_HEADS // KV_HEADS)[0],
                HEAD_DIM=HEAD_DIM, HOT_TILE=kernel_module.HOT_TILE, FLOAT32_PRECISION="tf32", UPCAST_HOT=False,
                WITH_MASS=with_mass, ROTATE=True, ALIGNMENT=ALIGNMENT, MASS_PAGES=kernel_module.MASS_PAGES,
                **kernel_module.kernel_variant(page, "cuda"), COUNT_ON_DEVICE=not with_mass)


def compile_cubin(kernel, values: dict, pointer_types: dict, options: dict, source_class=ASTSource) -> bytes:
    """``kernel`` compiled for sm_90 with the constexprs in ``values``: pointers typed by ``pointer_types`` (float32
    otherwise) and, with the hot buffer's strides, marked 16-byte aligned; ``source_class`` GluonASTSource for a
    Gluon kernel."""
    signature, constexprs, aligned = {}, {}, {}
    for index, param in enumerate(kernel.params):
        if param.is_constexpr:
            signature[param.name], constexprs[(index,)] = "constexpr", values[param.name]
        elif param.name.endswith("_ptr"):
            signature[param.name] = pointer_types.get(param.name, "*fp32")
        else:
            signature[param.name] = "fp32" if param.name in ("scale_log2", "inverse_root") else "i32"
        if signature[param.name].startswith("*") or param.name.startswith("hot_stride"):
            aligned[(index,)] = [["tt.divisibility", 16]]
    source = source_class(fn=kernel, signature=signature, constexprs=constexprs, attrs=aligned)
    return triton.compile(source, target=HOPPER, options=options).asm["cubin"]


def disassemble(cubin: bytes) -> tuple[dict, str]:
    """(registers and stack bytes per thread, SASS text) of a cubin, by the CUDA tools Triton ships."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        usage = subprocess.run([TOOLS / "cuobjdump", "-res-usage", file.name], capture_output=True, text=True,
                               check=True).stdout
        sass = subprocess.run([TOOLS / "nvdisasm", "-c", file.name], capture_output=True, text=True, check=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    return {"registers": int(found.group(1)), "stack_bytes": int(found.group(2))}, sass


def loop_bodies(sass: str) -> list[list[str]]:
    """The instructions of each loop (a backward branch to a label), in program order."""
    instructions, labels, loops = [], {}, []
    for line in sass.splitlines():
        label = re.match(r"^(\.L_x_\d+):", line)
        if label:
            labels[label.group(1)] = len(instructions)
        instruction = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(.*?)\s*;", line)
        if instruction:
            instructions.append(instruction.group(1).strip())
            branch = re.search(r"BRA\s+`\((\.L_x_\d+)\)", instructions[-1])
            if branch and labels.get(branch.group(1), len(instructions)) < len(instructions):
                loops.append(instructions[labels[branch.group(1)]:])
    return [body for body in loops if len(body) > 1]


def opcode(instruction: str) -> str:
    """'@!P0 LDG.E.128 R4, ...' -> 'LDG'."""
    words = instruction.split()
    return (words[1] if words[0].startswith("@") else words[0]).split(".")[0]


def gluon_cubin(head_dim: int, rotate: bool, with_mass: bool) -> bytes:
    """The Gluon INT4 kernel for pages of BLOCK tokens, KV_HEADS heads of ``head_dim``, with the launch's register
    cap: the page count on the device (a CUDA graph's launch), or on the host with per-page mass."""
    from triton.experimental.gluon._runtime import GluonASTSource

    layout = PageLayout(1, KV_HEADS, BLOCK, head_dim, Int4Format(32))
    values = int4_mma_decode.constants(layout, rotate, with_mass, count_on_device=not with_mass)
    options = {"num_warps": 1, "maxnreg": int4_mma_decode.REGISTERS}  # as launched
    return compile_cubin(int4_mma_decode._decode_kernel, values, POINTER_TYPES, options, GluonASTSource)


def count(name: str, num_warps: int, num_stages: int) -> dict:
    if name in GLUON_FORMATS:
        num_warps, num_stages = 1, 1
        resources, sass = disassemble(gluon_cubin(*GLUON_FORMATS[name]))
    else:
        page_format, with_mass = FORMATS[name]
        resources, sass = disassemble(compile_cubin(kernel_module._decode_pages_kernel,
                                                    constants(page_format, with_mass), POINTER_TYPES,
                                                    {"num_warps": num_warps, "num_stages": num_stages}))
    loops = []
    for body in loop_bodies(sass):
        opcodes = collections.Counter(opcode(instruction) for instruction in body)
        loops.append({"instructions": len(body), **{column: sum(opcodes[op] for op in ops)
                                                    for column, ops in COLUMNS.items()},
                      "opcodes": dict(opcodes.most_common())})
    return {"format": name, "num_warps": num_warps, "num_stages": num_stages, **resources,
            "warm_loop": loops[0], "hot_loop": loops[1] if len(loops) > 1 else None}


def table(rows: list[dict]) -> str:
    lines = ["| format | registers | stack B | warm loop | " + " | ".join(COLUMNS) + " | hot loop |",
             "|---|---:|---:|---:|" + "---:|" * len(COLUMNS) + "---:|"]
    for row in rows:
        warm, hot = row["warm_loop"], row["hot_loop"]
        lines.append(f"| {row['format']} | {row['registers']} | {row['stack_bytes']} | {warm['instructions']:,} | "
                     + " | ".join(f"{warm[column]:,}" for column in COLUMNS)
                     + f" | {hot['instructions'] if hot else ''} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--formats", nargs="+", default=list(FORMATS) + list(GLUON_FORMATS),
                        choices=list(FORMATS) + list(GLUON_FORMATS))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--name", help="results file stem (default kernel-sass-triton<version>)")
    parser.add_argument("--variant", help="INT4 variant switches instead of the module's (e.g. base, lop3; see "
                        "kvtier.kernels.decode_attention.VARIANT_NAMES)")
    args = parser.parse_args(argv)
    if args.variant:
        kernel_module.VARIANT = kernel_module.variant_switches(args.variant)
    num_warps, num_stages = kernel_module.LAUNCH["int4"]
    rows = [count(name, num_warps, num_stages) for name in args.formats]
    name = args.name or f"kernel-sass-triton{triton.__version__}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps({"triton": triton.__version__, "target": "sm_90",
                                                       "rows": rows}, indent=2))
    text = table(rows)
    (args.out / f"{name}.md").write_text(
        f"Decode kernels compiled offline for sm_90 by Triton {triton.__version__}: the page kernel ({num_warps} "
        f"warps, {num_stages} stages, warm tile {kernel_module.WARM_TILE}, hot tile {kernel_module.HOT_TILE}) and "
        f"the Gluon INT4 kernel (gluon-*: one warp, at most {int4_mma_decode.REGISTERS} registers as launched, a page a "
        f"warm loop iteration); {KV_HEADS} KV heads, head dim "
        f"{HEAD_DIM} (gluon-int4-d64: 64), pages of {BLOCK}; SASS instructions per warp and loop "
        "iteration (`python benchmarks/kernel_sass.py`).\n\n" + text + "\n")
    print(text)
    return rows


if __name__ == "__main__":
    main()
