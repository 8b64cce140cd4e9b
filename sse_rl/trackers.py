"""Experiment trackers of a GRPO run (`run.report_to`): one class per tracker behind one interface, built by
`open_trackers`; `sse_rl.metrics_log.MetricsLog` is their one caller.

Choices:
1) Every tracker takes the same three calls: `log(step, metrics)`, `log_table(step, name, rows)` (rows: flat dicts
   of one completion each, `run.log_completions`) and `close()`. wandb, trackio and mlflow show a table as a table;
   TensorBoard, which has none, gets it as markdown text.
2) Where a tracker sends its data is its own environment's business, so offline use needs no recipe key: wandb
   reads WANDB_MODE=offline / WANDB_DIR, mlflow MLFLOW_TRACKING_URI (e.g. file:/path with MLFLOW_ALLOW_FILE_STORE),
   trackio TRACKIO_DIR (a local SQLite store unless a space is named). TensorBoard writes OUT_DIR/tensorboard.
3) Every tracker's run is named after OUT_DIR and carries the resolved recipe as its config. A resumed run opens a
   new tracker run (wandb, trackio, mlflow) whose steps continue after the checkpoint; TensorBoard purges the steps
   of the interrupted attempt.
4) Each backend is an optional extra (`pip install "sse-rl[wandb]"`, `[trackio]`, `[mlflow]`); TensorBoard is a
   dependency. `report_to_errors` names a chosen tracker that cannot work here, before a run starts.
"""
from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path
from typing import Any, Protocol

TENSORBOARD_DIR = "tensorboard"  # OUT_DIR/tensorboard
PROJECT = "sse-rl"  # the wandb / trackio project and mlflow experiment of every run
# tracker -> (importable module, pip extra that installs it)
PACKAGES: dict[str, tuple[str, str]] = {
    "tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"), "trackio": ("trackio", "trackio"),
    "mlflow": ("mlflow", "mlflow"),
}


class Tracker(Protocol):
    """What every tracker does (choice 1)."""

    def log(self, step: int, metrics: dict[str, float]) -> None: ...

    def log_table(self, step: int, name: str, rows: list[dict[str, Any]]) -> None: ...

    def close(self) -> None: ...


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    """The union of the rows' keys, in first-seen order."""
    return list(dict.fromkeys(key for row in rows for key in row))


class TensorBoardTracker:
    def __init__(self, run_dir: Path, start_step: int, config: dict[str, Any]):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / TENSORBOARD_DIR), purge_step=start_step + 1)
        self.writer.add_text("recipe", "```\n" + json.dumps(config, indent=1) + "\n```", start_step)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def log_table(self, step: int, name: str, rows: list[dict[str, Any]]) -> None:
        """As a markdown table (TensorBoard's text plugin renders it); `|` and newlines escaped per cell."""
        columns = _columns(rows)
        cell = lambda v: str(v).replace("|", "\\|").replace("\n", "<br>")
        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
        self.writer.add_text(name, "\n".join(lines), step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    def __init__(self, run_dir: Path, start_step: int, config: dict[str, Any]):
        import wandb

        self.wandb = wandb
        self.run = wandb.init(project=PROJECT, name=run_dir.resolve().name, config=config,
                              dir=str(run_dir), reinit="create_new")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def log_table(self, step: int, name: str, rows: list[dict[str, Any]]) -> None:
        columns = _columns(rows)
        table = self.wandb.Table(columns=columns, data=[[row.get(c) for c in columns] for row in rows])
        self.run.log({name: table}, step=step)

    def close(self) -> None:
        self.run.finish()


class TrackioTracker:
    def __init__(self, run_dir: Path, start_step: int, config: dict[str, Any]):
        import trackio

        self.trackio = trackio
        self.run = trackio.init(project=PROJECT, name=run_dir.resolve().name, config=config, auto_log_cpu=False,
                                auto_log_gpu=False)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def log_table(self, step: int, name: str, rows: list[dict[str, Any]]) -> None:
        columns = _columns(rows)
        table = self.trackio.Table(columns=columns, data=[[row.get(c) for c in columns] for row in rows])
        self.run.log({name: table}, step=step)

    def close(self) -> None:
        self.run.finish()


class MlflowTracker:
    """One mlflow run in experiment `PROJECT`; the recipe as the artifact config.json, a table as
    `NAME/step_NNNNNN.json` (mlflow's table artifact)."""

    def __init__(self, run_dir: Path, start_step: int, config: dict[str, Any]):
        from mlflow import MlflowClient

        self.client = MlflowClient()
        experiment = self.client.get_experiment_by_name(PROJECT)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(PROJECT)
        self.run_id = self.client.create_run(experiment_id, run_name=run_dir.resolve().name).info.run_id
        self.client.log_dict(self.run_id, config, "config.json")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, [Metric(_mlflow_key(k), float(v), now, step) for k, v in metrics.items()])

    def log_table(self, step: int, name: str, rows: list[dict[str, Any]]) -> None:
        columns = _columns(rows)
        self.client.log_table(self.run_id, {c: [row.get(c) for row in rows] for c in columns},
                              f"{name}/step_{step:06d}.json")

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def _mlflow_key(key: str) -> str:
    """mlflow allows letters, digits and `_-. /` in metric names; anything else (e.g. `val/avg@8`) becomes `_`."""
    return "".join(ch if ch.isalnum() or ch in "_-. /" else "_" for ch in key)


TRACKERS: dict[str, type] = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker, "trackio": TrackioTracker,
                             "mlflow": MlflowTracker}


def report_to_errors(names: list[str]) -> list[str]:
    """What stops `run.report_to` from working here: a chosen tracker whose package is not installed (with the extra
    to install), mlflow without MLFLOW_TRACKING_URI (its own default, a SQLite store, needs the full mlflow). A name
    that is no tracker at all is the schema's to report."""
    errors = [f"run.report_to: {name} is not installed; pip install \"sse-rl[{PACKAGES[name][1]}]\""
              for name in names if name in PACKAGES and importlib.util.find_spec(PACKAGES[name][0]) is None]
    if "mlflow" in names and not os.environ.get("MLFLOW_TRACKING_URI"):
        errors.append("run.report_to: mlflow needs MLFLOW_TRACKING_URI: an mlflow server (http://HOST:5000), or a "
                      "local store (file:/PATH with MLFLOW_ALLOW_FILE_STORE=true, or sqlite:///mlflow.db with the "
                      "full `pip install mlflow`)")
    return errors


def open_trackers(names: list[str], run_dir: Path, start_step: int, config: dict[str, Any]) -> list[Tracker]:
    """One tracker per name in `run.report_to` (unknown names are refused by the recipe's schema)."""
    return [TRACKERS[name](run_dir, start_step, config) for name in dict.fromkeys(names)]
