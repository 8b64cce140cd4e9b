"""`sse-rl sft` on a tiny SSE-H: loss falls, labels cover completions only, packed == unpacked per sequence,
resume continues the run, the final checkpoint loads with the Auto classes and generates; bad recipes name the key."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from sse_rl.config import RecipeError, SFTRecipe, load_recipe
from sse_rl.sft import FINAL_DIR, METRICS_FILE, build_trainer, main
from sse_rl.tasks.arithmetic import build_tokenizer, make_rows
from transformers import AutoModelForCausalLM, AutoTokenizer

RECIPE = {
    "model": {"init": {"preset": "sse-h-tiny", "seed": 0}},
    "data": {"train": "sse_rl.tasks.arithmetic:rows", "max_rows": 256},
    "train": {"lr": 3e-3, "warmup_steps": 0, "lr_schedule": "constant", "token_budget": 1024, "batch_tokens": 2048},
    "run": {"logging_steps": 1, "save_steps": 3, "keep_checkpoints": 1, "progress": False},
}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """An SFT run of 3 steps, then resumed to 6 (the second call picks up OUT_DIR/checkpoint-3)."""
    root = tmp_path_factory.mktemp("sft")
    recipe = root / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({**RECIPE, "out_dir": str(root / "run")}))
    tokenizer = build_tokenizer(root / "tokenizer")
    assert main([str(recipe), "train.steps=3", f"model.init.tokenizer={tokenizer}"]) == 0
    assert main([str(recipe), "train.steps=6", f"model.init.tokenizer={tokenizer}"]) == 0
    return root / "run"


@pytest.mark.slow
def test_loss_falls_and_resume_continues_the_run(run: Path) -> None:
    rows = [json.loads(line) for line in (run / METRICS_FILE).read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]  # resumed at 3, no step logged twice
    assert rows[-1]["loss"] < rows[0]["loss"] - 1.0, [r["loss"] for r in rows]
    assert all(r["aux_loss"] > 0 for r in rows)  # the SSE router balance loss is trained too
    assert (run / "sft_loss.png").stat().st_size > 0


@pytest.fixture(scope="module")
def batch_and_model(run: Path) -> tuple[dict, torch.nn.Module, AutoTokenizer]:
    recipe = load_recipe(run / "config.yaml", cls=SFTRecipe)
    trainer = build_trainer(recipe, str(run / FINAL_DIR), run / "inspect")
    batch = next(iter(trainer.get_train_dataloader()))
    return batch, trainer.model.eval(), trainer.processing_class


def sequences(position_ids: torch.Tensor) -> list[tuple[int, int]]:
    starts = (position_ids[0] == 0).nonzero().flatten().tolist() + [position_ids.shape[1]]
    return list(zip(starts, starts[1:]))


@pytest.mark.slow
def test_collated_labels_cover_exactly_the_completions(batch_and_model) -> None:
    batch, _, tok = batch_and_model
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    spans = sequences(batch["position_ids"])
    assert ids.shape[0] <= 1024 and len(spans) > 5  # one packed micro-batch of many problems
    solutions = {r["solution"] for r in make_rows("train")[:256]}
    for s, e in spans:
        text = tok.decode(ids[s:e])
        prompt, _, answer = text.partition("<|im_start|>assistant\n")
        assert prompt.startswith("<|im_start|>user\n") and answer.removesuffix("<|im_end|>\n") in solutions
        learned = labels[s:e][labels[s:e] != -100]
        assert tok.decode(learned) == answer  # the response and its end-of-turn, nothing of the prompt
        n_prompt = len(tok(prompt + "<|im_start|>assistant\n", add_special_tokens=False)["input_ids"])
        assert (labels[s:s + n_prompt] == -100).all() and (labels[s + n_prompt:e] == ids[s + n_prompt:e]).all()


@pytest.mark.slow
def test_packed_forward_equals_each_sequence_alone(batch_and_model) -> None:
    batch, model, _ = batch_and_model
    ids, labels = batch["input_ids"], batch["labels"]
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=batch["position_ids"]).logits[0]  # [L, V]
        for s, e in sequences(batch["position_ids"]):
            alone = model(input_ids=ids[:, s:e]).logits[0]  # [e - s, V]
            torch.testing.assert_close(packed[s:e], alone, atol=2e-4, rtol=1e-4)
            target = labels[0, s + 1:e]
            loss_packed = F.cross_entropy(packed[s:e - 1], target, ignore_index=-100)
            loss_alone = F.cross_entropy(alone[:-1], target, ignore_index=-100)
            assert abs(float(loss_packed) - float(loss_alone)) < 1e-4


@pytest.mark.slow
def test_final_checkpoint_loads_with_auto_classes_and_generates(run: Path) -> None:
    final = run / FINAL_DIR
    tok = AutoTokenizer.from_pretrained(final)
    model = AutoModelForCausalLM.from_pretrained(final).eval()
    assert model.config.model_type == "sse_h" and model.config.vocab_size == len(tok)
    prompt = tok.apply_chat_template([{"role": "user", "content": make_rows("test")[0]["problem"]}], tokenize=False,
                                     add_generation_prompt=True)
    inputs = tok(prompt, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > inputs["input_ids"].shape[1]
    trained = AutoModelForCausalLM.from_pretrained(run / "checkpoint-6")
    torch.testing.assert_close(model.state_dict(), trained.state_dict())  # final = the last step's weights


def test_bad_recipe_reports_every_key() -> None:
    with pytest.raises(RecipeError) as err:
        load_recipe(None, ["out_dir=runs/x", "data.train=a.jsonl", "model.path=m", "train.lrr=1",
                           "train.token_budget=1000", "train.batch_tokens=1500", "data.chat_template=maybe",
                           "model.checkpoint_every=2"], SFTRecipe)
    text = str(err.value)
    assert "train.lrr: unknown key" in text and "train.batch_tokens: 1500 must be a multiple" in text
    assert "model.checkpoint_every: 2, but SFT (TRL) recomputes every block" in text
    assert "data.chat_template: expected bool" in text


def test_demo_recipes_load_and_render_the_same_prompt() -> None:
    recipes = Path(__file__).resolve().parents[2] / "recipes"
    sft, grpo = load_recipe(recipes / "arith_sft.yaml", cls=SFTRecipe), load_recipe(recipes / "arith_grpo.yaml")
    assert sft.model.init.preset == "sse-h-small" and sft.model.dtype == grpo.model.dtype == "bfloat16"
    assert (sft.data.prompt_template, sft.data.chat_template) == (grpo.data.prompt_template, grpo.data.chat_template)
    # SFT learns from the slipped teacher; GRPO trains on the same problems and is scored on the true answers
    assert (sft.data.train, grpo.data.train) == ("sse_rl.tasks.arithmetic:slipped_rows", "sse_rl.tasks.arithmetic:rows")
    assert grpo.data.eval == grpo.data.train and grpo.data.eval_split == "test"
    r, t = grpo.rollout, grpo.train
    assert (r.sleep_level, r.num_gpus_per_engine, t.num_gpus_per_trainer) == (2, 0.4, 0.5)
