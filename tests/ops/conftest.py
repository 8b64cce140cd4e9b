"""Kernel tests run the Triton kernels on the GPU when there is one, else on the CPU under TRITON_INTERPRET=1
(set by tests/conftest.py, before any test module can import a kernel module)."""
import pytest
import torch

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"


@pytest.fixture(autouse=True)
def _no_tf32():
    """fp32 comparisons need full-precision matmuls in the PyTorch reference too."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old
