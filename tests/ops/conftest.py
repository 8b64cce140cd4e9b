"""Kernel tests run the Triton kernels on the GPU when there is one, else on the CPU under TRITON_INTERPRET=1.

The variable must be set before any Triton kernel is decorated (triton reads it in `triton.jit`), so it is set
here, before the test modules of this folder import the kernel modules.
"""
import os

import pytest
import torch

ON_GPU = torch.cuda.is_available()
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"
DEVICE = "cuda" if ON_GPU else "cpu"


@pytest.fixture(autouse=True)
def _no_tf32():
    """fp32 comparisons need full-precision matmuls in the PyTorch reference too."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old
