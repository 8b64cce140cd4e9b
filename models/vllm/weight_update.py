"""In-place weight updates of a running vLLM engine (the RL path): no restart, CUDA graphs stay valid.

How to use (driver side, between `generate` calls):

    from sse_rl.models.vllm.weight_update import WORKER_EXTENSION, update_weights
    llm = LLM(model=checkpoint_dir, worker_extension_cls=WORKER_EXTENSION)
    ...
    update_weights(llm, policy.state_dict())          # HF names: all, or whole layers at a time, any number of times

or, from an async engine / another process, the two steps it performs:

    save_weights(named_tensors, path)                  # one safetensors file on storage the workers can read
    engine.collective_rpc("update_weights_from_file", args=(path,))   # every TP worker loads its shards
    # in-process engines (VLLM_ENABLE_V1_MULTIPROCESSING=0) may skip the file:
    #   llm.collective_rpc("update_weights_from_tensors", args=(dict_of_tensors,))
    engine.reset_prefix_cache()                        # cached KV blocks and SSE states came from the old weights

Choices:
- Tensors travel as a safetensors file (e.g. under /dev/shm), not as RPC arguments: vLLM serialises RPC arguments
  with msgpack, which turns tensors into lists. Each worker reads the whole file and lets the model's TP weight
  loaders take its shard, exactly as at engine start.
- Loading goes through vLLM's in-place reload (`model_runner.reload_weights`): it restores each layer's
  checkpoint-format parameters, runs `SSEHForCausalLM.load_weights`, re-runs the layer's post-load processing (on CPU
  vLLM re-packs GEMM weights into oneDNN handles, so a bare `load_weights` into the running model would fail there),
  and copies the results into the original storage, so captured CUDA graphs stay valid.
- Updates are validated first against the checkpoint the engine loaded (names, shapes, whole layers), so a bad
  update raises before the model is touched. A partial update leaves the other layers as they were (vLLM logs a
  "Failed to load weights" warning for each of them).
- Recurrent states of requests are per request and there are none between `generate` calls; prefix-cached states
  and KV blocks are dropped by `reset_prefix_cache`, which must succeed (no request may be running).
"""
from __future__ import annotations

import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from sse_rl.models.vllm import compat
from vllm import LLM

WORKER_EXTENSION = "sse_rl.models.vllm.weight_update.WeightUpdateExtension"

NamedTensors = Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]


class WeightUpdateExtension:
    """Mixed into vLLM's worker class by `worker_extension_cls`; `self` is the worker (`self.model_runner`)."""

    def update_weights_from_file(self, path: str) -> list[str]:
        """Load the HF-named tensors of the safetensors file at `path`; returns the vLLM parameter names written."""
        with safe_open(path, framework="pt", device="cpu") as f:
            weights = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
        return self.update_weights_from_tensors(weights)

    def update_weights_from_tensors(self, weights: dict[str, torch.Tensor]) -> list[str]:
        """Same, for engines running in the caller's process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), where RPC
        arguments are passed as objects (CPU tensors, or GPU tensors such as views of CUDA IPC buffers).

        Other architectures (e.g. a Transformer policy served natively by vLLM for comparisons) go through the same
        reload without the SSE-H pre-validation; they must bring the whole model, and report all its parameters."""
        model = self.model_runner.model
        if not hasattr(model, "checkpoint_shapes"):
            compat.reload_weights(self.model_runner, weights.items())
            return sorted(name for name, _ in model.named_parameters())
        targets = check_update(model, weights)
        compat.reload_weights(self.model_runner, weights.items())
        return sorted(targets)


def check_update(model, weights: Mapping[str, torch.Tensor]) -> set[str]:
    """Validate an update against the checkpoint the engine loaded, before anything is touched; returns the vLLM
    parameter names it will write.

    vLLM reloads layer by layer (a layer is re-processed once all its parameters arrived, e.g. CPU GEMM weights are
    re-packed), so an update must bring every checkpoint tensor of each layer it touches (q, k and v together).
    """
    known = model.checkpoint_shapes  # HF name -> full shape, recorded at engine start
    if not weights:
        raise ValueError("the weight update is empty")
    unknown = sorted(set(weights) - set(known))
    if unknown:
        raise ValueError(f"weight update names not in the SSE-H checkpoint: {unknown[:8]}"
                         f"{' ...' if len(unknown) > 8 else ''}")
    bad = [f"{name} {tuple(t.shape)} != {known[name]}" for name, t in weights.items() if tuple(t.shape) != known[name]]
    if bad:
        raise ValueError(f"weight update shapes differ from the checkpoint: {bad[:8]}")
    module = {name: model.vllm_target(name)[0].rpartition(".")[0] for name in known}
    touched = {module[name] for name in weights}
    missing = sorted(name for name in known if module[name] in touched and name not in weights)
    if missing:
        raise ValueError(f"a weight update must contain whole layers; missing {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''}")
    return {model.vllm_target(name)[0] for name in weights}


def save_weights(weights: NamedTensors, path: str | Path) -> None:
    """Write HF-named tensors to one safetensors file (contiguous CPU copies; shared storage is allowed)."""
    items = weights.items() if isinstance(weights, Mapping) else weights
    tensors = {name: tensor.detach().to("cpu", copy=True).contiguous() for name, tensor in items}
    if not tensors:
        raise ValueError("update_weights got no tensors")
    save_file(tensors, str(path))


def update_weights_from_tensors(llm: LLM, weights: Mapping[str, torch.Tensor]) -> list[str]:
    """The in-process variant of `update_weights` (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, one worker): tensors are
    handed over as objects, on any device; returns the vLLM parameter names loaded."""
    loaded = llm.collective_rpc("update_weights_from_tensors", args=(dict(weights),))
    _reset_caches(llm)
    return loaded[0]


def _reset_caches(llm: LLM) -> None:
    if not llm.reset_prefix_cache():
        raise RuntimeError("weights were updated but the prefix cache could not be reset (requests still "
                           "running); update weights only between generate() calls")


def update_weights(llm: LLM, weights: NamedTensors, tmp_dir: str | Path | None = None) -> list[str]:
    """Push HF-named tensors into a running `vllm.LLM` built with `worker_extension_cls=WORKER_EXTENSION`.

    tmp_dir: where the transfer file goes (default: the system temp dir; /dev/shm avoids disk on Linux).
    Returns the vLLM parameter names loaded (as reported by the first worker).
    """
    with tempfile.TemporaryDirectory(dir=tmp_dir) as folder:
        path = Path(folder) / "weights.safetensors"
        save_weights(weights, path)
        loaded = llm.collective_rpc("update_weights_from_file", args=(str(path),))
    _reset_caches(llm)
    return loaded[0]
