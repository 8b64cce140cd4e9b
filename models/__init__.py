"""SSE-H (Sparse State Expansion hybrid) for transformers. Importing this package registers model_type "sse_h" with
AutoConfig / AutoModel / AutoModelForCausalLM, so `from_pretrained` needs no trust_remote_code."""
from sse_rl.models.configuration import SSEHConfig
from sse_rl.models.modeling import SSEHForCausalLM, SSEHModel
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

__all__ = ["SSEHConfig", "SSEHForCausalLM", "SSEHModel"]


def _register() -> None:
    """Register with the Auto classes; a second import (or another registrant of the same classes) is a no-op."""
    for auto, cls in ((AutoConfig, SSEHConfig), (AutoModel, SSEHModel), (AutoModelForCausalLM, SSEHForCausalLM)):
        key = SSEHConfig.model_type if auto is AutoConfig else SSEHConfig
        try:
            auto.register(key, cls)
        except ValueError as err:
            if "already" not in str(err):
                raise


_register()
