"""kvtier: a tiered KV cache for Hugging Face transformers under a hard device-memory budget.

    kv = kvtier.attach(model, budget_gb=2.0)
    model.generate(input_ids, max_new_tokens=256)
    kv.stats()
    kv.save("session/"); cache = kvtier.load("session/", model)   # prefill once, continue later
    kvtier.detach(model)
"""

from .attach import KVTier, attach, detach
from .cache import TieredCache
from .config import TierConfig
from .errors import (AllocationError, BudgetExceededError, BudgetTooSmallError, DiskReadError, DiskWriteError,
                     KVTierError, NonFiniteStatesError, SessionCorruptError, SessionError, SessionMismatchError,
                     UnsupportedModelError)
from .session import load_cache as load

__all__ = [
    "KVTier", "TierConfig", "TieredCache", "attach", "detach", "load",
    "AllocationError", "BudgetExceededError", "BudgetTooSmallError", "DiskReadError", "DiskWriteError", "KVTierError",
    "NonFiniteStatesError", "SessionCorruptError", "SessionError", "SessionMismatchError", "UnsupportedModelError",
]
__version__ = "0.1.0"
