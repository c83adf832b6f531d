"""Saving a whole tiered cache to a directory and loading it back, so that a long shared prefix is prefilled once.

A session directory holds ``manifest.json``, one ``layer-NNN.bin`` per decoder layer and, for a policy that keeps
state (attention_mass's per-page history), one ``policy-NNN.bin`` per layer. A layer file is what
:meth:`TieredLayer.pages_in_order` yields, byte runs back to back, in position order; a policy file is the tensors
:meth:`PagePolicy.state` returns, back to back. The manifest lists each run's (tier, start position, bytes), each
policy tensor's (name, dtype, shape) and each file's size and SHA-256, and carries the token ids the cache holds (so
that a continuation can be checked against them), the left-padding mask, the model's identity (its config, a hash
of it, the dtype, a fingerprint of the first embedding rows), the TierConfig (the policy by name), the warm format's
label and the file format's version. The manifest carries its own SHA-256 over the rest of it.

Loading checks everything before it builds anything, builds the whole cache in memory, and either returns it or
raises a :class:`~kvtier.errors.SessionError` (naming what differs, expected and found, and what to do) having
released whatever it had reserved. Each layer's policy takes back its saved state (``PagePolicy.load_state``), so
the loaded cache demotes and evicts as the saved one would have; a cache loaded with another policy than it was
saved with starts that policy afresh.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch

from .cache import TieredCache
from .config import TierConfig
from .errors import KVTierError, SessionCorruptError, SessionMismatchError
from .formats import make_format, make_low_format
from .policies import POLICIES, make_policy, policy_name

FORMAT_VERSION = 3  # 2: each layer's policy state (policy-NNN.bin); 3: INT4 pages with one-byte key scale codes
MANIFEST = "manifest.json"
# TierConfig fields that decide what a page, the hot buffer or a layer's tiers hold: a session saved with one value
# cannot be read with another. The rest (budgets, policy, kernels, prefetch) may change between save and load.
PAGE_CONFIG_FIELDS = ("sink_tokens", "recent_window", "block_size", "warm_format", "turboquant_bits", "turboquant_qjl",
                      "turboquant_center_keys", "key_axis", "key_group", "rotate", "rotation_seed", "low_bits",
                      "low_key_bits")
# config entries that say how a model is run or named, not what it computes
VOLATILE_MODEL_FIELDS = ("_name_or_path", "_attn_implementation", "_attn_implementation_autoset", "transformers_version",
                         "dtype", "torch_dtype", "architectures", "use_cache", "return_dict", "output_attentions",
                         "output_hidden_states", "_commit_hash")
FINGERPRINT_ROWS = 16  # embedding rows hashed into the model fingerprint


# ------------------------------------------------------------------------------------------------ save
def save_cache(cache: TieredCache, path, token_ids: torch.Tensor | None = None, model=None) -> Path:
    """Write ``cache`` to the directory ``path`` (replacing an earlier session there); returns the path.

    ``token_ids`` (B, N): the tokens the cache holds (default: those the attached handle's generate() recorded).
    ``model``: adds a fingerprint of its embedding to the manifest (the handle passes its model)."""
    path = Path(path)
    if cache.layer_shape is None:
        raise KVTierError("kvtier: this cache holds no tokens yet; run generate() (or a forward pass) before saving.")
    batch, kv_heads, head_dim, dtype = cache.layer_shape
    token_ids = cache.token_ids if token_ids is None else token_ids
    total = cache.get_seq_length()
    if token_ids is None or tuple(token_ids.shape) != (batch, total):
        found = "none" if token_ids is None else f"shape {tuple(token_ids.shape)}"
        raise KVTierError(f"kvtier: saving needs the token ids the cache holds, (batch {batch}, {total} tokens); found "
                          f"{found}. Pass save(path, token_ids=sequence[:, :{total}]).")
    if path.exists() and not (path / MANIFEST).exists():
        raise KVTierError(f"kvtier: {path} exists and is not a kvtier session; choose a new directory.")
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))  # renamed into place when complete
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp makes it private; a session directory gets the usual permissions
    try:
        layers = [_write_layer(layer, staging) for layer in cache.layers]
        manifest = {
            "format_version": FORMAT_VERSION,
            "model": model_identity(cache.model_config, dtype, model),
            "tier_config": _config_dict(cache.config),
            "warm_format": cache.warm_format.label,
            "low_format": None if cache.low_format is None else cache.low_format.label,
            "shape": {"batch": batch, "kv_heads": kv_heads, "head_dim": head_dim, "num_layers": cache.num_layers},
            "tokens": total,
            "token_ids": token_ids.tolist(),
            "padding_mask": None if cache.padding_mask is None else cache.padding_mask.int().tolist(),
            "layers": layers,
        }
        manifest["sha256"] = _manifest_hash(manifest)
        (staging / MANIFEST).write_text(json.dumps(manifest))
        if path.exists():
            shutil.rmtree(path)
        os.replace(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return path


def _write_layer(layer, directory: Path) -> dict:
    runs = []

    def page_bytes():
        for tier, start, data in layer.pages_in_order():
            raw = data.numpy().tobytes()
            runs.append([tier, start, len(raw)])
            yield raw

    written = _write_file(directory / f"layer-{layer.layer_idx:03d}.bin", page_bytes())
    return {**written, "runs": runs, "evicted_tokens": layer.evicted_tokens,
            "policy_state": _write_policy_state(layer, directory)}


def _write_policy_state(layer, directory: Path) -> dict | None:
    """The layer's policy state (PagePolicy.state: attention_mass folds its pending observations in first) as one file
    of its tensors back to back; its manifest entry, or None for a policy that keeps no state."""
    state = layer.policy.state()  # name -> tensor on the CPU
    if not state:
        return None
    tensors = [[name, str(tensor.dtype).replace("torch.", ""), list(tensor.shape)] for name, tensor in state.items()]
    raws = (tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes() for tensor in state.values())
    return {**_write_file(directory / f"policy-{layer.layer_idx:03d}.bin", raws), "tensors": tensors}


def _write_file(file: Path, chunks) -> dict:
    """Write the byte strings ``chunks`` back to back to ``file``; its manifest entry (file name, bytes, SHA-256)."""
    digest, size = hashlib.sha256(), 0
    with open(file, "wb") as out:
        for raw in chunks:
            out.write(raw)
            digest.update(raw)
            size += len(raw)
    return {"file": file.name, "bytes": size, "sha256": digest.hexdigest()}


# ------------------------------------------------------------------------------------------------ load
def load_cache(path, model, config: TierConfig | None = None) -> TieredCache:
    """A TieredCache holding the session saved at ``path``, on ``model``'s device, ready for
    ``model.generate(sequence, past_key_values=cache)``. The TierConfig is ``config``, else the one kvtier is attached
    to ``model`` with, else the saved one; its page-format fields must equal the saved ones."""
    path = Path(path)
    manifest = _read_manifest(path)
    dtype = _check_model(manifest["model"], model)
    config = _choose_config(manifest, model, config)
    blobs = [_read_file(path, entry) for entry in manifest["layers"]]  # every checksum before anything is built
    states = _policy_states(path, manifest, config)
    shape = manifest["shape"]
    if len(blobs) != model.config.num_hidden_layers:
        raise SessionCorruptError(f"kvtier: {path} holds {len(blobs)} layers, the model has "
                                  f"{model.config.num_hidden_layers}.")
    mask = manifest["padding_mask"]
    cache = TieredCache(config, model.config, padding_mask=None if mask is None else torch.tensor(mask))
    device = next(model.parameters()).device
    try:
        empty = torch.empty(shape["batch"], shape["kv_heads"], 0, shape["head_dim"], dtype=dtype, device=device)
        for layer, blob, entry, state in zip(cache.layers, blobs, manifest["layers"], states):
            layer.lazy_initialization(empty, empty)
            layer.restore_pages(_runs(blob, entry["runs"]))
            if state is not None:
                layer.policy.load_state(state)
            if layer.evicted_tokens != entry["evicted_tokens"]:  # a page missing from the runs would look evicted
                raise SessionCorruptError(f"kvtier: layer {layer.layer_idx} of {path} restored "
                                          f"{layer.evicted_tokens} evicted tokens; its manifest says "
                                          f"{entry['evicted_tokens']}. The session is damaged: save it again.")
        if cache.get_seq_length() != manifest["tokens"]:
            raise SessionCorruptError(f"kvtier: {path} restored {cache.get_seq_length()} tokens; its manifest says "
                                      f"{manifest['tokens']}.")
        cache.token_ids = torch.tensor(manifest["token_ids"], dtype=torch.long)
    except BaseException:
        _release(cache)
        del cache  # nothing half-loaded stays referenced from this frame while the error travels
        raise
    return cache


def _read_manifest(path: Path) -> dict:
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError:
        raise SessionCorruptError(f"kvtier: {path / MANIFEST} does not exist; save a session there with "
                                  "kv.save(path) first.") from None
    except (ValueError, UnicodeDecodeError) as error:
        raise SessionCorruptError(f"kvtier: {path / MANIFEST} is not valid JSON ({error}); the session is damaged: "
                                  "save it again.") from None
    version = manifest.get("format_version") if isinstance(manifest, dict) else None
    if version != FORMAT_VERSION:
        raise SessionMismatchError(f"kvtier: {path} has session format version {version}; this kvtier reads version "
                                   f"{FORMAT_VERSION}. Save the session again with this version of kvtier.")
    if manifest.get("sha256") != _manifest_hash(manifest):
        raise SessionCorruptError(f"kvtier: {path / MANIFEST} does not match its checksum (expected "
                                  f"{manifest.get('sha256')}, found {_manifest_hash(manifest)}); the session is "
                                  "damaged: save it again.")
    return manifest


def _read_file(path: Path, entry: dict) -> bytes:
    """The bytes of the session file ``entry`` names (a layer's pages or its policy state), checked against the
    size and SHA-256 the manifest gives it."""
    file = path / entry["file"]
    try:
        blob = file.read_bytes()
    except FileNotFoundError:
        raise SessionCorruptError(f"kvtier: {file} is missing; the session is incomplete: save it again.") from None
    if len(blob) != entry["bytes"]:
        raise SessionCorruptError(f"kvtier: {file} holds {len(blob):,} bytes, expected {entry['bytes']:,} (truncated "
                                  "or overwritten); the session is damaged: save it again.")
    found = hashlib.sha256(blob).hexdigest()
    if found != entry["sha256"]:
        raise SessionCorruptError(f"kvtier: {file} does not match its checksum (expected SHA-256 {entry['sha256']}, "
                                  f"found {found}); the session is damaged: save it again.")
    return blob


def _runs(blob: bytes, runs: list):
    """(tier, start, bytes (n,) uint8) for each run of a layer file, as TieredLayer.restore_pages takes them."""
    data, offset = torch.frombuffer(bytearray(blob), dtype=torch.uint8) if blob else torch.empty(0, dtype=torch.uint8), 0
    for tier, start, size in runs:
        yield tier, start, data[offset:offset + size]
        offset += size


def _policy_states(path: Path, manifest: dict, config: TierConfig) -> list[dict | None]:
    """Each layer's saved policy state, name -> tensor on the CPU, read and checked; None for every layer when the
    cache is loaded with another policy than it was saved with (that policy starts afresh), or for a layer saved
    with none."""
    saved, policy = manifest["tier_config"]["policy"], make_policy(config.policy)
    if saved != policy_name(config.policy):
        return [None] * len(manifest["layers"])
    states = []
    for index, entry in enumerate(manifest["layers"]):
        files = entry.get("policy_state")
        names = [] if files is None else [name for name, _, _ in files["tensors"]]
        if sorted(names) != sorted(policy.state_names):
            raise SessionMismatchError(f"kvtier: the session's {saved} state of layer {index} holds "
                                       f"{sorted(names)}; this {saved} keeps {sorted(policy.state_names)}. Load it "
                                       "with the version of the policy it was saved with, or with another policy "
                                       "(which starts afresh).")
        states.append(None if files is None else _tensors(path, files))
    return states


def _tensors(path: Path, entry: dict) -> dict[str, torch.Tensor]:
    """The tensors a policy file holds back to back, as its manifest entry's (name, dtype, shape) describe them."""
    blob = _read_file(path, entry)
    specs = [(name, getattr(torch, dtype), shape) for name, dtype, shape in entry["tensors"]]
    sizes = [math.prod(shape) * dtype.itemsize for _, dtype, shape in specs]
    if sum(sizes) != len(blob):
        raise SessionCorruptError(f"kvtier: {path / entry['file']} holds {len(blob):,} bytes; its tensors "
                                  f"{entry['tensors']} take {sum(sizes):,}. The session is damaged: save it again.")
    data = torch.frombuffer(bytearray(blob), dtype=torch.uint8) if blob else torch.empty(0, dtype=torch.uint8)
    state, offset = {}, 0
    for (name, dtype, shape), size in zip(specs, sizes):
        state[name] = data[offset:offset + size].clone().view(dtype).view(shape)  # clone: aligned for its dtype
        offset += size
    return state


def _release(cache: TieredCache) -> None:
    """Give back everything a half-built cache reserved: pages, host slabs, the hot tiers and scratch."""
    for layer in cache.layers:
        if layer.is_initialized:
            layer.reset()
    cache.device_budget.release(cache.hot_bytes + cache.scratch_bytes + cache.staging_bytes
                                if cache.layer_shape is not None else 0)


# ------------------------------------------------------------------------------------------------ identity
def model_identity(model_config, dtype: torch.dtype, model=None) -> dict:
    """What a session must be loaded into: the model's config (less how it is run), its hash, the dtype, and a
    fingerprint of its first embedding rows (cheap; tells apart checkpoints of one architecture)."""
    config = {key: value for key, value in model_config.to_dict().items() if key not in VOLATILE_MODEL_FIELDS}
    return {"config": config, "config_sha256": hashlib.sha256(json.dumps(config, sort_keys=True, default=str)
                                                              .encode()).hexdigest(),
            "dtype": str(dtype).replace("torch.", ""), "weights_fingerprint": weights_fingerprint(model)}


def weights_fingerprint(model) -> str | None:
    if model is None or model.get_input_embeddings() is None:
        return None
    rows = model.get_input_embeddings().weight[:FINGERPRINT_ROWS].detach().float().cpu().contiguous()
    return hashlib.sha256(rows.numpy().tobytes()).hexdigest()


def _check_model(saved: dict, model) -> torch.dtype:
    found = model_identity(model.config, model.dtype, model)
    if found["dtype"] != saved["dtype"]:
        raise SessionMismatchError(f"kvtier: the session was saved from a {saved['dtype']} model; this model is "
                                   f"{found['dtype']}. Load it into the model in {saved['dtype']} "
                                   f"(model.to(torch.{saved['dtype']})).")
    if found["config_sha256"] != saved["config_sha256"]:
        keys = sorted(set(saved["config"]) | set(found["config"]))
        differs = [f"{key}: saved {saved['config'].get(key)!r}, this model {found['config'].get(key)!r}" for key in keys
                   if json.dumps(saved["config"].get(key), sort_keys=True, default=str)
                   != json.dumps(found["config"].get(key), sort_keys=True, default=str)]
        raise SessionMismatchError(f"kvtier: the session was saved from another model (config hash "
                                   f"{saved['config_sha256'][:12]}, this model's {found['config_sha256'][:12]}; "
                                   f"{'; '.join(differs[:8])}). Load it into the model it was saved from.")
    if saved["weights_fingerprint"] and found["weights_fingerprint"] != saved["weights_fingerprint"]:
        raise SessionMismatchError(f"kvtier: the session was saved from a model with other weights (embedding "
                                   f"fingerprint {saved['weights_fingerprint'][:12]}, this model's "
                                   f"{found['weights_fingerprint'][:12]}). Load it into the checkpoint it was saved "
                                   "from.")
    return getattr(torch, saved["dtype"])


def _config_dict(config: TierConfig) -> dict:
    fields = {field.name: getattr(config, field.name) for field in dataclasses.fields(config)}
    return {**fields, "policy": policy_name(config.policy)}


def _choose_config(manifest: dict, model, config: TierConfig | None) -> TierConfig:
    saved = manifest["tier_config"]
    handle = getattr(model, "_kvtier", None)
    if config is None and handle is not None:
        config = handle.config
    if config is None:
        if saved["policy"] not in POLICIES:
            raise SessionMismatchError(f"kvtier: the session was saved with the policy object {saved['policy']}; "
                                       "attach kvtier to the model with that policy before loading.")
        known = {field.name for field in dataclasses.fields(TierConfig)}
        config = TierConfig(**{key: value for key, value in saved.items() if key in known})
    differs = [f"{name}: saved {saved.get(name)!r}, now {getattr(config, name)!r}" for name in PAGE_CONFIG_FIELDS
               if saved.get(name) != getattr(config, name)]
    if differs:
        raise SessionMismatchError(f"kvtier: the session's pages were written with another tier configuration "
                                   f"({'; '.join(differs)}). Attach (or pass config=) with the saved values.")
    labels = (make_format(config).label, getattr(make_low_format(config), "label", None))
    if labels != (manifest["warm_format"], manifest["low_format"]):
        raise SessionMismatchError(f"kvtier: the session's warm pages are {manifest['warm_format']} (low: "
                                   f"{manifest['low_format']}); this configuration writes {labels[0]} (low: "
                                   f"{labels[1]}). Attach with the saved warm format.")
    return config


def _manifest_hash(manifest: dict) -> str:
    body = {key: value for key, value in manifest.items() if key != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
