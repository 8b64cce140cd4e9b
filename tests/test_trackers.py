"""Trackers (`sse_rl.trackers`) and completion logs: each tracker's local store read back with its own reader
(TensorBoard's EventAccumulator, the wandb offline run file, the mlflow client on a file store, trackio's SQLite
store), and `run.log_completions` through the controller on fake actors (no Ray, no vLLM)."""
from __future__ import annotations

import json
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from sse_rl import trackers
from sse_rl.config import Recipe, SFTRecipe
from sse_rl.controller import Controller
from sse_rl.grpo.advantages import build_advantage_fn
from sse_rl.metrics_log import COMPLETIONS_FILE, MetricsLog

sys.path.insert(0, str(Path(__file__).parent / "grpo"))
from test_guard import PROMPTS, FakeActors  # noqa: E402  (the controller's fake actors)

ROWS = [{"step": 1, "prompt": "What is 3+4?", "completion": "7 | seven\nok", "acc": 1.0, "advantage": 0.5}]
CONFIG = {"seed": 3, "train": {"lr": 1e-5}}


def _log_two_steps(names: list[str], run_dir: Path) -> None:
    run_dir.mkdir(exist_ok=True)
    log = MetricsLog(run_dir, total_steps=2, start_step=0, report_to=names, config=CONFIG, progress=False)
    log.log(1, {"reward/mean": 0.25, "val/avg@8": 0.5})
    log.log_completions(1, ROWS)
    log.log(2, {"reward/mean": 0.75})
    log.close()


def test_tensorboard_event_file_holds_the_metrics_and_the_table(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _log_two_steps(["tensorboard"], tmp_path)
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("reward/mean")] == [(1, 0.25), (2, 0.75)]
    (text,) = events.Tensors("completions/text_summary")
    table = text.tensor_proto.string_val[0].decode()
    assert text.step == 1 and "| step | prompt | completion | acc | advantage |" in table
    assert "7 \\| seven<br>ok" in table  # cell text escaped, one row per completion


def _wandb_records(path: Path) -> list:
    """The records of a wandb run file: a 7-byte header, then LevelDB-style 32 KiB blocks of chunks (crc32, length,
    type: full, first, middle, last), each record a serialized `Record` protobuf."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    pos, records, pending = 7, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
        elif kind == 0:
            break
    return records


def test_wandb_offline_run_files_hold_the_metrics_and_the_table(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    _log_two_steps(["wandb"], tmp_path)
    (run_file,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    history = [{item.key or "/".join(item.nested_key): item.value_json for item in r.history.item}
               for r in _wandb_records(run_file) if r.WhichOneof("record_type") == "history"]
    scalars = [(int(h["_step"]), json.loads(h["reward/mean"])) for h in history if "reward/mean" in h]
    assert scalars == [(1, 0.25), (2, 0.75)]
    assert [json.loads(h["val/avg@8"]) for h in history if "val/avg@8" in h] == [0.5]
    (table,) = run_file.parent.glob("files/media/table/completions_1_*.table.json")
    stored = json.loads(table.read_text())
    assert stored["columns"] == list(ROWS[0]) and stored["data"] == [list(ROWS[0].values())]


def test_mlflow_file_store_holds_the_metrics_and_the_table(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    uri = f"file:{tmp_path / 'mlruns'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    assert trackers.report_to_errors(["mlflow"]) == []
    _log_two_steps(["mlflow"], tmp_path / "run_a")
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name(trackers.PROJECT).experiment_id])
    assert run.info.run_name == "run_a" and run.info.status == "FINISHED"
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "reward/mean")] == [(1, 0.25),
                                                                                                     (2, 0.75)]
    assert [m.value for m in client.get_metric_history(run.info.run_id, "val/avg_8")] == [0.5]  # '@' not allowed
    table = Path(client.download_artifacts(run.info.run_id, "completions/step_000001.json", str(tmp_path)))
    stored = json.loads(table.read_text())
    assert stored["columns"] == list(ROWS[0]) and stored["data"] == [list(ROWS[0].values())]
    assert json.loads(Path(client.download_artifacts(run.info.run_id, "config.json", str(tmp_path))).read_text()) \
        == CONFIG


def test_trackio_local_store_holds_the_metrics_and_the_table(tmp_path):
    # trackio reads TRACKIO_DIR when it is imported: a process of its own
    script = textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from pathlib import Path
        from test_trackers import _log_two_steps
        from trackio.sqlite_storage import SQLiteStorage
        _log_two_steps(["trackio"], Path({str(tmp_path / "run_b")!r}))
        Path({str(tmp_path / "logs.json")!r}).write_text(json.dumps(SQLiteStorage.get_logs("sse-rl", "run_b")))
    """)
    env = {"TRACKIO_DIR": str(tmp_path / "trackio"), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    logs = json.loads((tmp_path / "logs.json").read_text())
    assert [(row["step"], row["reward/mean"]) for row in logs if "reward/mean" in row] == [(1, 0.25), (2, 0.75)]
    (table,) = [row["completions"] for row in logs if "completions" in row]
    assert table["_type"] == "trackio.table" and table["_value"] == ROWS


def test_report_to_names_a_missing_package_and_mlflow_without_a_tracking_uri(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setitem(trackers.PACKAGES, "wandb", ("no_such_module_for_sse_rl", "wandb"))
    errors = trackers.report_to_errors(["tensorboard", "wandb", "mlflow"])
    assert errors[0] == 'run.report_to: wandb is not installed; pip install "sse-rl[wandb]"'
    assert errors[1].startswith("run.report_to: mlflow needs MLFLOW_TRACKING_URI") and len(errors) == 2


@pytest.mark.parametrize(("command", "recipe"), [("train", "tiny_cpu"), ("sft", "arith_sft")])
def test_every_command_refuses_a_tracker_that_cannot_work_before_writing(command, recipe, tmp_path, monkeypatch,
                                                                          capsys):
    from sse_rl.cli import main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = Path(__file__).resolve().parents[1]
    assert main([command, str(root / f"recipes/{recipe}.yaml"), f"out_dir={tmp_path / 'run'}",
                 "run.report_to=[mlflow]", "--dry-run"]) == 2
    assert "run.report_to: mlflow needs MLFLOW_TRACKING_URI" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    assert main([command, str(root / f"recipes/{recipe}.yaml"), f"out_dir={tmp_path / 'run'}",
                 "run.report_to=[tensorboard,foo]", "--dry-run"]) == 2
    assert "run.report_to.1: must be one of 'tensorboard', 'wandb', 'trackio', 'mlflow', got 'foo'" in \
        capsys.readouterr().err


def test_sft_passes_report_to_to_trl(tmp_path):
    from sse_rl.sft import sft_config

    recipe = SFTRecipe(out_dir=str(tmp_path))
    recipe.run.report_to = ["tensorboard", "wandb"]
    assert sft_config(recipe, tmp_path).report_to == ["tensorboard", "wandb"]


def test_controller_logs_n_completions_per_step_with_scores_and_advantages(tmp_path):
    recipe = Recipe(out_dir=str(tmp_path))
    recipe.rollout.group_size, recipe.rollout.max_tokens = 4, 1
    recipe.train.steps, recipe.train.prompts_per_step = 3, 4
    recipe.run.save_every, recipe.run.report_to, recipe.run.progress = 0, ["tensorboard"], False
    recipe.run.log_completions = 5
    controller = Controller(recipe, tmp_path, "policy", PROMPTS, [])
    controller.actors = FakeActors(reward=lambda k: float(k in (0, 3)) + 0.5 * float(k == 3))
    controller.run(0)
    rows = [json.loads(line) for line in (tmp_path / COMPLETIONS_FILE).read_text().splitlines()]
    assert [row["step"] for row in rows] == [1] * 5 + [2] * 5 + [3] * 5
    assert all(list(row) == ["step", "prompt", "completion", "reward", "acc", "bonus", "advantage"] for row in rows)
    # FakeActors: completion k of every prompt scores acc(k); advantages are group-normalised over [1, 0, 0, 1.5]
    expected = build_advantage_fn(recipe.algo.adv_std_scaling)(torch.tensor([[1.0, 0.0, 0.0, 1.5]]))[0]
    for row in rows:
        k = int(row["completion"])
        assert row["prompt"].startswith("p") and row["acc"] == row["reward"] == [1.0, 0.0, 0.0, 1.5][k]
        assert row["advantage"] == pytest.approx(float(expected[k]))
    assert len({(row["prompt"], row["completion"]) for row in rows if row["step"] == 1}) == 5  # no repeats


def test_resume_drops_completion_rows_after_the_checkpoint(tmp_path):
    (tmp_path / COMPLETIONS_FILE).write_text("".join(json.dumps({**ROWS[0], "step": s}) + "\n" for s in (1, 2, 3)))
    MetricsLog(tmp_path, total_steps=3, start_step=2, report_to=[], config={}, progress=False).close()
    assert [json.loads(line)["step"] for line in (tmp_path / COMPLETIONS_FILE).read_text().splitlines()] == [1, 2]
