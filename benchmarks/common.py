"""What the GPU benchmarks share: the random Llama-3.1-8B-shaped model, filling a cache through its own update path,
timing decode steps, the caches compared, and writing results (JSON, markdown, PNG) with the device and versions.

"Prefill" in these benchmarks means filling each cache through its own update path, chunk by chunk, with random keys
and values (what a chunked prefill writes into it), not running the model over the prompt: prefilling 512K-1M
tokens through an 8B model's forward is quadratic and far too slow. Decode steps then run through ``model()``.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import transformers
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

import kvtier
from kvtier.compat import with_cache
from kvtier.graph import DecodeGraph

RESULTS = Path(__file__).resolve().parent / "results"
GB = 1024**3
FILL_CHUNK = 16384  # tokens per update while filling


# ---------------------------------------------------------------- the model
def llama_8b_shape(layers: int = 32) -> LlamaConfig:
    return LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=500000.0,
                       max_position_embeddings=1 << 21)


def tiny_shape(layers: int = 2) -> LlamaConfig:
    """The same kind of model, small enough for a CPU smoke run (grouped-query attention, head dim 64)."""
    return LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=64, rope_theta=500000.0,
                       max_position_embeddings=1 << 21)


def random_model(config: LlamaConfig, device: str = "cuda") -> LlamaForCausalLM:
    """Random bf16 weights, built directly on ``device``; SDPA attention."""
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    model.config._attn_implementation = "sdpa"
    return model.eval()


def weight_bytes(model) -> int:
    return sum(parameter.numel() * parameter.element_size() for parameter in model.parameters())


def tensor_bytes(tensor) -> int:
    """Bytes of a tensor, counting the inner tensors of a tensor subclass (quanto's packed tensors)."""
    if not isinstance(tensor, torch.Tensor):
        return 0
    if type(tensor) is not torch.Tensor and hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return sum(tensor_bytes(getattr(tensor, name)) for name in names)
    return tensor.numel() * tensor.element_size()


def dense_bytes_per_token(config: LlamaConfig) -> int:
    """bf16 keys and values of every layer."""
    return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * 2


# ---------------------------------------------------------------- filling caches
def random_states(config: LlamaConfig, batch: int, tokens: int, generator,
                  device: str = "cuda") -> tuple[torch.Tensor, torch.Tensor]:
    """keys, values (B, H_kv, tokens, D) bf16; a few key channels are outliers, as real keys have."""
    shape = (batch, config.num_key_value_heads, tokens, config.head_dim)
    keys = torch.randn(shape, generator=generator, device=device, dtype=torch.bfloat16)
    keys[..., :4] += 3
    return keys, torch.randn(shape, generator=generator, device=device, dtype=torch.bfloat16)


def fill_dynamic(cache: DynamicCache, config: LlamaConfig, batch: int, context: int, device: str = "cuda") -> None:
    """Every layer's whole context in one update (what cold_tier.py measures its dense caches with)."""
    generator = torch.Generator(device=device).manual_seed(1)
    for index in range(config.num_hidden_layers):
        cache.update(*random_states(config, batch, context, generator, device), index)


def fill_chunked(cache, config: LlamaConfig, batch: int, context: int, chunk: int = FILL_CHUNK, device: str = "cuda",
                 progress=None) -> None:
    """Fill ``cache`` as a chunked prefill writes it: for each chunk of ``chunk`` tokens, every layer in order.

    A TieredCache's layers are updated directly (quantize, demote, pin; no attention runs, so no cold page is
    streamed back); any other transformers cache goes through ``cache.update`` (the offloaded DynamicCache moves
    layers to the host there, QuantizedCache re-quantizes). ``progress`` (a tqdm bar) advances by tokens.
    """
    generator = torch.Generator(device=device).manual_seed(1)
    tiered = isinstance(cache, kvtier.TieredCache)
    for first in range(0, context, chunk):
        length = min(chunk, context - first)
        for index in range(config.num_hidden_layers):
            states = random_states(config, batch, length, generator, device)
            if tiered:
                cache.layers[index].update(*states)
            else:
                cache.update(*states, index)
            del states
        if progress is not None:
            progress.update(length)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.no_grad()
def decode_steps_ms(model, cache, batch: int, steps: int, warmup: int = 2) -> list[float]:
    """Synchronized wall time of each decode step after ``warmup`` untimed ones, taken as generate() takes it: through
    the model's forward, or for a kvtier cache on CUDA through its DecodeGraph (kvtier.graph)."""
    device = str(model.device)
    token = torch.full((batch, 1), 7, device=model.device)
    forward = model.forward
    if isinstance(cache, kvtier.TieredCache) and cache.config.cuda_graph == "auto" and device.startswith("cuda"):
        # as generate() runs it: replayed from a CUDA graph where the cache allows, else the eager forward
        graph = cache.decode_graph = DecodeGraph(cache, captured=True)
        forward = functools.partial(graph.forward, model.forward)
    def step():
        return forward(input_ids=token, **with_cache(cache), use_cache=True, logits_to_keep=1).logits

    return timed_steps(step, steps + warmup, device)[warmup:]


def timed_steps(step, count: int, device: str) -> list[float]:
    """Synchronized wall time, ms, of each of ``count`` calls of ``step()`` (-> logits, checked finite)."""
    times = []
    for _ in range(count):
        synchronize(device)
        start = time.perf_counter()
        logits = step()
        synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
        if not torch.isfinite(logits).all():
            raise RuntimeError("non-finite logits")
    return times


def run_plan(plan: list[tuple], run_row, result: dict, markdown, out: Path, name: str, describe, after_row=None) -> None:
    """Each (batch, context, cache) of ``plan`` through ``run_row``: the row appended to result["rows"], said in one
    line (``describe(row)``), ``after_row(rows)`` if given, the results rewritten; a progress bar over the plan."""
    bar = progress_bar(len(plan), "rows", "row")
    for batch, context, cache in plan:
        row = run_row(cache, batch, context)
        result["rows"].append(row)
        print(f"batch {batch}, {context:,} tokens, {cache}: {describe(row)}", flush=True)
        if after_row is not None:
            after_row(result["rows"])
        write_results(result, markdown(result), out, name)
        bar.update(1)
    bar.close()


def median(values: list[float]) -> float:
    return statistics.median(values)


# ---------------------------------------------------------------- the caches compared
QUANTO_MISSING = "optimum-quanto is not installed (pip install optimum-quanto, or .[bench])"


def quanto_available() -> bool:
    try:
        import optimum.quanto  # noqa: F401
    except ImportError:
        return False
    return True


def quantized_cache(config: LlamaConfig, bits: int = 4):
    """transformers' QuantizedCache with the quanto backend (the same constructor in transformers 5.17 and 5.24)."""
    from transformers import QuantizedCache

    quanto_unpack()
    return QuantizedCache(backend="quanto", config=config, nbits=bits)


def torch_unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """quanto's own pure-torch unpacking of 2- or 4-bit codes from uint8 (optimum/quanto/library/unpack.py)."""
    parts = [(packed & (2 ** (bits * (index + 1)) - 1)) >> (bits * index) for index in range(8 // bits)]
    return torch.cat(parts).to(torch.uint8)


def quanto_unpack() -> str:
    """How quanto unpacks its codes on this device. Its CUDA unpack kernel lives in an extension that quanto compiles
    on first use (nvcc, several minutes, with marlin and AWQ kernels the KV cache never uses); where that extension is
    not built yet, quanto's CUDA unpack is pointed at quanto's own pure-torch unpacking instead."""
    if not torch.cuda.is_available():
        return "quanto's torch implementation (CPU)"
    try:
        from optimum.quanto.library.extensions import cuda as quanto_cuda
    except ImportError:
        return "unknown (optimum.quanto.library.extensions.cuda not found)"
    extension = quanto_cuda.ext
    if extension._lib is not None:
        return "quanto's CUDA extension"
    version_file = Path(extension.build_directory) / "pytorch_version.txt"
    if version_file.exists() and version_file.read_text().strip() == torch.__version__:
        return "quanto's CUDA extension (built before)"
    from types import SimpleNamespace

    extension._lib = SimpleNamespace(unpack=torch_unpack)
    return "quanto's torch unpacking on CUDA (its CUDA extension is not built)"


# kvtier's configurations (TierConfig fields; budget_gb is set per run)
KVTIER_CONFIGS = {
    "kvtier-int4": dict(on_budget_full="raise"),  # warm only: every page INT4 on the GPU
    "kvtier-int4-host": dict(on_budget_full="offload"),  # INT4, pages past the budget in pinned host memory
    "kvtier-tq3-host": dict(on_budget_full="offload", warm_format="turboquant", turboquant_bits=3),
}
BASELINES = ("dense", "offloaded", "quanto-int4")
CACHES = BASELINES + tuple(KVTIER_CONFIGS)
LABELS = {"dense": "transformers DynamicCache", "offloaded": "transformers DynamicCache(offloading=True)",
          "quanto-int4": "transformers QuantizedCache (quanto, 4-bit)", "kvtier-int4": "kvtier INT4, warm only",
          "kvtier-int4-host": "kvtier INT4 + host tier", "kvtier-tq3-host": "kvtier TurboQuant 3-bit + host tier"}


def unavailable_reason(name: str, device: str) -> str | None:
    """Why a cache cannot run here at all (None when it can)."""
    if name == "quanto-int4" and not quanto_available():
        return QUANTO_MISSING
    if name == "offloaded" and not device.startswith("cuda"):
        return "DynamicCache(offloading=True) needs a CUDA device"
    return None


def new_cache(name: str, model, budget_gb: float, host_budget_gb: float | None, **kvtier_overrides):
    """An empty cache of configuration ``name`` for ``model`` (kvtier: attached, with ``kvtier_overrides`` as further
    TierConfig fields; detach with :func:`release`)."""
    if name == "dense":
        return DynamicCache(config=model.config)
    if name == "offloaded":
        return DynamicCache(config=model.config, offloading=True)
    if name == "quanto-int4":
        return quantized_cache(model.config, 4)
    settings = {**KVTIER_CONFIGS[name], **kvtier_overrides}
    if settings["on_budget_full"] == "offload":
        settings["host_budget_gb"] = host_budget_gb
    return kvtier.attach(model, budget_gb=budget_gb, **settings).new_cache()


# What the capacity scripts give every kvtier cache unless --kvtier says otherwise: their fills write pages without
# running attention and decode attends one query row, so the attention scratch is sized for 16-row prefill tiles
# (0.05 GB on the 8B shape) instead of TierConfig's 256 (0.23 GB); a chunked prefill still runs under it, 16 rows a tile
CAPACITY_TIER_FIELDS = ("query_tile=16",)


def add_memory_options(parser) -> None:
    """The options capacity.py and capacity_probe.py share: TierConfig overrides and the allocator's mode."""
    parser.add_argument("--kvtier", nargs="*", default=list(CAPACITY_TIER_FIELDS), metavar="FIELD=INT",
                        help="TierConfig fields (integers) for every kvtier cache (default: "
                             f"{' '.join(CAPACITY_TIER_FIELDS)}; --kvtier alone: TierConfig's own defaults)")
    parser.add_argument("--default-allocator", action="store_true",
                        help="keep the CUDA caching allocator's default mode; otherwise every cache runs with "
                             "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True (unless that variable is set already)")


def apply_memory_options(args) -> dict:
    """Before anything touches CUDA: set the allocator's mode (``args.allocator`` records it); return the TierConfig
    overrides. Expandable segments by default: memory a fill left reserved but unused in blocks of one size is reused
    for allocations of another, where the default mode can run out of memory with 0.4 GB free (capacity-probe-h200)."""
    if args.device.startswith("cuda") and not args.default_allocator:  # read when the CUDA allocator starts
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    args.allocator = os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "default") if args.device.startswith("cuda") else "n/a"
    return {field: int(value) for field, value in (item.split("=") for item in args.kvtier)}


def kvtier_overhead_bytes(name: str, model, batch: int, device: str, with_hot: bool = False,
                          **kvtier_overrides) -> int:
    """What kvtier configuration ``name`` reserves besides warm pages: attention scratch and the staging ring, and
    ``with_hot`` the hot tier (and rotation matrices) too."""
    cache = new_cache(name, model, 1.0, 1.0, **kvtier_overrides)
    try:
        fill_chunked(cache, model.config, batch, 1, device=device)
        return cache.scratch_bytes + cache.staging_bytes + (cache.hot_bytes if with_hot else 0)
    finally:
        del cache
        release(model)


def is_out_of_memory(error: BaseException) -> bool:
    """torch.OutOfMemoryError, or a RuntimeError in which CUDA or cuBLAS says it could not allocate."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and ("out of memory" in text or "ALLOC_FAILED" in text)


def release(model) -> None:
    """Detach kvtier if attached, and give back every freed block of device memory."""
    import gc

    if getattr(model, "_kvtier", None) is not None:
        kvtier.detach(model)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- results
def environment(device: str) -> dict:
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name()
    else:
        name = f"CPU ({platform.processor() or platform.machine()})"
    env = {"device": name, "torch": torch.__version__, "transformers": transformers.__version__,
           "python": platform.python_version(), "kvtier": kvtier.__version__}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    if quanto_available():
        import optimum.quanto

        env["optimum-quanto"] = optimum.quanto.__version__
        env["quanto_unpack"] = quanto_unpack()
    return env


def device_tag(device: str) -> str:
    """A short file-name tag: 'cpu', or the GPU's model ('h200')."""
    if not device.startswith("cuda"):
        return "cpu"
    name = torch.cuda.get_device_name().lower()
    for word in name.replace("nvidia", "").split():
        if any(char.isdigit() for char in word):
            return word
    return "cuda"


def write_results(result: dict, markdown: str, out: Path, name: str) -> None:
    """<out>/<name>.json and .md (call after every row, so that a run cut short keeps what it measured)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=1, default=str))
    (out / f"{name}.md").write_text(markdown)


def finish_results(result: dict, markdown, plot, out: Path, name: str) -> None:
    """The end of a run: the plot, the final JSON and markdown (``markdown(result)``), and the table printed last."""
    plot(result, out, name)
    table = markdown(result)
    write_results(result, table, out, name)
    print("\n" + table, flush=True)


def pyplot():
    """matplotlib's pyplot on the Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def latency_axes(axes, rows: list[dict], caches, labels: dict) -> None:
    """ms/token against context on log-log axes, a line per cache in ``caches`` (kvtier's solid, the others dashed)."""
    for cache in caches:
        points = sorted((row["context"], row["ms_per_token"]) for row in rows
                        if row["cache"] == cache and "ms_per_token" in row)
        if points:
            axes.plot(*zip(*points), marker="o", label=labels[cache],
                      linestyle="-" if cache.startswith("kvtier") else "--")
    axes.set_xscale("log", base=2)
    axes.set_yscale("log")
    axes.set_xlabel("context (tokens)")
    axes.set_ylabel("ms per decode step (median)")
    axes.legend(fontsize=7)


def save_figure(figure, out: Path, name: str) -> Path:
    path = out / f"{name}.png"
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    import matplotlib.pyplot as plt

    plt.close(figure)
    return path


def progress_bar(total: int, description: str, unit: str = "it"):
    """A tqdm bar that also reads well in a captured log (few refreshes), or a no-op without tqdm."""
    try:
        from tqdm import tqdm
    except ImportError:
        class _Silent:
            def update(self, _=1):
                pass

            def close(self):
                pass

            def set_postfix_str(self, _):
                pass
        return _Silent()
    return tqdm(total=total, desc=description, unit=unit, unit_scale=True, mininterval=10, leave=True)
