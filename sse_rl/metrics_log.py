"""Run outputs for people: metrics.jsonl (one row per step), sampled completions, the trackers of run.report_to
(`sse_rl.trackers`: TensorBoard, wandb, trackio, mlflow), a progress bar, PNG curves at the end.

Choices:
1) Step 0 is "before training" (the first eval row); training step s writes the row {"step": s, ...}.
2) On resume from checkpoint k, rows after step k (metrics.jsonl, prompts.jsonl, completions.jsonl) are dropped:
   they belong to the interrupted attempt and are recomputed, so the files read like one uninterrupted run.
   TensorBoard purges them too; the other trackers open a new run (`sse_rl.trackers`, choice 3).
3) The PNG plots whichever of the main curves the run has.
4) A recipe change accepted on resume is one row per key in recipe_changes.jsonl (step resumed after, key, old, new),
   so the run directory tells what each step was trained with.
5) `run.log_completions: N` logs N completions of each step's kept groups, drawn at random from a seed of the step
   (prompt, completion, weighted reward, each reward function's score, advantage), to completions.jsonl and to
   every tracker as the table "completions": what the policy writes, and what each reward made of it, at a glance.
"""
from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sse_rl.trackers import TENSORBOARD_DIR, open_trackers

if TYPE_CHECKING:
    from sse_rl.rollouts import Group

METRICS_FILE = "metrics.jsonl"
PROMPTS_FILE = "prompts.jsonl"  # per step: the dataset rows drawn (all sampling rounds), for audits of the data order
COMPLETIONS_FILE = "completions.jsonl"  # run.log_completions rows per step (choice 5)
CURVES_FILE = "curves.png"
RECIPE_CHANGES_FILE = "recipe_changes.jsonl"
OUTPUTS = (METRICS_FILE, PROMPTS_FILE, COMPLETIONS_FILE, CURVES_FILE, TENSORBOARD_DIR, RECIPE_CHANGES_FILE)
# (title, metric keys) per panel of the PNG
PANELS = [
    ("reward", ["reward/mean", "eval/reward"]), ("accuracy", ["accuracy"]),
    ("response length", ["response_length/mean", "response_length/max"]), ("loss", ["train/loss"]),
    ("entropy / KL", ["train/entropy", "train/kl"]),
    ("rollout vs trainer", ["mismatch/abs_logprob_diff/mean", "probe/max_abs_diff"]),
]


def read_metrics(run_dir: str | Path, name: str = METRICS_FILE) -> list[dict[str, Any]]:
    path = Path(run_dir) / name
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_outputs(run_dir: str | Path) -> list[Path]:
    """The outputs an earlier run left in `run_dir` (what a fresh start there would replace)."""
    return [Path(run_dir) / name for name in OUTPUTS if (Path(run_dir) / name).exists()]


def log_recipe_changes(run_dir: str | Path, step: int, changes: list[tuple[str, Any, Any]]) -> None:
    """Append the accepted changes (key, old, new) of a resume after `step` to recipe_changes.jsonl."""
    with open(Path(run_dir) / RECIPE_CHANGES_FILE, "a") as f:
        f.writelines(json.dumps({"step": step, "key": key, "old": old, "new": new}) + "\n" for key, old, new in changes)


def _keep_rows_up_to(run_dir: Path, name: str, step: int) -> None:
    if not (run_dir / name).is_file():  # nothing to keep (a file a run writes only when asked stays absent)
        return
    kept = [row for row in read_metrics(run_dir, name) if row["step"] <= step]
    tmp = run_dir / (name + ".tmp")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in kept))
    os.replace(tmp, run_dir / name)


class MetricsLog:
    """Append-only metrics of one run (see module doc for resume behaviour), sent to the trackers of `report_to`;
    `config` (the resolved recipe) becomes each tracker run's config."""

    def __init__(self, run_dir: str | Path, total_steps: int, start_step: int, *, report_to: list[str],
                 config: dict[str, Any], progress: bool):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / METRICS_FILE
        for name in (METRICS_FILE, PROMPTS_FILE, COMPLETIONS_FILE):
            _keep_rows_up_to(self.run_dir, name, start_step)
        self.trackers = open_trackers(report_to, self.run_dir, start_step, config)
        self._bar = None
        if progress:
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc="grpo", unit="step", dynamic_ncols=True)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        values = {k: float(v) for k, v in metrics.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        for tracker in self.trackers:
            tracker.log(step, values)

    def log_completions(self, step: int, rows: list[dict[str, Any]]) -> None:
        """Sampled completions of a step (`completion_rows`) to completions.jsonl and each tracker's table."""
        with open(self.run_dir / COMPLETIONS_FILE, "a") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        for tracker in self.trackers:
            tracker.log_table(step, "completions", rows)

    def log_prompts(self, step: int, indices: list[int]) -> None:
        with open(self.run_dir / PROMPTS_FILE, "a") as f:
            f.write(json.dumps({"step": step, "prompts": indices}) + "\n")

    def advance(self, metrics: dict[str, float]) -> None:
        """One training step done: move the bar and show the headline numbers."""
        if self._bar is not None:
            shown = {k.split("/")[0] if k.endswith("/mean") else k: f"{metrics[k]:.3f}"
                     for k in ("reward/mean", "accuracy", "response_length/mean") if k in metrics}
            self._bar.set_postfix(shown, refresh=False)
            self._bar.update(1)

    def close(self) -> Path:
        """Flush everything and draw the PNG; returns its path."""
        if self._bar is not None:
            self._bar.close()
        for tracker in self.trackers:
            tracker.close()
        return plot_curves(self.run_dir)


def completion_rows(step: int, groups: list[Group], advantages: list[list[float]], n: int,
                    seed: int) -> list[dict[str, Any]]:
    """`n` completions of the step's kept groups drawn without replacement from `seed`, in group order: step,
    prompt, completion, weighted reward, each reward function's score (under its name, as TRL's table has it) and
    the advantage (`advantages[group][completion]`)."""
    pairs = [(i, k) for i, g in enumerate(groups) for k in range(len(g.rollouts))]
    chosen = sorted(random.Random(seed).sample(pairs, min(n, len(pairs))))
    return [{"step": step, "prompt": groups[i].prompt.text, "completion": groups[i].rollouts[k].text,
             "reward": None if math.isnan(groups[i].rewards[k]) else groups[i].rewards[k],  # None: unscored
             **{name: v[k] for name, v in groups[i].per_function.items()},
             "advantage": advantages[i][k]} for i, k in chosen]


def plot_curves(run_dir: str | Path) -> Path:
    """Draw the main curves of metrics.jsonl into RUN/curves.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    panels = [(title, [k for k in keys if any(k in r for r in rows)]) for title, keys in PANELS]
    panels = [(title, keys) for title, keys in panels if keys]
    cols, rows_n = 3, max(1, math.ceil(len(panels) / 3))
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.2 * cols, 3.2 * rows_n), squeeze=False)
    for ax, (title, keys) in zip(axes.flat, panels):
        for key in keys:
            pts = [(r["step"], r[key]) for r in rows if key in r]
            ax.plot(*zip(*pts), marker="o" if len(pts) < 20 else None, markersize=3, label=key)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    out = Path(run_dir) / CURVES_FILE
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
