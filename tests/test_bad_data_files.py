"""A bad local data file named in a recipe (#26): `sse-rl train`, `sft`, `distill` and `eval` each refuse it at
validation, before the run directory exists or Ray or an engine starts, with exit status 2 and a message naming the
recipe key, the file and the line, and no traceback."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sse_rl.cli import main

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
GOOD = b'{"problem": "1+1", "answer": "2", "solution": "2"}\n'
# file name -> (content, what the message says about it)
BAD = {"empty.jsonl": (b"", "is empty (no rows)"),
       "malformed.jsonl": (GOOD + b'{"problem": "2+2", "answer": oops}\n', "line 2: not valid JSON"),
       "latin1.jsonl": (GOOD * 2 + b'{"problem": "caf\xe9", "answer": "1"}\n', "line 3: not UTF-8 (byte 0xe9)")}


def _argv(command: str, data: Path, out: Path) -> tuple[list[str], str]:
    """The command line running `command` on `data` into `out`, and the recipe key that names the data."""
    if command == "train":
        return ["train", str(RECIPES / "tiny_cpu.yaml"), f"out_dir={out}", f"data.train={data}"], "data.train"
    if command == "sft":
        return ["sft", str(RECIPES / "tiny_teacher_sft.yaml"), f"out_dir={out}", f"data.train={data}"], "data.train"
    if command == "distill":
        return ["distill", str(RECIPES / "tiny_distill_cpu.yaml"), f"out_dir={out}", f"data.eval={data}"], "data.eval"
    return ["eval", "--model", str(out.parent / "model"), "--data-file", str(data), "--out", str(out)], "data_files"


@pytest.mark.parametrize("name", list(BAD))
@pytest.mark.parametrize("command", ["train", "sft", "distill", "eval"])
def test_a_bad_data_file_stops_the_command_before_it_writes_anything(command, name, tmp_path, capsys, monkeypatch):
    import ray

    import sse_rl.eval.engines

    monkeypatch.setattr(sse_rl.eval.engines.Engines, "__init__", lambda *a: pytest.fail("an engine was started"))
    content, says = BAD[name]
    data, out = tmp_path / name, tmp_path / "run"
    data.write_bytes(content)
    argv, key = _argv(command, data, out)
    try:
        code = main(argv)
    except SystemExit as stop:  # eval reports recipe errors through argparse
        code = stop.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"{key}: data file {data} {says}" in err, err
    assert not out.exists() and not ray.is_initialized()


def test_the_sse_rl_command_prints_the_message_without_a_traceback(tmp_path):
    data = tmp_path / "malformed.jsonl"
    data.write_bytes(BAD["malformed.jsonl"][0])
    argv, _ = _argv("train", data, tmp_path / "run")
    proc = subprocess.run([sys.executable, "-m", "sse_rl.cli", *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"data.train: data file {data} line 2: not valid JSON" in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()
