"""The decode kernel's INT4 variants and launch settings, timed beside torch SDPA in one run.

One attention layer of Llama-3.1-8B's shape (32 query heads, 8 KV heads, head dim 128, bf16): 4 sink and 128 recent
tokens in bf16 hot pages, every other token in INT4 warm pages (64-token pages, keys per channel over 32 tokens,
rotated basis) filled with random codes and parameters (the timing does not depend on the values). Stages:

1. check: every (variant, launch setting) timed below is first run on a ragged batch-2 layer and compared with the
   float64 torch reference (output relative error, largest page-mass error); a variant that fails to compile or
   drifts past 1e-2 is reported and left out.
2. variants: kernel variants (kvtier.kernels.decode_attention.VARIANT_NAMES) at the default launch setting, at every
   context and batch, without and with the per-page mass output, beside SDPA on the same tokens as a dense bf16
   cache and the kernel on that dense cache as bf16 pages.
3. launch: the fastest variant without mass (summed over the two largest contexts) over num_warps, num_stages, the
   warm tile and splits per (sequence, KV head), at the two largest contexts; then
   its mass_dot form with mass at the best setting.

Times are device times: calls replayed from a CUDA graph, each after an L2 flush (benchmarks/kernel.py graph_ms).
Writes DIR/kernel-variants-<gpu>.json and prints a compact table last.

    python benchmarks/kernel_variants.py --out DIR
    TRITON_INTERPRET=1 python benchmarks/kernel_variants.py --device cpu --contexts 704 --batches 1 2 --out DIR
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (benchmarks/common.py)
from kernel import dense_as_pages, graph_ms, relative_error, sdpa_call  # noqa: E402  (benchmarks/kernel.py)

from kvtier import int4  # noqa: E402
from kvtier.formats import Int4Format  # noqa: E402
from kvtier.kernels import decode_attention as kernel_module  # noqa: E402
from kvtier.kernels.decode_attention import (  # noqa: E402
    DecodeWorkspace, PagedKV, decode_attention, hot_table_rows, hot_table_tensor, paged_attention_reference)
from kvtier.pages import PageLayout, WarmPages  # noqa: E402

QUERY_HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
BLOCK, KEY_GROUP, SINKS, RECENT = 64, 32, 4, 128
DEFAULT_LAUNCH = {"num_warps": kernel_module.LAUNCH["int4"][0], "num_stages": kernel_module.LAUNCH["int4"][1],
                  "warm_tile": kernel_module.WARM_TILE, "splits": None}  # the module's defaults (splits: its rule)
# stage 2: (variant, with mass); a mass_dot variant differs from its base only with mass
TIMED_VARIANTS = [("base", False), ("lop3", False), ("offset", False), ("offset+lop3", False), ("fold", False),
                  ("base", True), ("lop3", True), ("offset+lop3", True)]
# stage 3, most likely gains first (a spent time budget cuts the rest): (num_warps, num_stages, warm tile), then splits
# per (sequence, KV head) around the rule's
LAUNCH_GRID = [dict(DEFAULT_LAUNCH, num_warps=warps, num_stages=stages, warm_tile=tile)
               for warps, stages, tile in ((4, 2, 128), (4, 3, 128), (8, 2, 128), (4, 2, 256), (8, 2, 256))]
LAUNCH_GRID += [dict(DEFAULT_LAUNCH, splits=splits) for splits in (16, 64)]
TOLERANCE = 1e-2  # output relative error against the float64 reference, as the tests allow


class UnlimitedBudget:
    def reserve(self, nbytes: int) -> bool:
        return True

    def release(self, nbytes: int) -> None:
        pass


def random_int4_layer(batch: int, tokens: int, device, seed: int) -> tuple[PagedKV, torch.Tensor]:
    """A layer of ``tokens`` tokens: sinks and a recent window in bf16, the rest as INT4 pages of random codes and
    parameters. Returns the paged layer and the (B, H_q, D) bf16 query."""
    generator = torch.Generator(device=device).manual_seed(seed)
    layout = PageLayout(batch, KV_HEADS, BLOCK, HEAD_DIM, Int4Format(KEY_GROUP))
    pages = max(1, (tokens - SINKS - RECENT) // BLOCK)
    recent = tokens - SINKS - pages * BLOCK

    def uniform(shape, low, high):  # float16 parameters in [low, high)
        return (torch.rand(shape, generator=generator, device=device) * (high - low) + low).half()

    def codes(shape):
        return torch.randint(0, 256, shape, generator=generator, device=device, dtype=torch.uint8)

    shapes = {name: (pages, *shape) for name, shape in layout.shapes.items()}
    key_scale, key_scale_base = int4.encode_key_scales(uniform(shapes["key_scale"], 0.05, 0.4).float())
    fields = {"key_codes": codes(shapes["key_codes"]), "value_codes": codes(shapes["value_codes"]),
              "key_scale": key_scale, "key_scale_base": key_scale_base,
              "key_min": uniform(shapes["key_min"], -3.0, 0.0),
              "value_scale": uniform(shapes["value_scale"], 0.05, 0.2),
              "value_min": uniform(shapes["value_min"], -1.5, -0.5)}
    packed = layout.pack(fields)  # (pages, page_bytes)
    del fields
    warm = WarmPages(layout, device, pages_per_slab=pages, budget=UnlimitedBudget(), share_bytes=1 << 62)
    for index in range(pages):
        warm.store(SINKS + index * BLOCK, packed[index])
    del packed
    hot_shape = (batch, KV_HEADS, SINKS + recent, HEAD_DIM)
    hot_keys = torch.randn(hot_shape, generator=generator, device=device).to(torch.bfloat16)
    hot_values = torch.randn(hot_shape, generator=generator, device=device).to(torch.bfloat16)
    rows = hot_table_rows([(0, 0, SINKS), (SINKS, SINKS + pages * BLOCK, recent)])
    rotation, _ = torch.linalg.qr(torch.randn(HEAD_DIM, HEAD_DIM, generator=generator, device=device))
    query = torch.randn(batch, QUERY_HEADS, HEAD_DIM, generator=generator, device=device).to(torch.bfloat16)
    return PagedKV(warm, hot_keys, hot_values, rows, hot_table_tensor(rows, device), rotation.float()), query


def select(variant: str, launch: dict) -> None:
    """Point the kernel module at a variant and a launch setting (read at every decode_attention call)."""
    kernel_module.VARIANT = kernel_module.variant_switches(variant)
    kernel_module.LAUNCH["int4"] = (launch["num_warps"], launch["num_stages"])
    kernel_module.WARM_TILE = launch["warm_tile"]
    kernel_module.SPLITS_PER_HEAD = launch["splits"]


def device_ms(fn, device) -> float:
    if torch.device(device).type == "cuda":
        return graph_ms(fn)
    start = time.perf_counter()  # the interpreter: one call's wall time, for a smoke test only
    fn()
    return (time.perf_counter() - start) * 1e3


def setting_name(variant: str, launch: dict, with_mass: bool = False) -> str:
    return (f"{variant}{'+mass' if with_mass else ''} w{launch['num_warps']} s{launch['num_stages']} "
            f"t{launch['warm_tile']} k{launch['splits'] or 'rule'}")


class Checker:
    """Each (variant, launch setting) once against the float64 reference on a ragged batch-2 layer, with mass."""

    def __init__(self, tokens: int, device):
        self.device = device
        self.paged, self.query = random_int4_layer(2, tokens, device, seed=12345)
        self.kv_start = torch.tensor([0, 100], dtype=torch.int32, device=device)
        self.kv_end = torch.tensor([tokens, tokens - 50], dtype=torch.int32, device=device)
        self.scale = HEAD_DIM**-0.5
        queries = (self.query.double() * self.scale).view(2, KV_HEADS, QUERY_HEADS // KV_HEADS, 1, HEAD_DIM)
        out, _, self.mass = paged_attention_reference(queries, self.paged, self.kv_start, self.kv_end, with_mass=True)
        self.expected = out.view(2, QUERY_HEADS, HEAD_DIM)
        self.results: dict[str, dict] = {}

    def __call__(self, variant: str, launch: dict) -> dict:
        name = setting_name(variant, launch)
        if name not in self.results:
            self.results[name] = self._check(variant, launch)
            print("check", name, json.dumps(self.results[name]), flush=True)
        return self.results[name]

    def _check(self, variant: str, launch: dict) -> dict:
        select(variant, launch)
        workspace = DecodeWorkspace()
        try:
            decode_attention(self.query, self.paged, self.kv_start, self.kv_end, self.scale, with_mass=True,
                             workspace=workspace)
            for buffer in workspace.buffers.values():
                buffer.fill_(math.nan)
            out = torch.full_like(self.query, math.nan)
            out, mass = decode_attention(self.query, self.paged, self.kv_start, self.kv_end, self.scale,
                                         with_mass=True, workspace=workspace, out=out)
        except Exception as error:  # a variant that does not compile here is reported, not fatal
            return {"ok": False, "error": f"{type(error).__name__}: {str(error)[:300]}"}
        relative = (out.double() - self.expected).norm() / self.expected.norm()
        mass_error = (mass.double() - self.mass).abs().max()
        ok = bool(torch.isfinite(out).all() and torch.isfinite(mass).all() and relative < TOLERANCE
                  and mass_error < 2e-3)
        return {"ok": ok, "relative_error": relative.item(), "mass_error": mass_error.item()}


def sdpa_ms(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, device) -> tuple[float, str, torch.Tensor]:
    query4 = query.unsqueeze(2)
    if torch.device(device).type == "cuda":
        call, backend = sdpa_call(query4, keys, values)
    else:
        def call():
            return torch.nn.functional.scaled_dot_product_attention(query4, keys, values, enable_gqa=True)
        backend = "cpu"
    return device_ms(call, device), backend, call()[:, :, 0]


class Shape:
    """One (batch, context): its random INT4 layer, the same token count as a dense bf16 cache, and its timings."""

    def __init__(self, batch: int, tokens: int, device):
        self.batch, self.tokens, self.device = batch, tokens, device
        self.paged, self.query = random_int4_layer(batch, tokens, device, seed=batch * 1000003 + tokens)
        self.kv_start = torch.zeros(batch, dtype=torch.int32, device=device)
        self.kv_end = torch.full_like(self.kv_start, tokens)
        self.workspace = DecodeWorkspace()
        self.int4_bytes = (self.paged.warm_pages * self.paged.warm.page_bytes + self.paged.hot_keys.nbytes
                           + self.paged.hot_values.nbytes)
        self.row = {"batch": batch, "tokens": tokens, "int4_bytes": self.int4_bytes, "times": {}}
        self.base_out = None

    def time_dense(self) -> None:
        """SDPA and the kernel's bf16 pages on the same token count, dense bf16 (freed after)."""
        select("base", DEFAULT_LAUNCH)
        generator = torch.Generator(device=self.device).manual_seed(7)
        shape = (self.batch, KV_HEADS, self.tokens, HEAD_DIM)
        keys = torch.randn(shape, generator=generator, device=self.device).to(torch.bfloat16)
        values = torch.randn(shape, generator=generator, device=self.device).to(torch.bfloat16)
        self.row["dense_bytes"] = keys.nbytes + values.nbytes
        self.row["sdpa_ms"], self.row["sdpa_backend"], sdpa_out = sdpa_ms(self.query, keys, values, self.device)
        dense, scale = dense_as_pages(keys, values), HEAD_DIM**-0.5
        bf16_call = lambda: decode_attention(self.query, dense, self.kv_start, self.kv_end, scale,  # noqa: E731
                                             workspace=self.workspace)
        self.row["bf16_pages_ms"] = device_ms(bf16_call, self.device)
        self.row["bf16_pages_error_vs_sdpa"] = relative_error(bf16_call()[0], sdpa_out)
        del keys, values, dense

    def time_kernel(self, variant: str, launch: dict, with_mass: bool) -> float:
        """Device ms of one call (inf, reported, if it fails here though its check passed)."""
        select(variant, launch)
        call = lambda: decode_attention(self.query, self.paged, self.kv_start, self.kv_end, HEAD_DIM**-0.5,  # noqa
                                        with_mass=with_mass, workspace=self.workspace)
        name = setting_name(variant, launch, with_mass)
        try:
            out = call()[0]
            ms = device_ms(call, self.device)
        except Exception as error:
            self.row["times"][name] = {"ms": math.inf, "error": f"{type(error).__name__}: {str(error)[:300]}"}
            print(f"{self.batch} {self.tokens} {name}: FAILED {self.row['times'][name]['error']}", flush=True)
            return math.inf
        if self.base_out is None:
            self.base_out = out.clone()
        self.row["times"][name] = {"ms": ms, "error_vs_base": relative_error(out, self.base_out)}
        print(f"{self.batch} {self.tokens} {name}: {ms:.4f} ms, {self.int4_bytes / ms / 1e9:.2f} TB/s, "
              f"vs first {self.row['times'][name]['error_vs_base']:.1e}", flush=True)
        return ms


def environment(device) -> dict:
    name = torch.cuda.get_device_name() if torch.device(device).type == "cuda" else platform.processor() or "cpu"
    return {"device": name, "torch": torch.__version__, "triton": triton.__version__,
            "python": platform.python_version(),
            "shape": {"query_heads": QUERY_HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "block": BLOCK,
                      "key_group": KEY_GROUP, "sinks": SINKS, "recent": RECENT}}


def summary(rows: list[dict], best_variant: str | None, best_launch: dict | None) -> str:
    """The compact table: per shape, SDPA, bf16 pages, each variant at the default launch, the best launch."""
    default = DEFAULT_LAUNCH
    lines = [f"variants at the default launch ({setting_name('', default).strip()}), ms; "
             "x = speedup over SDPA; TB/s on INT4 bytes", ""]
    names = [setting_name(v, default, m) for v, m in TIMED_VARIANTS]
    header = "| B | tokens | SDPA | bf16pg/SDPA | " + " | ".join(n.split(" ")[0] for n in names) + " |"
    lines += [header, "|" + "---|" * (4 + len(names))]
    for row in rows:
        cells = []
        for name in names:
            ms = row["times"].get(name, {}).get("ms")
            cells.append("-" if ms is None else f"{ms:.3f} {row['sdpa_ms'] / ms:.2f}x {row['int4_bytes'] / ms / 1e9:.2f}")
        lines.append(f"| {row['batch']} | {row['tokens']:,} | {row['sdpa_ms']:.3f} | "
                     f"{row['bf16_pages_ms'] / row['sdpa_ms']:.2f} | " + " | ".join(cells) + " |")
    settings = [setting_name(best_variant, launch) for launch in [DEFAULT_LAUNCH, *LAUNCH_GRID]]
    swept = [row for row in rows if any(name in row["times"] for name in settings[1:])]
    if best_variant is not None and swept:
        lines += ["", f"launch sweep of {best_variant} (ms per setting; best summed last):", ""]
        lines.append("| setting | " + " | ".join(f"B{r['batch']} {r['tokens'] // 1024}K" for r in swept) + " |")
        lines.append("|" + "---|" * (1 + len(swept)))
        for name in settings:
            cells = [f"{row['times'][name]['ms']:.3f}" if name in row["times"] else "-" for row in swept]
            lines.append(f"| {name.split(' ', 1)[1]} | " + " | ".join(cells) + " |")
        if best_launch is not None:
            best = setting_name(best_variant, best_launch)
            lines.append("")
            lines.append(f"best: {best}")
            mass_variant = "mass_dot" if best_variant == "base" else f"{best_variant}+mass_dot"
            with_mass = setting_name(mass_variant, best_launch, True)
            for row in swept:
                if best in row["times"]:
                    ms = row["times"][best]["ms"]
                    mass_ms = row["times"].get(with_mass, {}).get("ms", math.nan)
                    lines.append(f"  B{row['batch']} {row['tokens']:,}: {ms:.3f} ms, {row['sdpa_ms'] / ms:.2f}x SDPA, "
                                 f"{row['int4_bytes'] / ms / 1e9:.2f} TB/s; with mass ({mass_variant}) "
                                 f"{mass_ms:.3f} ms, {(mass_ms / ms - 1) * 100:+.1f}%")
    return "\n".join(lines)


def fastest(times: dict[str, float]) -> str | None:
    return min(times, key=times.get) if times else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072, 524288])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--check-tokens", type=int, default=8192, help="tokens of the reference check's layer")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--budget-s", type=float, default=170.0,
                        help="stop starting new launch-sweep timings after this many seconds")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--name", help="results file stem (default kernel-variants-<gpu>)")
    args = parser.parse_args()
    started = time.perf_counter()
    module_variant = dict(kernel_module.VARIANT)  # the module's own switches, restored after the sweeps
    checker = Checker(min(args.check_tokens, min(args.contexts)), args.device)
    failed = {}

    def usable(variant: str, launch: dict) -> bool:
        result = checker(variant, launch)
        if not result["ok"]:
            failed[setting_name(variant, launch)] = result
        return result["ok"]

    rows, shapes = [], []
    variant_sums: dict[str, float] = {}  # summed no-mass times over the two largest contexts
    large = sorted(set(args.contexts))[-2:]
    for batch in args.batches:
        for tokens in args.contexts:
            shape = Shape(batch, tokens, args.device)
            shape.time_dense()
            for variant, with_mass in TIMED_VARIANTS:
                if usable(variant, DEFAULT_LAUNCH):
                    ms = shape.time_kernel(variant, DEFAULT_LAUNCH, with_mass)
                    if not with_mass and tokens in large:
                        variant_sums[variant] = variant_sums.get(variant, 0.0) + ms
            rows.append(shape.row)
            if tokens in large:
                shapes.append(shape)
            else:
                del shape
            if args.device == "cuda":
                torch.cuda.empty_cache()
    best_variant = fastest(variant_sums)
    print("variants, summed ms over the largest contexts:", json.dumps(variant_sums), flush=True)

    launch_sums: dict[str, float] = {}
    launches = {}
    if best_variant is not None:  # the default setting was timed on the same shapes in stage 2
        launches[setting_name(best_variant, DEFAULT_LAUNCH)] = DEFAULT_LAUNCH
        launch_sums[setting_name(best_variant, DEFAULT_LAUNCH)] = variant_sums[best_variant]
        for launch in LAUNCH_GRID:
            if time.perf_counter() - started > args.budget_s:
                print("launch sweep stopped: time budget spent", flush=True)
                break
            if not usable(best_variant, launch):
                continue
            name = setting_name(best_variant, launch)
            launches[name] = launch
            launch_sums[name] = sum(shape.time_kernel(best_variant, launch, False) for shape in shapes)
    best_name = fastest(launch_sums)
    best_launch = launches.get(best_name)
    if best_launch is not None:
        mass_variant = "mass_dot" if best_variant == "base" else f"{best_variant}+mass_dot"
        if usable(mass_variant, best_launch):
            for shape in shapes:
                shape.time_kernel(mass_variant, best_launch, True)
    select("base", DEFAULT_LAUNCH)
    kernel_module.VARIANT = module_variant

    env = environment(args.device)
    gpu = common.device_tag(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"environment": env, "default_launch": DEFAULT_LAUNCH, "checks": checker.results, "failed": failed,
              "variant_sums_ms": variant_sums, "best_variant": best_variant, "launch_sums_ms": launch_sums,
              "best_launch": best_launch, "rows": rows, "seconds": time.perf_counter() - started}
    path = args.out / f"{args.name or f'kernel-variants-{gpu}'}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {path} ({result['seconds']:.0f} s); {env['device']}, torch {env['torch']}, triton {env['triton']}")
    print("checks vs float64 reference (relative error, mass error):")
    for name, check in checker.results.items():
        detail = (f"{check['relative_error']:.1e} {check['mass_error']:.1e}" if "relative_error" in check
                  else check["error"][:160])
        print(f"  {'ok  ' if check['ok'] else 'FAIL'} {name}: {detail}")
    print(summary(rows, best_variant, best_launch))


if __name__ == "__main__":
    main()
