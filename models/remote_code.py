"""The SSE-H PyTorch code a checkpoint carries, so that `AutoModelForCausalLM.from_pretrained(dir,
trust_remote_code=True)` loads it where sse-rl is not installed. `SSEHConfig.save_pretrained` calls `write_remote_code`,
so every SSE-H checkpoint (training checkpoints, `final`, init-model, hybridize, sft, distill) has it.

Choices:
1) The files are this package's own modules, copied flat beside config.json (transformers loads remote code from
   one folder: a relative import `from .x import` means the file x.py there), with each `sse_rl.models...` import
   rewritten to the relative import of its copy. Any other `sse_rl` import left in a copy is an error here, not at
   the user's load.
2) The op is the PyTorch reference (`ops/naive.py`) behind a small generated `sse_h_ops.py` with the signatures of
   `sse_rl.models.ops`: no Triton, so the copy runs wherever torch and transformers do, slower on a GPU than the
   package (which picks the Triton kernels on CUDA).
3) `auto_map` names the copies for AutoConfig, AutoModel and AutoModelForCausalLM. With sse-rl imported and no
   trust_remote_code, transformers still takes the package's registered classes (model_type "sse_h"), and vLLM its
   plugin.
"""
from __future__ import annotations

import re
from pathlib import Path

_ROOT = Path(__file__).parent  # models/, installed as sse_rl.models
# module of this package -> (its source file, the name of its copy in a checkpoint)
COPIES: dict[str, tuple[Path, str]] = {
    "sse_rl.models.configuration": (_ROOT / "configuration.py", "configuration_sse_h"),
    "sse_rl.models.modeling": (_ROOT / "modeling.py", "modeling_sse_h"),
    "sse_rl.models.layers": (_ROOT / "layers.py", "sse_h_layers"),
    "sse_rl.models.ops.features": (_ROOT / "ops" / "features.py", "sse_h_features"),
    "sse_rl.models.ops.naive": (_ROOT / "ops" / "naive.py", "sse_h_naive"),
}
OPS_COPY = "sse_h_ops"  # stands in for sse_rl.models.ops (choice 2)
OPS_SOURCE = '''"""The SSE op of SSE-H remote code: the PyTorch reference of sse_rl.models.ops, same signatures."""
from .sse_h_features import SSEFeatures, sse_features
from .sse_h_naive import sse_aux_loss, sse_router
from .sse_h_naive import sse_chunk_varlen as sse_chunk
from .sse_h_naive import sse_decode

__all__ = ["SSEFeatures", "sse_aux_loss", "sse_chunk", "sse_decode", "sse_features", "sse_router"]
'''
AUTO_MAP = {
    "AutoConfig": "configuration_sse_h.SSEHConfig",
    "AutoModel": "modeling_sse_h.SSEHModel",
    "AutoModelForCausalLM": "modeling_sse_h.SSEHForCausalLM",
}
_IMPORT = re.compile(r"^(\s*)from (sse_rl\.models[\w.]*) import", re.MULTILINE)


def _relative(source: str, origin: Path) -> str:
    """`source` with each `from sse_rl.models.X import` made `from .COPY import` (choice 1)."""
    targets = {module: copy for module, (_, copy) in COPIES.items()} | {"sse_rl.models.ops": OPS_COPY}

    def rewrite(match: re.Match) -> str:
        module = match.group(2)
        if module not in targets:
            raise ValueError(f"{origin} imports {module}, which SSE-H remote code does not carry; add it to "
                             "models/remote_code.py COPIES")
        return f"{match.group(1)}from .{targets[module]} import"

    text = _IMPORT.sub(rewrite, source)
    if left := re.findall(r"^\s*(?:import|from) sse_rl\b.*$", text, re.MULTILINE):
        raise ValueError(f"{origin}: {left[0].strip()!r} cannot be rewritten for SSE-H remote code")
    return text


def write_remote_code(save_directory: str | Path) -> dict[str, str]:
    """Write the model's code into `save_directory` (created); returns the `auto_map` naming it."""
    out = Path(save_directory)
    out.mkdir(parents=True, exist_ok=True)
    for source, copy in COPIES.values():
        (out / f"{copy}.py").write_text(_relative(source.read_text(), source))
    (out / f"{OPS_COPY}.py").write_text(OPS_SOURCE)
    return dict(AUTO_MAP)
