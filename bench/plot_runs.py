"""Overlay the curves of several GRPO runs (their metrics.jsonl) in one PNG, one panel per metric.

    python -m bench.plot_runs --run fp32=runs/a/metrics.jsonl --run bf16=runs/b/metrics.jsonl \
        --keys eval/accuracy reward/mean train/entropy --out compare.png

Why: `curves.png` shows one run; recipe changes (update size, precision, learning rate) are judged side by side.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from sse_rl.metrics_log import read_metrics


def plot_runs(runs: dict[str, Path], keys: list[str], out: Path, title: str = "") -> Path:
    """One panel per key, one line per run (points where the run logged that key)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(4.4 * len(keys), 3.4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for label, path in runs.items():
            pts = [(r["step"], r[key]) for r in read_metrics(path.parent, path.name) if key in r]
            if pts:
                ax.plot(*zip(*pts), marker="o" if len(pts) < 20 else None, markersize=3, label=label)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", action="append", required=True, metavar="LABEL=METRICS_JSONL")
    parser.add_argument("--keys", nargs="+", default=["eval/accuracy", "reward/mean", "train/entropy"])
    parser.add_argument("--title", default="")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    runs = {}
    for item in args.run:
        label, sep, path = item.partition("=")
        if not sep or not Path(path).is_file():
            parser.error(f"--run {item!r}: expected LABEL=PATH to an existing metrics.jsonl")
        runs[label] = Path(path)
    print(f"wrote {plot_runs(runs, args.keys, args.out, args.title)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
