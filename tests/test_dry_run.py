"""`--dry-run`: the recipe checked, the first data rows shown as the run sees them, nothing written, no Ray; and a
recipe refused through `python -m sse_rl.train` is its message and exit 2, as through `sse-rl`."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import ray

from sse_rl.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_a_grpo_dry_run_shows_prompts_and_answers_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", str(ROOT / "recipes/tiny_cpu.yaml"), f"out_dir={out}", "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "every reward called once on the first row" in printed
    assert '"prompt": "max(' in printed and '"answer": "' in printed  # the tiny task's rendered prompt and answer
    assert not out.exists() and not ray.is_initialized()


def test_an_sft_dry_run_shows_the_examples_trl_gets(tmp_path, capsys):
    out = tmp_path / "sft"
    assert main(["sft", str(ROOT / "recipes/arith_sft.yaml"), f"out_dir={out}", "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert '"completion": [{"role": "assistant", "content": "' in printed and "\\\\boxed{" in printed
    assert not out.exists()


def test_a_dry_run_calls_the_rewards(tmp_path, capsys):
    bad = tmp_path / "bad_reward.py"
    bad.write_text("def positional(p, c):\n    return [0.0] * len(c)\n")
    code = main(["train", str(ROOT / "recipes/tiny_cpu.yaml"), f"out_dir={tmp_path / 'run'}", "--dry-run",
                 "reward.functions=[{spec: '" + f"{bad}:positional" + "'}]"])
    assert code == 2
    assert "positional" in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_a_refused_recipe_through_the_module_is_its_message_and_exit_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "sse_rl.train", str(ROOT / "recipes/tiny_cpu.yaml"),
                           "train.lr=-1", f"out_dir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "train.lr" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
