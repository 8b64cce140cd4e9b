"""Comparison helpers shared by the kernel tests (imported by name: pytest puts this folder on sys.path)."""
import torch
from sse_rl.models.ops import SSEFeatures

# conftest.py of this folder sets TRITON_INTERPRET=1 when this is False.
ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"


def rel_err(ref: torch.Tensor, out: torch.Tensor) -> float:
    """Relative Frobenius error ||out - ref|| / ||ref|| in fp64 (fla's assert_close uses the RMS form of it)."""
    ref, out = ref.double(), out.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def assert_close(name: str, ref: torch.Tensor, out: torch.Tensor, tol: float) -> None:
    assert ref.shape == out.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    err = rel_err(ref, out)
    assert err < tol, f"{name}: relative error {err:.3e} >= {tol:.0e}"


def op_args(inputs: list[torch.Tensor]) -> dict[str, SSEFeatures | torch.Tensor]:
    """The keyword arguments `features` and `router_logits` of an SSE op, from [*SSEFeatures fields, router_logits]."""
    return {"features": SSEFeatures(*inputs[:7]), "router_logits": inputs[7]}
