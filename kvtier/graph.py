"""A decode step captured once in a CUDA graph and replayed (``TierConfig.cuda_graph``).

A replayed step cannot depend on anything the host decides per step, so everything that varies lives in fixed
device buffers the host updates in place before each replay (:class:`StaticStep`): the new token's slot in every
layer's hot buffer, the positions each row attends, and each layer's warm page count (``WarmPages.row_count``,
written as pages are stored), which the decode kernel reads on the device over a fixed grid. Pages stored between
replays are therefore read without a new capture. What moves tokens between tiers (every ``block_size`` steps, the
recent buffer's oldest block becomes a warm page) runs eagerly before the replay of the step whose token fills the
buffer, so a step reads the same tiers as an eager one. The graph is captured again only
when a buffer it reads has moved (:meth:`DecodeGraph.buffers`: a new warm slab below the others, a grown page
table, a reordered batch, a grown scratch buffer).

Cold pages (``prefetch="all"``, streamed) are copied within the step: each layer's chunks go from their host slabs
into the staging ring on the prefetcher's side stream, forked from the step's start and joined by the kernel that
reads them, so the graph holds the copies too. Chunks copy slab rows in multiples of 16 (rows not yet written hold
zeros and are masked by position), so the graph is captured again only when a layer's 16th page since the last
capture arrives, or a slab is added or dropped.

Steps a graph cannot serve run the model's own forward: prefill chunks, caches holding disk pages (read back by a host
thread), cold pages chosen on the host every step (``prefetch="topk"``, ``cold_attention="host"`` or "auto"),
low-precision pages, policies that want attention mass, sinks not filled yet, and forward arguments the static step
does not take. ``stats()["graph"]`` counts replays, captures and
eager steps, and says why the last eager step was eager.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

from .attention import use_kernel
from .compat import with_cache
from .errors import NonFiniteStatesError

PASSED_THROUGH = ("logits_to_keep", "use_cache", "return_dict")  # forward arguments the static step keeps (and
# the cache, named past_key_values or, in newer transformers, cache)
IGNORED_WHEN_FALSE = ("output_attentions", "output_hidden_states")  # and those it serves only when off
SERVED = ("attention_mask", "position_ids", "cache_position", "cache", "past_key_values")  # read into StaticStep


_WARMUP_STREAMS: dict[int, torch.cuda.Stream] = {}


def warmup_stream(device: int) -> "torch.cuda.Stream":
    """One side stream per device for the warm-up before a first capture: cuBLAS keeps a workspace (32 MiB on Hopper)
    for every stream it has run on, for the life of the process, so a fresh stream per graph would leak one each."""
    if device not in _WARMUP_STREAMS:
        _WARMUP_STREAMS[device] = torch.cuda.Stream(device)
    return _WARMUP_STREAMS[device]


@dataclass
class StaticStep:
    """The device buffers a captured decode step reads its varying parts from."""

    slot: torch.Tensor  # (1,) int64: where the new token goes in every layer's hot buffer
    kv_start: torch.Tensor  # (B,) int32: first position each row attends (after its left padding)
    kv_end: torch.Tensor  # (B,) int32: one past the last position (the new token's)
    nonfinite: torch.Tensor  # (L,) bool: layer l got NaN or Inf keys or values at this step
    input_ids: torch.Tensor  # (B, 1) int64
    position_ids: torch.Tensor  # (B, 1) int64
    cache_position: torch.Tensor  # (1,) int64

    @classmethod
    def empty(cls, batch: int, layers: int, device) -> "StaticStep":
        def zeros(*shape, dtype=torch.int64):
            return torch.zeros(*shape, dtype=dtype, device=device)

        return cls(zeros(1), zeros(batch, dtype=torch.int32), zeros(batch, dtype=torch.int32),
                   zeros(layers, dtype=torch.bool), zeros(batch, 1), zeros(batch, 1), zeros(1))


def why_cold_pages_are_eager(cache) -> str | None:
    """Why a step over cold pages cannot be the static step (None when it can: every cold page streams through the
    staging ring, copied within the step, the same chunks every step until a page arrives or leaves)."""
    config = cache.config
    if any(layer.disk_tokens() for layer in cache.layers):
        return "disk pages (a host thread reads them back every step)"
    if config.prefetch != "all":
        return f"cold pages under prefetch={config.prefetch!r} (the policy picks which to copy every step)"
    if config.cold_attention != "stream":
        return f"cold pages under cold_attention={config.cold_attention!r} (attended on the host, or chosen every step)"
    return None


def attends_one_range(attention_mask, length: int) -> bool:
    """Whether a (B, >= length) 2D mask lets each row attend one run of positions ending at the newest (zeros, then
    ones: left padding), what StaticStep's kv_start and kv_end describe; None attends everything. One host sync."""
    if attention_mask is None:
        return True
    if attention_mask.dim() != 2 or attention_mask.shape[1] < length:
        return False
    allowed = attention_mask[:, :length].bool()  # (B, length)
    start = allowed.int().argmax(-1)
    return bool((allowed.sum(-1) == length - start).all() & allowed[:, -1].all())


class DecodeGraph:
    """Serves a TieredCache's decode steps from one captured forward (``captured=False``: the same fixed-shape step,
    run eagerly each time, on any device: what the CPU tests compare against the eager path)."""

    def __init__(self, cache, captured: bool):
        self.cache = cache
        self.captured = captured
        self.step: StaticStep | None = None
        self.graph = None
        self.logits: torch.Tensor | None = None  # (B, 1, V) the captured forward's output
        self.captured_buffers = None
        self.copies = (0, 0)  # bytes and chunks the captured step copies from the cold tier
        self.replays = self.captures = self.eager_steps = 0
        self.capture_seconds = self.last_capture_seconds = 0.0
        self.eager_reason: str | None = None

    # ---------------------------------------------------------------- entry
    def forward(self, model_forward, input_ids=None, **kwargs):
        """The model's forward for generate(): a decode step the graph serves, or the eager forward."""
        cache_name = "cache" if kwargs.get("cache") is not None else "past_key_values"  # transformers 5.2x: cache=
        reason = self.why_eager(input_ids, kwargs.get(cache_name), kwargs)
        if reason is not None:
            self.eager_steps += 1
            self.eager_reason = reason
            return model_forward(input_ids=input_ids, **kwargs)
        self.prepare(input_ids, kwargs.get("attention_mask"), kwargs.get("position_ids"))
        options = {name: kwargs[name] for name in PASSED_THROUGH if name in kwargs} | {cache_name: self.cache}
        if not self.captured:
            logits = self.run(model_forward, options)
        else:
            buffers = self.buffers(), sorted(options.items(), key=lambda item: item[0])
            if buffers != self.captured_buffers:  # a moved buffer, or other forward options: capture again
                self.capture(model_forward, options)
                self.captured_buffers = self.buffers(), buffers[1]
            self.graph.replay()
            self.replays += 1
            if self.cache.prefetcher is not None:
                self.cache.prefetcher.moved_bytes += self.copies[0]
                self.cache.prefetcher.moved_chunks += self.copies[1]
            logits = self.logits
        self.finish()
        return CausalLMOutputWithPast(logits=logits.clone(), **with_cache(self.cache))

    def why_eager(self, input_ids, past_key_values, kwargs) -> str | None:
        """Why this forward call cannot be the static step, or None when it can."""
        cache = self.cache
        if past_key_values is not cache:
            return "another cache"
        if input_ids is None or input_ids.shape[1] != 1 or kwargs.get("inputs_embeds") is not None:
            return "not a one-token decode step"
        extra = [name for name, value in kwargs.items() if value is not None and name not in PASSED_THROUGH + SERVED
                 and not (name in IGNORED_WHEN_FALSE and value is False)]
        if extra:
            return f"forward arguments {sorted(extra)}"
        first = cache.layers[0]
        if not first.is_initialized or first.sink_count < cache.config.sink_tokens:
            return "the sinks are not filled yet"
        if first.hot_keys.shape[0] != input_ids.shape[0]:
            return "the batch changed"
        if not attends_one_range(kwargs.get("attention_mask"), first.total_tokens + 1):
            return "an attention mask that is not one range of positions per row (left padding)"
        if any(layer.offloaded_pages() for layer in cache.layers):
            reason = why_cold_pages_are_eager(cache)
            if reason is not None:
                return reason
        if any(layer.low_pages() is not None for layer in cache.layers):
            return "low-precision pages"
        if first.policy.wants_mass:
            return f"the policy {type(first.policy).__name__} reads attention mass every step"
        if self.captured and not use_kernel(cache.config.decode_kernel, True, first.warm.layout):
            return "the decode kernel cannot read these pages (decode_kernel, triton, or the page layout)"
        return None

    # ---------------------------------------------------------------- one step
    def prepare(self, input_ids, attention_mask, position_ids) -> None:
        """Write this step's inputs and positions into the static buffers (device copies, no host sync)."""
        cache, layer = self.cache, self.cache.layers[0]
        for each in cache.layers:  # a block boundary: the tier movement runs eagerly, before the step
            each.make_room_static()
        if cache.prefetcher is not None:
            cache.prefetcher.start_static_step()
        batch, total = input_ids.shape[0], layer.total_tokens
        if self.step is None or self.step.input_ids.shape[0] != batch:
            self.step = StaticStep.empty(batch, cache.num_layers, input_ids.device)
        step = self.step
        step.input_ids.copy_(input_ids)
        step.slot.fill_(cache.config.sink_tokens + layer.recent_count)
        step.kv_end.fill_(total + 1)
        if attention_mask is None:
            step.kv_start.zero_()
        else:  # left padding: each row attends from its first real token (generate() only appends ones)
            step.kv_start.copy_(attention_mask[:, :total + 1].int().argmax(-1))
        if position_ids is not None:
            step.position_ids.copy_(position_ids[:, -1:])
        else:
            step.position_ids.fill_(total)
        step.cache_position.fill_(total)

    def run(self, model_forward, options: dict) -> torch.Tensor:
        """The fixed-shape step through the model: (B, 1, V) logits. Attention masks are not built: each layer's
        attention reads the step's kv_start and kv_end."""
        step = self.step
        self.cache.static_step = step
        try:
            output = model_forward(input_ids=step.input_ids, position_ids=step.position_ids,
                                   cache_position=step.cache_position, attention_mask=None, **options)
        finally:
            self.cache.static_step = None
        return output.logits

    def capture(self, model_forward, options: dict) -> None:
        """(Re)capture the step; the first capture runs it once eagerly before (Triton compiles its kernels then)."""
        started = time.perf_counter()
        self.graph = self.logits = None  # the old graph's memory goes back before the new one is captured
        if self.captures == 0:
            side = warmup_stream(torch.cuda.current_device())
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self.run(model_forward, options)
            torch.cuda.current_stream().wait_stream(side)
        prefetcher = self.cache.prefetcher
        if prefetcher is not None:  # the warm-up's copies are done and forgotten; the graph makes its own
            prefetcher.start_static_step()
            moved = prefetcher.moved_bytes, prefetcher.moved_chunks
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.logits = self.run(model_forward, options)
        self.graph = graph
        if prefetcher is not None:  # counted at each replay instead (capturing copies nothing)
            self.copies = prefetcher.moved_bytes - moved[0], prefetcher.moved_chunks - moved[1]
            prefetcher.moved_bytes, prefetcher.moved_chunks = moved
        self.captures += 1
        self.last_capture_seconds = time.perf_counter() - started
        self.capture_seconds += self.last_capture_seconds

    def finish(self) -> None:
        """After the step: refuse NaN or Inf (one host sync), then count the new token in every layer."""
        cache, step = self.cache, self.step
        if cache.prefetcher is not None:
            cache.prefetcher.end_static_step()
        if cache.config.check_finite and bool(step.nonfinite.any()):
            layers = step.nonfinite.nonzero().flatten().tolist()
            for layer in cache.layers:  # the slot is past kv_end from now on, but attention reads whole hot pages
                layer.hot_keys.index_fill_(2, step.slot, 0)
                layer.hot_values.index_fill_(2, step.slot, 0)
            raise NonFiniteStatesError(
                f"kvtier: layers {layers} got keys or values with NaN or Inf at position {cache.layers[0].total_tokens} "
                "(a decode step served by the CUDA graph); nothing was stored. The model produced non-finite attention "
                "states: in float16 this is usually an overflow (run the model in bfloat16 or float32); otherwise check "
                "its weights and inputs. TierConfig(check_finite=False) skips this check.")
        for layer in cache.layers:
            layer.advance_static()

    def buffers(self) -> tuple:
        """Addresses of everything the captured step reads whose storage may move between steps."""
        layers = tuple((layer.hot_keys.data_ptr(), layer.hot_values.data_ptr(), layer.hot_table.data_ptr(),
                        layer.warm.base.data_ptr(), layer.warm.offsets.data_ptr(), layer.warm.positions.data_ptr())
                       for layer in self.cache.layers)
        scratch = tuple(buffer.data_ptr() for buffer in self.cache.workspace.buffers.values())
        prefetcher = self.cache.prefetcher
        cold = tuple(prefetcher.static_plan(layer) for layer in self.cache.layers if layer.offloaded_pages())
        if cold:  # the staging ring, and which slabs' rows each layer's chunks copy
            cold += (prefetcher.ring.base.data_ptr(),)
        return layers, scratch, cold, self.step.input_ids.data_ptr()

    def stats(self) -> dict:
        return {"captured": self.captured, "replays": self.replays, "captures": self.captures,
                "capture_s": self.capture_seconds, "last_capture_s": self.last_capture_seconds,
                "eager_steps": self.eager_steps, "eager_reason": self.eager_reason}
