"""A byte budget: what a tier may hold, paid for before each allocation and refunded after each free."""

from __future__ import annotations


class ByteBudget:
    def __init__(self, limit_bytes: int):
        self.limit_bytes = limit_bytes
        self.used_bytes = 0

    def reserve(self, nbytes: int) -> bool:
        """Take ``nbytes`` if they fit; the caller allocates only after True."""
        if self.used_bytes + nbytes > self.limit_bytes:
            return False
        self.used_bytes += nbytes
        return True

    def release(self, nbytes: int) -> None:
        self.used_bytes -= nbytes

    @property
    def free_bytes(self) -> int:
        return self.limit_bytes - self.used_bytes
