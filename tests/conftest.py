import os

import torch

if not torch.cuda.is_available():  # the Triton kernels run on the CPU through Triton's interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import kvtier  # noqa: E402
from kvtier.models import load_smollm2  # noqa: E402


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (float32, CPU), loaded once per session."""
    torch.manual_seed(0)
    return load_smollm2()


@pytest.fixture
def attached(smollm2):
    """The model with kvtier attached (default config, 1 GB), detached again after the test."""
    model, tokenizer = smollm2
    handle = kvtier.attach(model, budget_gb=1.0)
    yield model, tokenizer, handle
    kvtier.detach(model)


def cuda_only():
    return pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
