"""Host memory for the tiers: pinned at exactly the size asked for, and given back to the system when freed.

torch's caching host allocator (``pin_memory=True``) rounds every block up to a power of two and keeps a freed
block for later pinned allocations (in the process's RSS) until ``torch.accelerator.empty_host_cache()``: a cold
slab of 300 KiB pins 512 KiB, one of 48 MiB pins 64 MiB, and a dropped cache's slabs stay in the process. The host
budget is a promise about bytes, so the tiers' pinned rows come from here instead: an anonymous mapping of whole
pages (zero-filled by the system), registered with CUDA (``cudaHostRegister``) so that copies from it run
asynchronously and inside CUDA graphs, then unregistered and unmapped as soon as the last tensor viewing it is
freed. Freeing waits for the device first (as ``cudaFreeHost`` does), so no copy in flight reads unmapped memory.
"""

from __future__ import annotations

import mmap

import torch

PAGE_BYTES = mmap.PAGESIZE


def mapped_bytes(nbytes: int, pin: bool) -> int:
    """Host bytes an allocation of ``nbytes`` takes: whole pages when pinned (what the host budget pays)."""
    return -(-nbytes // PAGE_BYTES) * PAGE_BYTES if pin else nbytes


def host_zeros(nbytes: int, pin: bool) -> torch.Tensor:
    """(nbytes,) uint8 zeros in host memory, pinned for CUDA when ``pin`` (a RuntimeError if that fails)."""
    if not pin:
        return torch.zeros(nbytes, dtype=torch.uint8)
    mapping = PinnedMapping(-1, mapped_bytes(max(nbytes, 1), pin))
    whole = torch.frombuffer(mapping, dtype=torch.uint8)  # holds the mapping until every view of it is freed
    mapping.register(whole.data_ptr())
    return whole[:nbytes]


class PinnedMapping(mmap.mmap):
    """An anonymous mapping that stays registered with CUDA for as long as it lives."""

    address = 0  # where it is registered; 0 while it is not

    def register(self, address: int) -> None:
        _check(torch.cuda.cudart().cudaHostRegister(address, len(self), 0), f"cudaHostRegister of {len(self):,} bytes")
        self.address = address

    def __del__(self):
        if not self.address:
            return
        try:
            if not torch.cuda.is_current_stream_capturing():
                torch.cuda.synchronize()  # copies from these pages may still be in flight
            _check(torch.cuda.cudart().cudaHostUnregister(self.address), "cudaHostUnregister")
        except Exception:  # noqa: BLE001 -- at interpreter exit CUDA may be gone; the mapping is unmapped regardless
            pass
        self.address = 0


def _check(result, call: str) -> None:
    if int(result) != 0:
        raise RuntimeError(f"{call} failed: {torch.cuda.cudart().cudaGetErrorString(result)}")


__all__ = ["PAGE_BYTES", "PinnedMapping", "host_zeros", "mapped_bytes"]
