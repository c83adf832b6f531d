"""kvtier.pinned: host rows of exactly the asked size, registered with CUDA while they live and given back when the
last view of them is freed. The CPU tests stand a recording fake in for CUDA's runtime; the CUDA test uses the real
one and checks the process's resident memory."""

import gc

import psutil
import pytest
import torch

from kvtier.pinned import PAGE_BYTES, host_zeros, mapped_bytes


class FakeRuntime:
    """Records cudaHostRegister / cudaHostUnregister calls; ``fail`` makes registering return an error code."""

    def __init__(self, fail: bool = False):
        self.registered: dict[int, int] = {}  # address -> bytes
        self.unregistered: list[int] = []
        self.fail = fail

    def cudaHostRegister(self, address, nbytes, flags):  # noqa: N802 -- CUDA's name
        if self.fail:
            return 2  # cudaErrorMemoryAllocation
        self.registered[address] = nbytes
        return 0

    def cudaHostUnregister(self, address):  # noqa: N802
        self.unregistered.append(address)
        return 0

    def cudaGetErrorString(self, code):  # noqa: N802
        return f"error {int(code)}"


@pytest.fixture
def runtime(monkeypatch):
    fake = FakeRuntime()
    monkeypatch.setattr(torch.cuda, "cudart", lambda: fake)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    return fake


@pytest.mark.parametrize("nbytes,expected", [
    (1, PAGE_BYTES), (PAGE_BYTES, PAGE_BYTES), (PAGE_BYTES + 1, 2 * PAGE_BYTES),
    (3 * 151_552 + 12, -(-(3 * 151_552 + 12) // PAGE_BYTES) * PAGE_BYTES),
])
def test_pinned_rows_take_whole_pages_and_unpinned_ones_exact_bytes(nbytes, expected):
    assert mapped_bytes(nbytes, pin=True) == expected
    assert mapped_bytes(nbytes, pin=False) == nbytes


@pytest.mark.parametrize("nbytes", [1, 4096, 300_000])
def test_pinned_rows_are_zeros_registered_once_and_unregistered_when_the_last_view_dies(runtime, nbytes):
    rows = host_zeros(nbytes, pin=True)
    assert rows.dtype == torch.uint8 and rows.shape == (nbytes,) and not rows.any()
    ((address, registered),) = runtime.registered.items()
    assert address == rows.data_ptr() and registered == mapped_bytes(nbytes, pin=True)
    view = rows[nbytes // 2:]
    del rows
    gc.collect()
    assert runtime.unregistered == []  # a view still lives
    view.fill_(7)
    del view
    gc.collect()
    assert runtime.unregistered == [address]


def test_a_failed_registration_raises_what_the_runtime_said_and_leaks_nothing(monkeypatch):
    fake = FakeRuntime(fail=True)
    monkeypatch.setattr(torch.cuda, "cudart", lambda: fake)
    with pytest.raises(RuntimeError, match=r"cudaHostRegister of [\d,]+ bytes failed: error 2"):
        host_zeros(10_000, pin=True)
    gc.collect()
    assert fake.unregistered == []  # nothing was registered, so nothing is unregistered


def test_unpinned_rows_are_plain_zeros():
    rows = host_zeros(1000, pin=False)
    assert rows.shape == (1000,) and not rows.any() and not rows.is_pinned()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_pinned_rows_copy_asynchronously_and_their_memory_leaves_the_process_when_freed():
    nbytes = 256 * 2**20
    process = psutil.Process()
    gc.collect()
    before = process.memory_info().rss
    rows = host_zeros(nbytes, pin=True)
    assert rows.is_pinned()
    rows.copy_(torch.arange(nbytes, dtype=torch.int64).to(torch.uint8))
    on_device = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        on_device.copy_(rows, non_blocking=True)
    stream.synchronize()
    assert torch.equal(on_device.cpu(), rows)
    assert process.memory_info().rss - before > 0.9 * nbytes  # resident while it lives
    del rows
    gc.collect()
    assert process.memory_info().rss - before < 0.1 * nbytes  # and given back, not cached
