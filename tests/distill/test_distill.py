"""`sse-rl distill` on a tiny trained Transformer teacher: the align stage lowers every SSE layer's held-out MSE,
the logits stage lowers the held-out KL, a run killed with SIGKILL and run again logs what an uninterrupted run logs,
bad input fails naming the key with OUT_DIR untouched, and OUT_DIR/final is a checkpoint `sse-rl sft` starts from.
Also: the teacher treats packed rows as separate sequences, and the divergences agree with TRL's GKD loss."""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from sse_rl.config import RecipeError
from sse_rl.distill import (
    FINAL_DIR,
    METRICS_FILE,
    _gkd_loss,
    full_vocab_divergence,
    main,
    read_metrics,
    teacher_hidden,
    topk_divergence,
)
from sse_rl.tasks.arithmetic import make_rows
from transformers import AutoModelForCausalLM, AutoTokenizer

STEPS = 8


def write_rows(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, str]:
    """A qwen3-tiny teacher trained 40 SFT steps on arithmetic problems (so its distributions are far from uniform),
    the data as jsonl files, and a recipe base for distillation."""
    from sse_rl.sft import main as sft_main
    from sse_rl.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("distill")
    train_rows, test_rows = make_rows("train")[:600], make_rows("test")[:24]
    texts = [f"user\n{r['problem']}" for r in train_rows] + [f"assistant\n{r['solution']}" for r in train_rows]
    train_tokenizer(texts, root / "tokenizer", vocab_size=512)
    data = {"train": write_rows(root / "train.jsonl", train_rows), "eval": write_rows(root / "eval.jsonl", test_rows),
            "max_rows": 600, "eval_rows": 24}
    sft = {"out_dir": str(root / "teacher"),
           "model": {"init": {"preset": "qwen3-tiny", "tokenizer": str(root / "tokenizer"), "seed": 0}},
           "data": {"train": data["train"]},
           "train": {"steps": 40, "lr": 3e-3, "lr_schedule": "constant", "token_budget": 1024, "batch_tokens": 1024},
           "run": {"logging_steps": 40, "save_steps": 0, "progress": False}}
    (root / "sft.yaml").write_text(yaml.safe_dump(sft))
    assert sft_main([str(root / "sft.yaml")]) == 0
    recipe = {"teacher": {"path": str(root / "teacher" / FINAL_DIR)},
              "student": {"attn_layers": [3]},
              "align": {"steps": STEPS, "lr": 3e-3, "lr_schedule": "constant"},
              "logits": {"steps": STEPS, "lr": 1e-3, "lr_schedule": "constant"},
              "data": data,
              "train": {"token_budget": 1024, "batch_tokens": 1024},
              "run": {"logging_steps": 2, "save_steps": 0, "eval_steps": 0, "progress": False}}
    (root / "distill.yaml").write_text(yaml.safe_dump(recipe))
    return {"root": str(root), "recipe": str(root / "distill.yaml"), "teacher": recipe["teacher"]["path"],
            "train": data["train"]}


@pytest.fixture(scope="module")
def run(setup) -> Path:
    """Both stages, the student hybridized from the teacher (student.path empty)."""
    out = Path(setup["root"]) / "run"
    assert main([setup["recipe"], f"out_dir={out}"]) == 0
    return out


def held_out(rows: list[dict], stage: str, key: str) -> tuple[float, float]:
    """The held-out metric at the stage's start and end."""
    values = [r[key] for r in rows if r["stage"] == stage and key in r]
    assert [r["step"] for r in rows if r["stage"] == stage and key in r] == [0, STEPS]
    return values[0], values[-1]


@pytest.mark.slow
def test_align_lowers_every_layers_held_out_mse(run: Path) -> None:
    rows = read_metrics(run / METRICS_FILE)
    for layer in (0, 1, 2):  # the SSE layers (3 stayed attention)
        start, end = held_out(rows, "align", f"distill/eval_mse_layer{layer}")
        assert end < 0.7 * start, (layer, start, end)
    train = [r for r in rows if r["stage"] == "align" and "distill/mse" in r]
    assert [r["step"] for r in train] == [2, 4, 6, 8] and all(r["distill/aux_loss"] > 0 for r in train)


@pytest.mark.slow
def test_logits_lowers_held_out_kl(run: Path) -> None:
    rows = read_metrics(run / METRICS_FILE)
    start, end = held_out(rows, "logits", "distill/eval_kl")
    assert end < 0.8 * start, (start, end)
    assert all("distill/kl" in r and "distill/loss" in r for r in rows if r["stage"] == "logits" and "loss" in r)
    assert (run / "distill_curves.png").stat().st_size > 0


@pytest.mark.slow
def test_final_loads_and_sft_starts_from_it(run: Path, setup, tmp_path: Path) -> None:
    from sse_rl.sft import main as sft_main

    final = run / FINAL_DIR
    model = AutoModelForCausalLM.from_pretrained(final)
    assert model.config.model_type == "sse_h" and model.config.attn_layers == [3]
    logits_final = AutoModelForCausalLM.from_pretrained(run / "logits" / FINAL_DIR)
    torch.testing.assert_close(model.state_dict(), logits_final.state_dict())
    recipe = {"out_dir": str(tmp_path / "sft"), "model": {"path": str(final)}, "data": {"train": setup["train"]},
              "train": {"steps": 1, "token_budget": 512, "batch_tokens": 512},
              "run": {"logging_steps": 1, "save_steps": 0, "progress": False}}
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump(recipe))
    assert sft_main([str(tmp_path / "sft.yaml")]) == 0
    assert (tmp_path / "sft" / FINAL_DIR / "config.json").is_file()


@pytest.mark.slow
def test_rerun_of_a_finished_run_skips_every_stage(run: Path, setup) -> None:
    before = (run / METRICS_FILE).read_text()
    started = time.perf_counter()
    assert main([setup["recipe"], f"out_dir={run}"]) == 0
    assert (run / METRICS_FILE).read_text() == before and time.perf_counter() - started < 60


def _cli(recipe: str, out: Path, student: str) -> list[str]:
    return [sys.executable, "-m", "sse_rl.cli", "distill", recipe, f"out_dir={out}", f"student.path={student}",
            "student.attn_layers=[]", "stages=[logits]", "logits.steps=6", "train.token_budget=512",
            "train.batch_tokens=1024", "run.save_steps=2", "run.eval_steps=2", "run.logging_steps=1"]


def _compared(row: dict) -> dict:
    return {k: v for k, v in row.items() if k.startswith("distill/") or k in ("stage", "step", "loss", "grad_norm",
                                                                               "learning_rate")}


@pytest.mark.slow
def test_kill_9_and_rerun_logs_what_an_uninterrupted_run_logs(run: Path, setup) -> None:
    root = Path(setup["root"])
    student = str(run / "student")  # the hybridized student, given as student.path (checks its tokenizer too)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    whole, cut = root / "whole", root / "cut"
    subprocess.run(_cli(setup["recipe"], whole, student), check=True, env=env, capture_output=True)
    proc = subprocess.Popen(_cli(setup["recipe"], cut, student), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    marker = cut / "logits" / "checkpoint-2" / "trainer_state.json"
    while not marker.exists() and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert marker.exists() and not (cut / "logits" / FINAL_DIR).exists()  # killed mid-stage
    subprocess.run(_cli(setup["recipe"], cut, student), check=True, env=env, capture_output=True)
    a, b = ([_compared(r) for r in read_metrics(out / METRICS_FILE)] for out in (whole, cut))
    assert [(r["step"], "loss" in r) for r in a] == [(r["step"], "loss" in r) for r in b]
    assert len({(r["step"], "loss" in r) for r in b}) == len(b)  # no step logged twice
    assert [r["step"] for r in a if "distill/eval_kl" in r] == [0, 2, 4, 6]
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for key, value in ra.items():
            if isinstance(value, float):
                assert math.isclose(value, rb[key], rel_tol=1e-6, abs_tol=1e-12), (ra["step"], key, value, rb[key])


@pytest.mark.parametrize("overrides, expected", [
    (["teacher.path=/nonexistent/teacher"], ["teacher.path: '/nonexistent/teacher' does not exist"]),
    (["stages=[align, distil]", "logits.los=1", "logits.loss=jsd", "logits.beta=1.0"],
     ["stages.1: must be one of", "logits.los: unknown key", "logits.beta: loss jsd needs 0 < beta < 1"]),
    (["student.attn_layers=[0, 1, 2, 3]"], ["stages: align fits SSE layers", "but the student has none"]),
    (["logits.top_k=100000"], ["logits.top_k: 100000 must be below the vocabulary"]),
])
@pytest.mark.slow
def test_bad_recipe_names_the_key_and_writes_nothing(setup, tmp_path: Path, overrides, expected) -> None:
    out = tmp_path / "out"
    with pytest.raises(RecipeError) as err:
        main([setup["recipe"], f"out_dir={out}", *overrides])
    for text in expected:
        assert text in str(err.value), str(err.value)
    assert not out.exists()


@pytest.mark.slow
def test_student_with_another_tokenizer_is_refused(run: Path, setup, tmp_path: Path) -> None:
    student = tmp_path / "student"
    shutil.copytree(run / "student", student)
    tok = AutoTokenizer.from_pretrained(student)
    tok.pad_token = "<|im_start|>"
    tok.save_pretrained(student)
    out = tmp_path / "out"
    with pytest.raises(RecipeError, match="student.path: its tokenizer differs from the teacher's"):
        main([setup["recipe"], f"out_dir={out}", f"student.path={student}", "student.attn_layers=[]"])
    assert not out.exists()


@pytest.mark.slow
def test_missing_data_column_names_the_key_and_writes_nothing(setup, tmp_path: Path) -> None:
    bad = write_rows(tmp_path / "bad.jsonl", [{"problem": "1 + 1?"}])
    out = tmp_path / "out"
    with pytest.raises(RecipeError, match="data.eval: row 0 of .*bad.jsonl has no column 'solution'"):
        main([setup["recipe"], f"out_dir={out}", f"data.eval={bad}"])
    assert not out.exists()


@pytest.mark.slow
def test_teacher_treats_packed_rows_as_separate_sequences(setup) -> None:
    teacher = AutoModelForCausalLM.from_pretrained(setup["teacher"]).eval()
    a, b = torch.randint(0, 500, (1, 9)), torch.randint(0, 500, (1, 6))
    position_ids = torch.cat([torch.arange(9), torch.arange(6)])[None]
    with torch.no_grad():
        packed = teacher_hidden(teacher, {"input_ids": torch.cat([a, b], 1), "position_ids": position_ids})[0]
        alone = torch.cat([teacher_hidden(teacher, {"input_ids": x, "position_ids": torch.arange(x.shape[1])[None]})[0]
                           for x in (a, b)])
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("beta, temperature", [(0.0, 1.0), (1.0, 1.0), (0.5, 2.0)])
def test_divergences_match_trl_gkd_loss(beta: float, temperature: float) -> None:
    n, d, vocab = 7, 16, 50
    head_s, head_t = torch.nn.Linear(d, vocab, bias=False), torch.nn.Linear(d, vocab, bias=False)
    h_t = torch.randn(n, d)
    h_s = torch.randn(n, d, requires_grad=True)
    expected = _gkd_loss()(head_s(h_s), head_t(h_t), beta=beta, temperature=temperature, reduction="none").sum(-1)
    (grad_expected,) = torch.autograd.grad(expected.sum(), h_s)
    for fn in (lambda: full_vocab_divergence(h_s, h_t, head_s, head_t, beta, temperature),
               lambda: topk_divergence(h_s, h_t, head_s, head_t, vocab, beta, temperature)):  # top-k of all = full
        got = fn()
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(torch.autograd.grad(got.sum(), h_s)[0], grad_expected, atol=1e-5, rtol=1e-5)
    top = topk_divergence(h_s, h_t, head_s, head_t, 5, beta, temperature)
    assert top.shape == (n,) and bool((top >= -1e-6).all())


@pytest.mark.slow
def test_text_rows_learn_every_token(setup, tmp_path: Path) -> None:
    """data.text_column: TRL language-modeling rows, labels on every token but each sequence's first."""
    from sse_rl.config import SFTRecipe, load_recipe
    from sse_rl.sft import build_trainer

    rows = [{"body": f"{r['problem']} {r['solution']}"} for r in make_rows("test")[:40]]
    recipe = load_recipe(None, [f"out_dir={tmp_path}", f"data.train={write_rows(tmp_path / 't.jsonl', rows)}",
                                "model.path=unused", "data.text_column=body", "train.token_budget=512",
                                "train.batch_tokens=512"], SFTRecipe)
    batch = next(iter(build_trainer(recipe, setup["teacher"], tmp_path).get_train_dataloader()))
    starts = batch["position_ids"][0] == 0
    assert int(starts.sum()) > 2 and (batch["labels"][0][starts] == -100).all()
    assert (batch["labels"][0][~starts] == batch["input_ids"][0][~starts]).all()
    with pytest.raises(ValueError, match="data.train: row 0 of .* has no column 'text'.*check data.text_column"):
        build_trainer(load_recipe(None, [f"out_dir={tmp_path}", f"data.train={tmp_path / 't.jsonl'}",
                                         "model.path=unused", "data.text_column=text"], SFTRecipe),
                      setup["teacher"], tmp_path)


def test_tiny_recipes_load() -> None:
    from sse_rl.config import DistillRecipe, SFTRecipe, load_recipe

    recipes = Path(__file__).resolve().parents[2] / "recipes"
    distill = load_recipe(recipes / "tiny_distill_cpu.yaml", cls=DistillRecipe)
    teacher = load_recipe(recipes / "tiny_teacher_sft.yaml", cls=SFTRecipe)
    assert teacher.model.init.preset == "qwen3-tiny" and distill.stages == ["align", "logits"]
    assert distill.teacher.path == f"{teacher.out_dir}/final" and distill.data.eval_split == "test"
    for path in recipes.glob("*distill*.yaml"):  # the demo's and the real teacher's, too
        assert load_recipe(path, cls=DistillRecipe).stages == ["align", "logits"], path.name
    for path in recipes.glob("*_sft.yaml"):
        assert load_recipe(path, cls=SFTRecipe).train.steps >= 1, path.name


def test_resume_point_skips_cut_checkpoints_and_stale_rows(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from sse_rl.distill import MetricsFile, last_complete_checkpoint

    for step, whole in ((2, True), (4, False)):  # checkpoint-4 was cut short by a kill
        (tmp_path / f"checkpoint-{step}").mkdir()
        if whole:
            (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    assert last_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-2")
    assert not (tmp_path / "checkpoint-4").exists()
    path = tmp_path / METRICS_FILE
    rows = [{"stage": "align", "step": 4}, {"stage": "logits", "step": 0}, {"stage": "logits", "step": 2},
            {"stage": "logits", "step": 3}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"stage": "logits", "st')  # a line cut short
    MetricsFile(path, "logits").on_train_begin(None, SimpleNamespace(global_step=2), None)
    assert read_metrics(path) == rows[:3]  # resumed at 2: the attempt's later rows go
    MetricsFile(path, "logits").on_train_begin(None, SimpleNamespace(global_step=0), None)
    assert read_metrics(path) == rows[:1]  # a fresh start: the killed attempt's start-of-stage eval goes too


@pytest.mark.slow
def test_diverged_stage_stops_without_a_final(setup, tmp_path: Path) -> None:
    """An infinite learning rate makes the weights non-finite: the run stops naming the stage, writes no final."""
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="stage logits: .* not finite"):
        main([setup["recipe"], f"out_dir={out}", "stages=[logits]", "logits.steps=2", "logits.lr=.inf",
              "logits.warmup_steps=0", "run.save_steps=0", "run.eval_steps=0"])
    assert not (out / "logits" / FINAL_DIR).exists() and not (out / FINAL_DIR).exists()


class _Seen(Exception):
    """Stops the forward at the first student layer once the autocast state is read."""


@pytest.mark.parametrize("stage", ["align", "logits"])
@pytest.mark.slow
def test_student_layers_run_under_the_trainers_autocast(setup, run: Path, stage: str) -> None:
    """A bf16 recipe trains the student under autocast in both stages, though the losses call its layers directly
    (bf16 on the CPU here: the first layer is stopped before it computes, once the autocast state is read)."""
    import dataclasses

    import datasets
    from sse_rl.config import DistillRecipe, load_recipe
    from sse_rl.distill import DistillTrainer, build_datasets, load_teacher, stage_config

    recipe = load_recipe(setup["recipe"], [f"out_dir={run}"], DistillRecipe)
    student_path = str(run / "student")  # the run's hybridized teacher
    train, _ = build_datasets(recipe, student_path)
    student = AutoModelForCausalLM.from_pretrained(student_path, dtype=torch.float32)
    args = stage_config(recipe, stage, run / "autocast_probe", first_attempt=True, has_eval=False)
    trainer = DistillTrainer(
        model=student, args=dataclasses.replace(args, bf16=True, use_cpu=True),
        train_dataset=datasets.Dataset.from_list(train[:4]),
        processing_class=AutoTokenizer.from_pretrained(student_path), teacher=load_teacher(recipe),
        stage=stage, options=getattr(recipe, stage))
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    layer = student.model.layers[trainer.sse_layers[0]].attn
    seen: list[bool] = []

    def probe(_module, _args) -> None:
        seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        raise _Seen

    layer.register_forward_pre_hook(probe)
    with pytest.raises(_Seen):
        trainer.compute_loss(trainer.model, batch)
    assert seen == [True]
