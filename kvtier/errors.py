"""Errors kvtier raises; each message says what was found and what to do."""


class KVTierError(RuntimeError):
    """Base class of kvtier's errors."""


class BudgetExceededError(KVTierError):
    """The GPU budget is full and the configuration says to raise rather than evict."""


class BudgetTooSmallError(KVTierError, ValueError):
    """The budget cannot even hold the hot window and the attention scratch."""


class AllocationError(KVTierError):
    """Memory for a tier could not be allocated (the device is out of memory, or a pinned host allocation failed)."""


class UnsupportedModelError(KVTierError, ValueError):
    """The model has a feature kvtier cannot serve (no attention interface, sliding windows, ...)."""


class DiskWriteError(KVTierError):
    """Writing a page to the disk tier failed (the disk is full, or the write failed); the page stayed where it was."""


class DiskReadError(KVTierError):
    """A disk page could not be read back, or its checksum did not match."""


class NonFiniteStatesError(KVTierError, ValueError):
    """Keys or values handed to the cache hold NaN or Inf."""


class SessionError(KVTierError):
    """A saved session cannot be loaded."""


class SessionMismatchError(SessionError, ValueError):
    """A saved session was written for another model, dtype, page format or session format version."""


class SessionCorruptError(SessionError):
    """A saved session's files are missing, truncated or do not match their checksums."""
