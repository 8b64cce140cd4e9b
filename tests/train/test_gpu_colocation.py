"""One GPU shared by a vLLM engine and a trainer rank (the colocated layout of the one-GPU recipes).

Runs the real `sse-rl train` entry on the tiny recipe with the engine and the trainer on the same GPU: the engine
sleeps (level 2) while the trainer runs, weights come back over CUDA IPC, and the probe shows the engine then
samples from exactly the trained weights. Needs CUDA (vLLM sleep mode and CUDA IPC do not exist on CPU); the CPU
suite covers the same controller path with the object store (tests/train/test_tiny_recipe.py).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.slow]  # vLLM sleep mode and CUDA IPC need a GPU

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "tiny_cpu.yaml"
ENGINE_SHARE = 0.3  # rollout.gpu_memory_utilization


@pytest.fixture(scope="module")
def run_rows(tmp_path_factory) -> list[dict]:
    from sse_rl.train import main

    out = tmp_path_factory.mktemp("colocated")
    main([str(RECIPE), f"out_dir={out}", "rollout.num_gpus_per_engine=0.4", "train.num_gpus_per_trainer=0.5",
          "rollout.sleep_level=2", f"rollout.gpu_memory_utilization={ENGINE_SHARE}", "rollout.enforce_eager=false",
          "train.steps=4", "eval.every=0", "run.save_every=0", "run.report_to=[]"])
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_weights_reach_the_engine_over_cuda_ipc(run_rows):
    steps = [r for r in run_rows if r["step"] > 0]
    assert len(steps) == 4
    for row in run_rows:  # step 0 is the initial push; every later sync follows an update
        assert row["probe/max_abs_diff"] < 2e-3, row
        assert row["time/sync"] > 0
    assert all(r["train/skipped_updates"] == 0 for r in steps)


def test_sleeping_engine_leaves_its_memory_to_the_trainer(run_rows):
    total = torch.cuda.get_device_properties(0).total_memory / 2**30
    assert run_rows[0]["time/engine_wake"] > 0  # asleep from the trainer's start-up until the first sync
    for row in (r for r in run_rows if r["step"] > 0):
        assert row["time/engine_sleep"] > 0 and row["time/engine_wake"] > 0
        # awake, the engine holds ENGINE_SHARE of the GPU; asleep (level 2) only its CUDA context is left
        assert row["train/gpu_free_gib"] > total * (1 - ENGINE_SHARE / 2), (row["train/gpu_free_gib"], total)
        assert row["train/gpu_alloc_retries"] == 0  # far from the memory limit, the allocator never had to retry
