"""vLLM plugin for SSE-H.

`register()` is the `vllm.general_plugins` entry point (`sse_h = "sse_rl.models.vllm:register"` in pyproject), so an
SSE-H checkpoint loads in vLLM with no extra flags once `sse-rl` is installed:
    LLM(model=checkpoint_dir)          or          vllm serve checkpoint_dir
vLLM calls it in every process it starts (front end, engine core, workers, model-inspection subprocess), so it is
idempotent and imports nothing heavy beyond vLLM itself. Nothing here runs at import time: importing this package
does not need vLLM.
"""
from __future__ import annotations

ARCHITECTURE = "SSEHForCausalLM"
MODEL_TYPE = "sse_h"
MODEL_CLASS_PATH = "sse_rl.models.vllm.model:SSEHForCausalLM"
STATE_BACKEND_CLASS_PATH = "sse_rl.models.vllm.backend.SSEStateBackend"
MIXER_OP = "vllm::sse_h_mix"


def register() -> None:
    """Register the SSE-H config with transformers and the model, state backend and op with vLLM (idempotent)."""
    import sse_rl.models  # noqa: F401  (registers SSEHConfig / SSEHForCausalLM with the transformers Auto classes)
    from sse_rl.models.vllm import compat
    from vllm import ModelRegistry

    compat.check_version()
    compat.register_state_backend(STATE_BACKEND_CLASS_PATH)
    compat.register_splitting_op(MIXER_OP)
    compat.register_arch_convertor(MODEL_TYPE)
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        # Lazy "module:Class" form: vLLM imports the model only where it builds it.
        ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS_PATH)
