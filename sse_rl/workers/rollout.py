"""The rollout worker: one vLLM engine (the SSE-H plugin loads through vLLM's plugin entry point) plus what training
needs: weight receive, sleep/wake, logprobs.

Choices:
1) Prompts go in as token ids, so the trainer scores exactly the tokens the engine saw.
2) The engine is the eval package's `Engine` (`sse_rl.eval.engines`), the stack evals sample with: one `EngineSpec`,
   and the seeding rule of `sse_rl.config.SamplingConfig`. A call may carry a seed: the engine's random stream
   restarts from it (on every worker) before the call, so a resumed run, which repeats the call, draws the same
   completions as an uninterrupted one.
3) Logprobs are vLLM's "processed" logprobs (after temperature), the distribution the samples came from; the
   trainer divides its logits by the same temperature.
4) Weight updates use the plugin's in-place path (`sse_rl.models.vllm.weight_update`): no restart. The run's
   weight transport (`sse_rl.weight_sync`) runs its engine end here (`connect_weights`, `receive_weights`) and
   loads through `load_weights` (a file every tensor-parallel worker reads) or `load_weights_in_process`: the
   engine core runs in this process (no extra process per engine on small machines), so tensors can reach the
   model runner as objects, e.g. views of a trainer's GPU buffers mapped over CUDA IPC.
5) An engine that shares its GPU with a trainer sleeps (vLLM sleep mode) while the trainer runs: level 1 keeps a
   CPU copy of the weights, level 2 drops them (the next sync rewrites every parameter).
6) The engine returns token ids only (`detokenize=False`); the texts are decoded in one batch when the call
   returns. vLLM's incremental detokenization, and its decoding of every sampled token for the logprobs, run on
   the engine's thread between decode steps, where they hold up every sequence of a long rollout.
7) Logprobs come back flat (`flat_logprobs`): a few lists per completion instead of a dict and a `Logprob` object
   per token, which the engine's thread would otherwise build between decode steps.
8) A weight update through a file stages it in `<STAGING_PARENT>/sse_rl-weights-<pid>-<random>/` (/dev/shm where
   there is one), removed when the update returns or fails. An engine killed during an update (SIGKILL, ray.kill,
   the end of a run) runs no clean-up, so every rollout worker first removes the staging folders whose process is
   gone (`remove_stale_staging`): a leftover copy of the model in /dev/shm lasts until the next engine starts.
9) With `EngineSpec.record_routes` the engine records every SSE layer's partitions (the plugin's route recorder,
   `docs/sse_layer.md`) and each rollout carries its sequence's record (prompt + completion, NO_ROUTE at the last
   sampled token): 1 byte per token, SSE layer and k. Each call takes every record the engine holds, so those of
   calls that return no rollouts (the weight-sync probe) are dropped there.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from sse_rl.config import SamplingConfig
from sse_rl.eval.engines import Engine, EngineSpec

if TYPE_CHECKING:
    from sse_rl.weight_sync import WeightTransport


@dataclass
class Rollout:
    """One completion of one prompt."""

    completion_ids: list[int]
    logprobs: list[float]  # engine logprob of each completion token
    text: str
    finish_reason: str  # "stop" (EOS / stop token) or "length" (hit max_tokens)
    # with route recording (choice 9): uint8 [len(prompt) + len(completion) - 1, SSE layers, K]; else None
    routes: np.ndarray | None = None


def request_params(sampling: SamplingConfig) -> Any:
    """The `SamplingParams` of every rollout request: the sampled token's logprob, flat, and token ids only (module
    doc, choices 3, 6 and 7); no seed of its own (choice 2)."""
    from vllm import SamplingParams

    return SamplingParams(n=sampling.n, max_tokens=sampling.max_tokens, temperature=sampling.temperature,
                          top_p=sampling.top_p, top_k=sampling.top_k, ignore_eos=sampling.ignore_eos, logprobs=0,
                          detokenize=False, flat_logprobs=True)


STAGING_PARENT = Path("/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir())
STAGING_PREFIX = "sse_rl-weights-"  # then the owning process's pid (choice 8)


@contextmanager
def staging_dir(parent: Path) -> Iterator[Path]:
    """A folder for one weight update, named after this process, removed when the update returns or fails."""
    with tempfile.TemporaryDirectory(prefix=f"{STAGING_PREFIX}{os.getpid()}-", dir=parent) as folder:
        yield Path(folder)


def remove_stale_staging(parent: Path) -> None:
    """Remove the staging folders under `parent` whose process no longer exists (killed during an update)."""
    for folder in parent.glob(f"{STAGING_PREFIX}*"):
        pid = folder.name.removeprefix(STAGING_PREFIX).partition("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # no signal sent: only whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _count_parameters(worker: Any) -> int:
    return sum(1 for _ in worker.model_runner.model.named_parameters())


class RolloutWorker(Engine):
    """An `Engine` for training; made a Ray actor by `sse_rl.actors` (`ray.remote(RolloutWorker)`)."""

    def __init__(self, spec: EngineSpec, *, enable_sleep_mode: bool = False) -> None:
        remove_stale_staging(STAGING_PARENT)  # choice 8
        # the engine core runs in this process (choice 4)
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        from sse_rl.models.vllm.weight_update import WORKER_EXTENSION

        super().__init__(spec, logprobs_mode="processed_logprobs", worker_extension_cls=WORKER_EXTENSION,
                         enable_sleep_mode=enable_sleep_mode)
        self.weight_sync: WeightTransport | None = None  # this engine's end of the run's transport (connect_weights)

    def generate(self, prompt_ids: list[list[int]], sampling: SamplingConfig,
                 seed: int | None) -> list[list[Rollout]]:
        """`sampling.n` completions for each prompt (in prompt order), sampled from the engine's random stream
        restarted from `seed` (None: continued)."""
        outputs = self.generate_batch(prompt_ids, request_params(sampling), seed)
        ids = [list(c.token_ids) for out in outputs for c in out.outputs]
        # as vLLM's own detokenizer: special tokens (EOS) skipped, no clean-up of spaces
        texts = self.llm.get_tokenizer().batch_decode(ids, skip_special_tokens=True,
                                                      clean_up_tokenization_spaces=False)
        made = iter(map(self._rollout, [c for out in outputs for c in out.outputs], ids, texts))
        rollouts = [[next(made) for _ in out.outputs] for out in outputs]
        if self.record_routes:
            self._attach_routes(outputs, rollouts)
        return rollouts

    def _attach_routes(self, outputs: list[Any], rollouts: list[list[Rollout]]) -> None:
        """Give each rollout its sequence's recorded routes (choice 9): tensor-parallel ranks route alike, so rank
        0's; keys as the plugin files them (`{i}_{request id}` for sample i of n > 1)."""
        from sse_rl.models.vllm.model import take_routes

        recorded = self.llm.collective_rpc(take_routes)[0]
        for out, group in zip(outputs, rollouts):
            for completion, rollout in zip(out.outputs, group):
                key = out.request_id if len(out.outputs) == 1 else f"{completion.index}_{out.request_id}"
                rollout.routes = recorded[key]

    @staticmethod
    def _rollout(completion: Any, ids: list[int], text: str) -> Rollout:
        """With logprobs=0 every position of the flat logprobs holds exactly the sampled token."""
        flat = completion.logprobs
        if list(flat.token_ids) != ids:
            raise RuntimeError(f"vLLM returned logprobs for tokens other than the {len(ids)} sampled ones "
                               f"({len(flat.token_ids)} entries)")
        return Rollout(ids, list(flat.logprobs), text, completion.finish_reason)

    def first_token_logprobs(self, prompt_ids: list[list[int]], k: int) -> list[dict[int, float]]:
        """The top-k logprobs (temperature 1) of the first generated token of each prompt: the weight-sync probe."""
        from vllm import SamplingParams

        params = SamplingParams(n=1, max_tokens=1, temperature=1.0, logprobs=k, seed=0)
        outputs = self.generate_batch(prompt_ids, params, None)
        return [{tok: lp.logprob for tok, lp in out.outputs[0].logprobs[0].items()} for out in outputs]

    def num_parameters(self) -> int:
        """How many parameters the engine's model has (a full weight update must write all of them)."""
        (count,) = self.llm.collective_rpc(_count_parameters)
        return count

    def connect_weights(self, transport: WeightTransport, *args: Any) -> Any:
        """Once, at start-up: keep this engine's copy of the run's weight transport and let it connect."""
        self.weight_sync = transport
        return transport.connect_engine(self, *args)

    def receive_weights(self, payload: Any) -> int:
        """Every sync: receive and load the trainers' weights (what `payload` is: the transport's); returns #params
        set."""
        return self.weight_sync.receive(self, payload)

    def load_weights(self, named: dict[str, torch.Tensor]) -> int:
        """Load HF-named CPU tensors in place through a safetensors file that every tensor-parallel worker reads (in
        a staging folder, choice 8); returns #params set."""
        from sse_rl.models.vllm.weight_update import update_weights

        with staging_dir(STAGING_PARENT) as folder:
            return len(update_weights(self.llm, named, tmp_dir=folder))

    def load_weights_in_process(self, named: dict[str, torch.Tensor]) -> int:
        """Load HF-named tensors on any device in place, handed to the in-process model runner as objects (one
        tensor-parallel worker); returns #params set."""
        from sse_rl.models.vllm.weight_update import update_weights_from_tensors

        return len(update_weights_from_tensors(self.llm, named))

    def sleep(self, level: int) -> None:
        """Free the engine's GPU memory for the trainer (no request may be running)."""
        self.llm.sleep(level=level)

    def wake_up(self, tags: list[str]) -> None:
        """Take the memory back: ["weights"] before a weight update, ["kv_cache"] before generating."""
        self.llm.wake_up(tags=tags)
