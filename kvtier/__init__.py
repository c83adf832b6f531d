"""kvtier: a tiered KV cache for Hugging Face transformers under a hard device-memory budget.

    kv = kvtier.attach(model, budget_gb=2.0)
    model.generate(input_ids, max_new_tokens=256)
    kv.stats()
    kvtier.detach(model)
"""

from .attach import KVTier, attach, detach
from .cache import TieredCache
from .config import TierConfig
from .errors import (BudgetExceededError, BudgetTooSmallError, DiskReadError, DiskWriteError, KVTierError,
                     UnsupportedModelError)

__all__ = [
    "KVTier", "TierConfig", "TieredCache", "attach", "detach",
    "BudgetExceededError", "BudgetTooSmallError", "DiskReadError", "DiskWriteError", "KVTierError",
    "UnsupportedModelError",
]
__version__ = "0.1.0"
