"""sse-rl: GRPO post-training of SSE-H reasoning models. Subpackages: `sse_rl.models` (folder models/),
`sse_rl.rewards` (rewards/), `sse_rl.eval` (eval/) and the orchestration modules here."""
from __future__ import annotations

from pathlib import Path


def check_worker_imports(cwd: Path | None = None) -> None:
    """Fail early where Ray workers would import another sse-rl than this one.

    Ray puts the driver's working directory first on every worker's import path. Started from the root of a source
    checkout while sse-rl is installed from elsewhere (a non-editable install), the workers import the checkout's
    `sse_rl/` folder, which holds the orchestration only (models/, rewards/, eval/ sit beside it), and every actor
    dies on `No module named 'sse_rl.models'`.
    """
    local = (cwd or Path.cwd()) / "sse_rl" / "__init__.py"
    installed = Path(__file__).resolve()
    if local.is_file() and local.resolve() != installed:
        raise RuntimeError(
            f"the working directory {local.parent.parent} holds a source checkout of sse-rl, but sse-rl is imported "
            f"from {installed.parent}; Ray workers would import the checkout's sse_rl/ folder (no models/ in it). "
            "Run from another directory, or install the checkout in editable mode: pip install -e .")
