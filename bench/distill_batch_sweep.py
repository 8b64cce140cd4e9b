"""Held-out KL of the `logits` distillation stage at one token budget spent in batches of different sizes.

    python -m bench.distill_batch_sweep RECIPE --teacher T --student S --out DIR --tokens N --batches 4096 1024 512 \
        [--results bench/results/NAME] [key=value ...]

Why: the conversion demo's distillation is held to a token budget (10 % of the teacher's training tokens), and at a
fixed budget the batch size sets how many optimizer steps the student gets. Each batch size B runs the recipe's
`logits` stage from the same student (an `align` stage's output) for N // B steps of B tokens (warm-up a tenth of
them, held-out KL four times and at the ends) into DIR/bB, skipped when DIR/bB/final exists; extra key=value
overrides go to every run. The report (batch_sweep.md, .json, .png: held-out KL against tokens seen) goes to
--results, or DIR.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import yaml

from bench.common import device_name, write_results
from sse_rl.metrics_log import read_metrics

METRICS = "distill_metrics.jsonl"


def run_batch(args: argparse.Namespace, batch: int, micro: int) -> Path:
    """The logits stage at `batch` tokens per step into DIR/b<batch> (skipped when it has finished)."""
    out = args.out / f"b{batch}"
    steps = args.tokens // batch
    if not (out / "final").is_dir():
        subprocess.run([sys.executable, "-m", "sse_rl.cli", "distill", str(args.recipe),
                        f"teacher.path={args.teacher}", f"student.path={args.student}", "student.attn_layers=[]",
                        "stages=[logits]", f"out_dir={out}", f"logits.steps={steps}",
                        f"logits.warmup_steps={max(1, steps // 10)}", f"train.batch_tokens={batch}",
                        f"train.token_budget={min(batch, micro)}", f"run.eval_steps={max(1, steps // 4)}",
                        "run.save_steps=0", *args.overrides], check=True)
    return out


def held_out_kl(out: Path, batch: int) -> list[tuple[int, float]]:
    """(tokens seen, held-out KL) of one run's logits stage."""
    rows = read_metrics(out, METRICS)
    return [(r["step"] * batch, r["distill/eval_kl"]) for r in rows
            if r.get("stage") == "logits" and "distill/eval_kl" in r]


def plot(curves: dict[int, list[tuple[int, float]]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for batch, points in curves.items():
        ax.plot(*zip(*points), marker="o", markersize=3, label=f"{batch} tokens / step")
    ax.set_yscale("log")
    ax.set_xlabel("tokens seen in the logits stage")
    ax.set_ylabel("held-out KL(teacher || student), nats/token")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def report(args: argparse.Namespace, curves: dict[int, list[tuple[int, float]]]) -> str:
    lines = [f"# Logits-stage distillation at {args.tokens:,} tokens, by batch size ({device_name()})", "",
             f"Recipe `{args.recipe}`, teacher `{args.teacher}`, student `{args.student}` (the same start for every "
             f"row), overrides {args.overrides or 'none'}; `python -m bench.distill_batch_sweep`.", "",
             "| tokens / step | steps | held-out KL at start | at end | end / start |", "|---|---|---|---|---|"]
    for batch, points in curves.items():
        (_, start), (_, end) = points[0], points[-1]
        lines.append(f"| {batch:,} | {args.tokens // batch} | {start:.4f} | {end:.4f} | {end / start:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("recipe", type=Path)
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--student", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tokens", type=int, required=True)
    parser.add_argument("--batches", type=int, nargs="+", required=True)
    parser.add_argument("--results", type=Path)
    parser.add_argument("overrides", nargs="*", help="key=value recipe overrides for every run")
    args = parser.parse_args(argv)
    micro = yaml.safe_load(args.recipe.read_text())["train"]["token_budget"]
    curves = {b: held_out_kl(run_batch(args, b, micro), b) for b in args.batches}
    results = args.results or args.out
    results.mkdir(parents=True, exist_ok=True)
    plot(curves, results / "batch_sweep.png", f"logits stage, {args.tokens:,} tokens")
    write_results(results / "batch_sweep.json", {"tokens": args.tokens, "recipe": str(args.recipe),
                                                 "overrides": args.overrides,
                                                 "held_out_kl": {str(b): c for b, c in curves.items()}},
                  report(args, curves))
    print(f"wrote {results}/batch_sweep.md, .json, .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
