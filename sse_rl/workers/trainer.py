"""The trainer worker: one torch.distributed rank holding the SSE-H policy, its optimizer and scheduler.

Choices:
1) `train.strategy`: fsdp2 shards the policy with `fully_shard` (each SSEHBlock, the backbone's own parameters, the
   lm_head; gradients reduce-scattered, AdamW over the shards, bf16 compute / fp32 reduce for model.dtype=bfloat16);
   ddp keeps a full copy per rank and all-reduces the gradients after each mini-batch (autocast for bfloat16).
   Either way gradients are SUMMED across ranks: the loss weights already carry the 1/tokens (or 1/sequences)
   normalisation of the whole mini-batch, so the sum is exactly the single-process gradient (gloo / nccl).
   The backbone and lm_head are separate FSDP units because the packed forward calls them separately (logits only
   at completion positions), so tied embeddings need ddp.
2) Micro-batches are packed rows through the model's varlen path (`cu_seqlens`); logits are computed only at
   completion positions (lm_head on the gathered hidden states), never for prompt tokens.
3) pi_old is the policy before this step's updates: with one update per batch it is the same forward pass
   (detached); with several (ppo_epochs or mini_batches > 1) it is computed once up front.
4) A step whose loss or gradient norm is not finite is skipped on every rank (the all-reduced norm is identical).
   After the updates the non-finite weight entries are counted on the device and read with the step's statistics,
   so the controller can stop the run before such weights are synced or saved (`sse_rl.grpo.guard`).
5) The router load-balancing aux loss of the SSE layers is added with `algo.aux_loss_coef` (default: the policy
   config's `aux_loss_coef`), per micro-batch weighted by its share of the mini-batch tokens.
6) fsdp2 forwards are collectives: every rank runs as many micro-batches per mini-batch (zero-weight fillers pad
   the shorter lists) and every rank must enter `send_weights`, `first_token_logprobs` and `save`; the full
   HF-named state is gathered with `get_model_state_dict(full_state_dict)` (to rank 0's CPU for checkpoints and the
   object store). One rank holds the whole model anyway, so fsdp2 with a single rank trains unsharded.
7) Weight sync belongs to the run's transport (`sse_rl.weight_sync`): this rank keeps its copy (`connect_weights`)
   and runs its end of each sync there (`send_weights`, `release_weights`), on the weights `engine_weights` gives.
8) Any causal LM with an HF packed path trains here (SSE-H, or e.g. Qwen3 for comparisons): `cu_seqlens` goes to
   SSE-H only (others derive sequence boundaries from the restarting `position_ids`); the aux loss is SSE-H's.
9) After each step the CUDA caching allocator gives its free blocks back, so a sleeping engine on the same GPU can
   take its memory again.
10) No host-device synchronisation inside the micro-batch loop: the micro-batches are copied to the device up
   front, and the step statistics (`StepStats`) stay on the device until one read per step. The host can then
   queue the next micro-batch's kernels while the GPU still runs the last one.
11) `train.compile`: each decoder block runs under torch.compile (dynamic shapes; the SSE Triton op is a graph break)
   and so does the logprob/entropy head, which fuses the fp32 [N, V] temporaries: eager, elementwise work and copies
   take more of a micro-batch's GPU time than its matmuls (`bench/results/train_step_h100.md`). Compilation happens
   when the worker joins (`_compile_now`), not in the first step (a micro-batch of a new size class may still
   recompile once); the weight-sync probe runs eagerly. Gradient checkpointing recomputes the compiled blocks;
   fsdp2 shards the compiled blocks (tested on 2 gloo ranks).
12) Gradient checkpointing may cover every k-th block only (`model.checkpoint_every`): each block not recomputed
   saves a quarter of its compute per micro-batch and keeps its activations, so the setting trades memory for speed.
13) On CUDA the trainer allocates from expandable segments (`cuda_alloc`): micro-batches of many sizes otherwise
   fragment the cache by gigabytes, which a GPU shared with a sleeping engine does not have to spare.
14) The rollout/trainer mismatch is measured in every micro-step against pi_old over the tokens with loss weight
   (`sse_rl.grpo.mismatch`), and where the micro-batch carries the engine's routes the SSE-H forward also returns
   the partitions it used, compared with the engine's (the route-flip rate). `algo.routing_replay` passes the
   engine's routes into the forward (pi_old, the reference and the updates alike), so the trainer's SSE layers
   write where the engine's did; their weights stay the trainer's router probabilities.
15) `model.lm_head_fp32`: the final norm (SSE-H) and the LM head run in fp32 with autocast off; under fsdp2 both
   are units of their own with an fp32 compute policy, so their weights are never cast to bf16.
16) `train.offload_optimizer`: outside `train` the AdamW state lives in host memory (`OptimizerOffload`): it goes
   there after a phase's last optimizer step, before the cache is given back, and returns at the next phase's start,
   its copy overlapping the first micro-batches; the first optimizer step waits for it. `save` and `load` bring it
   back for the gather or the copy into it, then send it to the host again (at 2B, 16.9 GiB more on the device for
   the length of a save, beside the woken engine). The host buffers for AdamW's moments are pinned when the worker
   joins, not in the first step.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from sse_rl import checkpoint, rendezvous
from sse_rl.config import AlgoConfig, TrainConfig
from sse_rl.grpo import mismatch
from sse_rl.grpo.logprobs import logprobs_and_entropy
from sse_rl.grpo.losses import LossInputs, PolicyLoss
from sse_rl.models.modeling import lm_head_logits
from sse_rl.packing import MicroBatch, Sequence, pack
from sse_rl.step_stats import StepStats
from sse_rl.workers import cuda_alloc
from sse_rl.workers.optimizer_offload import OptimizerOffload

if TYPE_CHECKING:
    from sse_rl.weight_sync import WeightTransport

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)  # whole tensors, on rank 0's CPU only


@dataclass
class _Extra:
    """Per-micro-batch tensors computed before the updates."""

    old_logp: Tensor | None  # [N]
    ref_logp: Tensor | None  # [N]


def _lr_lambda(schedule: str, warmup: int, total: int):
    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "cosine":
            progress = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return fn


def _shard(model: torch.nn.Module, mp: MixedPrecisionPolicy, fp32_head: bool = False) -> None:
    """fully_shard each SSEHBlock, then the backbone (embeddings, final norm) and the lm_head, on one flat mesh; with
    `fp32_head` the final norm and the lm_head are units computed in fp32 (choice 15)."""
    from torch.distributed.device_mesh import init_device_mesh

    if model.config.tie_word_embeddings:
        raise ValueError("train.strategy=fsdp2: the policy ties lm_head to the embeddings, which the packed forward "
                         "shards as separate units; use train.strategy=ddp for this model")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    mesh = init_device_mesh(device, (dist.get_world_size(),))
    fp32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
    norm = [model.model.norm] if fp32_head else []  # a unit of its own (inside the backbone's) for its policy
    units = [*model.model.layers, *norm, model.model, model.lm_head]
    for unit in units:
        head = fp32_head and (unit is model.lm_head or unit is model.model.norm)
        fully_shard(unit, mesh=mesh, mp_policy=fp32 if head else mp)
    for unit in units:  # sum, not mean: the loss weights are already normalised (plain SUM: gloo has no PREMUL_SUM)
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)


def recomputed_blocks(num_layers: int, checkpoint_every: int) -> list[bool]:
    """Which decoder blocks gradient checkpointing recomputes: 0, k, 2k, ... (k = checkpoint_every; 0 = none)."""
    return [checkpoint_every > 0 and i % checkpoint_every == 0 for i in range(num_layers)]


def _alloc_retries(device: torch.device) -> int:
    """How often the CUDA caching allocator has run out, freed its cache and retried (each time it waits for the
    GPU): many retries in a train phase mean it runs at the memory limit, slowly."""
    return torch.cuda.memory_stats(device).get("num_alloc_retries", 0) if device.type == "cuda" else 0


def _graphs_compiled() -> int:
    """How many graphs torch.compile has compiled in this process: one that grows inside a step means a micro-batch
    of a new size class recompiled (seconds each at 2B)."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def _filler() -> MicroBatch:
    """A two-token micro-batch that contributes nothing (weight 0, aux weight 0): pads a rank's list under fsdp2."""
    (mb,) = pack([Sequence([0], [0], [0.0], advantage=0.0, weight=0.0)], token_budget=2)[0]
    mb.aux_weight = 0.0
    return mb


def _checkpoint_names(state: dict[str, Tensor], config: Any) -> dict[str, Tensor]:
    """`state` under the names the policy's checkpoint holds, which are the names engines accept: without
    `lm_head.weight` when the LM head is tied to the embeddings (save_pretrained stores that tensor once, under the
    embeddings' name)."""
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return state


class TrainerWorker:
    """Made a Ray actor by the controller; all ranks receive the same calls with their own micro-batches."""

    def __init__(self, model_path: str, *, rank: int, world_size: int, train: TrainConfig, algo: AlgoConfig,
                 temperature: float, seed: int, dtype: str, gradient_checkpointing: bool, checkpoint_every: int = 1,
                 lm_head_fp32: bool = False):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        import sse_rl.models  # noqa: F401  (registers SSE-H with the Auto classes)

        torch.set_num_threads(train.threads_per_trainer)
        torch.manual_seed(seed + rank)
        self.rank, self.world_size = rank, world_size
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else \
            torch.device("cpu")
        self.expandable = self.device.type == "cuda" and cuda_alloc.use_for_trainer()
        self.fsdp = train.strategy == "fsdp2" and world_size > 1
        bf16 = dtype == "bfloat16"
        self.autocast_dtype = torch.bfloat16 if bf16 and not self.fsdp else None
        self.mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).to(self.device)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.sse = self.model.config.model_type == "sse_h"
        if algo.routing_replay and not self.sse:
            raise ValueError(f"algo.routing_replay replays SSE-H routes; the policy is a "
                             f"{self.model.config.model_type!r} model")
        self.routing_replay, self.lm_head_fp32 = algo.routing_replay, lm_head_fp32
        self.model.config.lm_head_fp32 = lm_head_fp32  # SSE-H's final norm (`lm_head_logits` is the head's)
        if gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            layers = self.model.model.layers
            for block, recompute in zip(layers, recomputed_blocks(len(layers), checkpoint_every)):
                block.gradient_checkpointing = recompute
        self.head = logprobs_and_entropy
        if train.compile:
            for block in self.model.model.layers:  # one graph per block kind; checkpointing wraps the compiled call
                block.compile(dynamic=True)
            self.head = torch.compile(logprobs_and_entropy, dynamic=True)  # fp32 [N, V] temporaries fused away
        self.model.train()
        self.ref = None
        if algo.kl_coef > 0:
            self.ref = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).to(self.device).eval()
            self.ref.requires_grad_(False)
            self.ref.config.lm_head_fp32 = lm_head_fp32
        self.train_cfg = train
        self.loss_fn = PolicyLoss(eps_low=algo.clip_eps_low, eps_high=algo.clip_eps_high, kl_coef=algo.kl_coef,
                                  is_correction=algo.is_correction, is_cap=algo.is_cap,
                                  kl_bias_correction=algo.kl_bias_correction)
        self.aux_coef = getattr(self.model.config, "aux_loss_coef", 0.0) if algo.aux_loss_coef is None \
            else algo.aux_loss_coef  # SSE-H's router balance loss; other policies have none
        self.multi_update = algo.ppo_epochs > 1 or algo.mini_batches > 1
        self.ppo_epochs, self.max_grad_norm, self.temperature = algo.ppo_epochs, train.max_grad_norm, temperature
        self.weight_sync: WeightTransport | None = None  # this rank's end of the run's transport (connect_weights)

    def _compile_now(self) -> None:
        """Compile at start-up, not in the first step: forward + backward of a micro-batch of two sequences that fill
        the token budget, gradients dropped. Shapes are dynamic, but Inductor also guards on the size ranges it saw
        (lower bounds on the token count, from its fusion and matmul-padding choices), so a tiny warm-up would leave
        the first step to recompile: the warm-up looks like a full micro-batch, and only micro-batches below such a
        bound (the packing's short tail) recompile, once (`bench/results/grpo_step.md`). Every rank (fsdp2
        collectives)."""
        half = max(self.train_cfg.token_budget // 2, 8)
        seqs = [Sequence([1, 2, 3], [4] * (half - 3), [0.0] * (half - 3), advantage=1.0, weight=1.0),
                Sequence([1, 2], [3] * (half - 7), [0.0] * (half - 7), advantage=1.0, weight=1.0)]
        (mb,) = pack(seqs, token_budget=2 * half)[0]  # sizes unlike each other: no duck-sized guard either
        mb = mb.to(self.device)
        self._micro_step(mb, self._extra(mb))  # also the no-grad passes a step makes (pi_old, reference)
        self.model.zero_grad(set_to_none=True)

    def address(self) -> tuple[str, int, str]:
        """(host, free port, secret) of a new group hosted here: rank 0's answer is where every rank meets, the
        trainers' group (`join`) and the weight-sync group alike. The host is loopback when the Ray cluster is
        this one node, else this node's IP (`sse_rl.rendezvous`)."""
        import ray
        from ray.util import get_node_ip_address

        alive = sum(1 for node in ray.nodes() if node["Alive"])
        host = rendezvous.meeting_host(alive, get_node_ip_address())
        return host, rendezvous.free_port(host), rendezvous.new_secret()

    def join(self, master_addr: str, master_port: int, secret: str = "") -> None:
        """Enter the torch.distributed group (nccl on GPU, gloo on CPU); all ranks call this together, with the
        address and secret of rank 0's `address()` (no secret: local test processes only)."""
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        store = rendezvous.open_store(master_addr, master_port, self.rank, self.world_size, secret)
        dist.init_process_group(backend, store=store, rank=self.rank, world_size=self.world_size)
        if self.fsdp:
            for model in (self.model, self.ref):
                if model is not None:
                    _shard(model, self.mp, self.lm_head_fp32 and self.sse)
        t = self.train_cfg  # the optimizer holds the (sharded) parameters, so it is built after sharding
        # fused: one kernel per parameter group on the GPU instead of a dozen passes of foreach kernels
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=t.lr, betas=tuple(t.adam_betas),
                                           weight_decay=t.weight_decay,
                                           fused=self.device.type == "cuda" and not self.fsdp)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _lr_lambda(t.lr_schedule, t.warmup_steps, t.steps))
        self.offload = OptimizerOffload(self.optimizer) if t.offload_optimizer else None
        if self.offload is not None:
            self.offload.reserve(("exp_avg", "exp_avg_sq"))  # AdamW's moments, shaped as the parameters
        if t.compile:  # after sharding: the graphs are traced over the modules the steps will run
            self._compile_now()

    # ----------------------------------------------------------------------------------------------------------
    def _forward(self, model: torch.nn.Module, mb: MicroBatch) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """(completion-token logprobs [N], aux loss [], entropy sum [], SSE partitions used [1, L, S, K] or None) of
        one packed micro-batch; the partitions only where it carries the engine's routes (choice 14)."""
        packed = {"cu_seqlens": mb.cu_seqlens} if self.sse else {}
        if self.sse and mb.routes is not None:
            packed.update(output_routes=True, routes=mb.routes if self.routing_replay else None)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            out = model.model(input_ids=mb.input_ids, position_ids=mb.position_ids,
                              use_cache=False, **packed)
            hidden = out.last_hidden_state[0, mb.target_pos]  # [N, D]
            logits = lm_head_logits(model.lm_head, hidden, fp32=self.lm_head_fp32)  # [N, V]
        logp, ent = self.head(logits, mb.targets, self.temperature)  # [N] fp32 each
        aux = getattr(out, "aux_loss", None)
        aux = torch.zeros((), device=self.device) if aux is None else aux.float()
        return logp, aux, ent.sum(), getattr(out, "routes", None)

    @torch.no_grad()
    def _logprobs(self, model: torch.nn.Module, mb: MicroBatch) -> Tensor:
        return self._forward(model, mb)[0]  # [N]

    def _extra(self, mb: MicroBatch) -> _Extra:
        """pi_old (only with several updates per batch) and reference logprobs (only with a KL term) of `mb`."""
        return _Extra(self._logprobs(self.model, mb) if self.multi_update else None,
                      self._logprobs(self.ref, mb) if self.ref is not None else None)

    def _micro_step(self, mb: MicroBatch, extra: _Extra) -> StepStats:
        """Forward + backward of one micro-batch; returns its statistics (detached scalars on the device)."""
        logp, aux, ent, routes = self._forward(self.model, mb)
        x = LossInputs(logp=logp, old_logp=logp.detach() if extra.old_logp is None else extra.old_logp,
                       rollout_logp=mb.rollout_logp, advantages=mb.advantages, weights=mb.weights,
                       seq_ids=mb.seq_ids, ref_logp=extra.ref_logp)
        loss, stats = self.loss_fn(x)
        (loss + self.aux_coef * mb.aux_weight * aux).backward()
        stats.entropy_sum, stats.aux_sum = ent, aux.detach() * mb.aux_weight
        return self._measure(stats, x, mb, routes)

    @staticmethod
    def _measure(stats: StepStats, x: LossInputs, mb: MicroBatch, routes: Tensor | None) -> StepStats:
        """`stats` with the micro-batch's rollout/trainer mismatch (choice 14): logprobs against pi_old, and routes
        where the forward returned the partitions it used."""
        measured = mismatch.logprob_stats(x.old_logp, mb.rollout_logp, mb.weights, mb.seq_ids, mb.response_pos)
        if routes is not None:
            measured |= mismatch.route_stats(mb.routes, routes)
        return dataclasses.replace(stats, **measured)

    def _optimizer_step(self) -> float:
        """All-reduce (sum) gradients, clip, step unless non-finite; returns the gradient norm (the step was skipped
        where it is not finite)."""
        if self.world_size > 1 and not self.fsdp:
            # every rank reduces the same tensors, even one that had no micro-batch (its gradients are zero)
            for p in self.model.parameters():
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        norm = float(norm.full_tensor() if self.fsdp else norm)  # a DTensor over the shards under fsdp2
        if math.isfinite(norm):
            if self.device.type == "cuda" and not self.optimizer.state:
                # AdamW creates its moments (2x the fp32 weights) in this first step; from a cache full of freed
                # activation blocks they would land inside those blocks' segments and pin them, so that
                # empty_cache could no longer give that memory back to the engines after training
                torch.cuda.empty_cache()
            if self.offload is not None:
                self.offload.ready()
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def _even_out(self, minibatches: list[list[MicroBatch]], filler: MicroBatch) -> list[list[MicroBatch]]:
        """fsdp2: pad each mini-batch to the longest list of any rank (each forward all-gathers the parameters)."""
        counts = torch.tensor([len(mini) for mini in minibatches], device=self.device)
        dist.all_reduce(counts, op=dist.ReduceOp.MAX)
        return [mini + [filler] * (n - len(mini)) for mini, n in zip(minibatches, counts.tolist())]

    def train(self, minibatches: list[list[MicroBatch]]) -> StepStats:
        """One GRPO step on this rank's share: `minibatches[j]` are its micro-batches of mini-batch j. Returns the
        step's statistics, with where its time went: preparing (micro-batches to the device, pi_old and reference
        passes queued), the updates (until the GPU is done), the optimizer state's copies with
        train.offload_optimizer and giving the cache back for the engines."""
        t0 = time.perf_counter()
        gpu_free = torch.cuda.mem_get_info(self.device)[0] / 2**30 if self.device.type == "cuda" else None
        if self.offload is not None:
            self.offload.restore()  # before the micro-batches: its copy overlaps what follows (choice 16)
        # every micro-batch goes to the device before the first forward: a blocking host-to-device copy
        # synchronises the stream, so copies between micro-batches would drain the GPU's queue once per micro-batch
        minibatches = [[mb.to(self.device) for mb in mini] for mini in minibatches]
        filler = _filler().to(self.device)
        retries, graphs = _alloc_retries(self.device), _graphs_compiled()
        if self.fsdp:
            minibatches = self._even_out(minibatches, filler)
        extras = {id(mb): self._extra(mb) for mini in minibatches for mb in mini}
        t1 = time.perf_counter()
        stats = self._updates(minibatches, extras, filler)
        t2 = time.perf_counter()  # _updates read the statistics: the GPU is done
        if self.offload is not None:
            moved = self.offload.offload()
            stats.offload_gib, stats.time_offload, stats.time_reload = moved.gib, moved.to_host_s, moved.to_device_s
        t3 = time.perf_counter()
        if self.device.type == "cuda":
            self._release_cache(stats, gpu_free, retries)
        stats.time_prepare, stats.time_updates, stats.time_release = t1 - t0, t2 - t1, time.perf_counter() - t3
        stats.graphs_compiled = float(_graphs_compiled() - graphs)
        return stats

    def _updates(self, minibatches: list[list[MicroBatch]], extras: dict[int, _Extra],
                 filler: MicroBatch) -> StepStats:
        """ppo_epochs passes, one optimizer step per mini-batch; the fillers' statistics are left out."""
        micro: list[StepStats] = []
        norms: list[float] = []
        for _ in range(self.ppo_epochs):
            for mini in minibatches:
                for mb in mini:
                    stats = self._micro_step(mb, extras[id(mb)])
                    if mb is not filler:
                        micro.append(stats)
                norms.append(self._optimizer_step())
        stats = StepStats.merge(micro) if micro else StepStats()
        stats.nonfinite_weights = self._nonfinite_weights()
        stats = stats.on_host()
        self.scheduler.step()
        stats.grad_norm = max([0.0, *(n if math.isfinite(n) else math.inf for n in norms)])
        stats.skipped = float(sum(not math.isfinite(n) for n in norms))
        stats.updates = float(len(norms))
        stats.lr = self.scheduler.get_last_lr()[0]
        return stats

    @torch.no_grad()
    def _nonfinite_weights(self) -> Tensor:
        """Non-finite entries of this rank's weights (its shards under fsdp2): a 0-d fp32 tensor on the device."""
        local = [p.to_local() if isinstance(p, DTensor) else p for p in self.model.parameters()]
        return torch.stack([(~torch.isfinite(p)).sum() for p in local]).sum().float()

    def _release_cache(self, stats: StepStats, gpu_free: float, retries: int) -> None:
        """GPU ranks: record what the GPU had free for this step and what the step used at peak, then give the cache
        back so the engines can wake into it, recording what stays reserved."""
        stats.gpu_free_gib = gpu_free
        stats.gpu_peak_gib = torch.cuda.max_memory_allocated(self.device) / 2**30
        torch.cuda.reset_peak_memory_stats(self.device)
        torch.cuda.empty_cache()
        stats.gpu_kept_gib = torch.cuda.memory_reserved(self.device) / 2**30
        stats.gpu_alloc_retries = float(_alloc_retries(self.device) - retries)

    # ----------------------------------------------------------------------------------------------------------
    def connect_weights(self, transport: WeightTransport, *args: Any) -> Any:
        """Once, at start-up: keep this rank's copy of the run's weight transport and let it connect."""
        self.weight_sync = transport
        return transport.connect_trainer(self, *args)

    def send_weights(self) -> Any:
        """Every rank, every sync: this rank's part of sending the current weights to the engines."""
        return self.weight_sync.send(self)

    def release_weights(self) -> None:
        """Every engine has loaded what this rank sent: let go of it."""
        self.weight_sync.release(self)

    def engine_weights(self, *, gather_to_cpu: bool) -> dict[str, Tensor]:
        """The full HF-named weights an engine loads (a collective under fsdp2: every rank must call): on rank 0's
        CPU with `gather_to_cpu` (the other ranks get {}), else on every rank's device."""
        options = FULL if gather_to_cpu else StateDictOptions(full_state_dict=True)
        return _checkpoint_names(get_model_state_dict(self.model, options=options), self.model.config)

    def engine_weight_shapes(self) -> dict[str, Tensor]:
        """`engine_weights` as meta tensors (names, shapes, dtypes): no gather, DTensor shapes are global."""
        shapes = {name: torch.empty(t.shape, dtype=t.dtype, device="meta")
                  for name, t in self.model.state_dict().items()}
        return _checkpoint_names(shapes, self.model.config)

    @torch.no_grad()
    def first_token_logprobs(self, prompt_ids: list[list[int]], tokens: list[list[int]]) -> list[list[float]]:
        """log softmax of the policy after each prompt, at the given tokens (the probe's trainer side). Eager even
        under train.compile: a few short prompts without gradients would otherwise compile a second set of graphs
        at start-up."""
        out = []
        with torch.compiler.set_stance("force_eager"):
            for ids, toks in zip(prompt_ids, tokens):
                logits = self.model(input_ids=torch.tensor([ids], device=self.device), use_cache=False).logits
                logp = torch.log_softmax(logits[0, -1].float(), dim=-1)  # [V]
                out.append(logp[torch.tensor(toks, device=self.device)].tolist())
        return out

    @contextlib.contextmanager
    def _optimizer_state_on_device(self) -> Iterator[None]:
        """With train.offload_optimizer: the optimizer state on the device for what runs inside (a gather, a load
        that copies into it or replaces it), then on the host again, the cache given back (choice 16)."""
        if self.offload is None:
            yield
            return
        self.offload.restore()
        self.offload.ready()
        yield
        self.offload.offload()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def save(self, path: str) -> None:
        """Every rank calls: full weights and FQN-keyed optimizer state are gathered, rank 0 writes them."""
        weights = get_model_state_dict(self.model, options=FULL)
        # the gathered state may hold the live tensors (one unsharded rank): written before they go to the host
        with self._optimizer_state_on_device():
            optim = get_optimizer_state_dict(self.model, self.optimizer, options=FULL)
            if self.rank == 0:
                checkpoint.save_trainer(Path(path), self.model, self.tokenizer, weights, optim, self.scheduler)
        dist.barrier()

    def load(self, path: str) -> None:
        """Restore weights, optimizer, scheduler and RNG from a checkpoint directory (every rank reads it)."""
        from safetensors.torch import load_file

        state = {}
        for shard in sorted((Path(path) / "model").glob("*.safetensors")):
            state.update(load_file(str(shard)))
        full = StateDictOptions(full_state_dict=True, strict=False)
        missing, unexpected = set_model_state_dict(self.model, state, options=full)
        if unexpected or [m for m in missing if m not in getattr(self.model, "_tied_weights_keys", {})]:
            raise ValueError(f"checkpoint {path} does not match the model: missing {missing}, unexpected {unexpected}")
        optim = checkpoint.load_trainer(Path(path), self.scheduler)
        with self._optimizer_state_on_device():  # the load copies into the current state, or creates it
            set_optimizer_state_dict(self.model, self.optimizer, optim,
                                     options=StateDictOptions(full_state_dict=True))
        # loading into a state not created yet steps the optimizer once with zero gradients, which stay allocated
        self.optimizer.zero_grad(set_to_none=True)

    def close(self) -> None:
        dist.destroy_process_group()
