"""What an eval run leaves behind: results.json, summary.md, one PNG per benchmark, and side-by-side comparisons.

results.json is the source of truth (config, model, metrics, per-problem rows); the Markdown and the plots are
rendered from it, so `compare` works from results.json files alone.
"""
from __future__ import annotations

import dataclasses
import json
import math
from datetime import UTC, datetime
from pathlib import Path

from sse_rl.eval.metrics import BenchmarkMetrics, ProblemSamples, majority_vote

RESULTS_FILE = "results.json"
SUMMARY_FILE = "summary.md"


def problem_rows(problems: list[ProblemSamples]) -> list[dict]:
    """Per-problem rows for results.json: accuracy, counts, lengths, and the majority answer."""
    rows = []
    for p in problems:
        votes = {a: p.answers.count(a) for a in p.answers if a is not None}
        rows.append({
            "id": p.problem_id, "gold": p.gold, "samples": len(p.correct), "correct": sum(p.correct),
            "accuracy": p.accuracy, "majority_answer": max(votes, key=votes.__getitem__) if votes else None,
            "majority_correct": majority_vote(p.answers, p.correct),
            "mean_tokens": sum(p.num_tokens) / len(p.num_tokens), "truncated": sum(p.truncated),
        })
    return rows


def metrics_dict(metrics: BenchmarkMetrics) -> dict:
    return dataclasses.asdict(metrics)


def metrics_from_dict(data: dict) -> BenchmarkMetrics:
    """Inverse of `metrics_dict` after a JSON round trip (JSON turns the int keys of pass_at/maj_at into strings)."""
    data = dict(data)
    data["pass_at"] = {int(k): v for k, v in data["pass_at"].items()}
    data["maj_at"] = {int(k): v for k, v in data["maj_at"].items()}
    return BenchmarkMetrics(**data)


def write_report(out_dir: str | Path, model: str, config: dict,
                 benchmarks: dict[str, tuple[BenchmarkMetrics, list[ProblemSamples]]]) -> dict:
    """Write results.json, summary.md and <benchmark>.png into out_dir; returns the results as read back from JSON."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {
        "model": model,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "config": config,
        "benchmarks": {name: {"metrics": metrics_dict(m), "problems": problem_rows(p)}
                       for name, (m, p) in benchmarks.items()},
    }
    text = json.dumps(results, indent=2, ensure_ascii=False) + "\n"
    (out_dir / RESULTS_FILE).write_text(text, encoding="utf-8")
    # hand back exactly what a reader of results.json gets (JSON turns the int k keys into strings)
    results = json.loads(text)
    (out_dir / SUMMARY_FILE).write_text(summary_markdown(results), encoding="utf-8")
    for name, data in results["benchmarks"].items():
        plot_benchmark(name, metrics_from_dict(data["metrics"]), data["problems"], out_dir / f"{name}.png")
    return results


def _pct(value: float) -> str:
    return "-" if value is None or math.isnan(value) else f"{100 * value:.1f}"


def summary_markdown(results: dict) -> str:
    """One table, a row per benchmark; all numbers in percent except token counts."""
    cfg = results["config"]
    lines = [f"# Eval of `{results['model']}`", "",
             (f"Sampling: temperature {cfg['temperature']}, top-p {cfg['top_p']}, max tokens {cfg['max_tokens']}, "
             f"{cfg['samples']} samples per problem. SE: standard error of avg@n over problems / over samples."), ""]
    metrics = {name: metrics_from_dict(data["metrics"]) for name, data in results["benchmarks"].items()}
    n = cfg["samples"]
    ks = sorted(set.intersection(*(set(m.pass_at) for m in metrics.values())))
    header = ["benchmark", "problems", f"avg@{n}", "SE problems", "SE samples"]
    header += [f"pass@{k}" for k in ks] + [f"maj@{n}", "mean tokens", "truncated %"]
    lines += [_md_row(header), _md_row(["---"] * len(header))]
    for name, m in metrics.items():
        row = [name, str(m.num_problems), _pct(m.avg), _pct(m.se_problems), _pct(m.se_samples)]
        row += [_pct(m.pass_at[k]) for k in ks] + [_pct(m.maj_at[n]), f"{m.mean_tokens:.0f}", _pct(m.truncation_rate)]
        lines.append(_md_row(row))
    return "\n".join(lines) + "\n"


def _md_row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def plot_benchmark(name: str, metrics: BenchmarkMetrics, problems: list[dict], path: Path) -> None:
    """Per-problem accuracy bars (left) and pass@k / maj@k against k (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (bars, curve) = plt.subplots(1, 2, figsize=(13, 4), gridspec_kw={"width_ratios": [2, 1]})
    ids = [row["id"] for row in problems]
    bars.bar(range(len(ids)), [100 * row["accuracy"] for row in problems], color="tab:blue")
    bars.set_xticks(range(len(ids)), ids, rotation=90, fontsize=6)
    bars.set_ylim(0, 100)
    bars.set_ylabel(f"accuracy over {metrics.samples} samples (%)")
    bars.set_title(f"{name}: avg@{metrics.samples} = {100 * metrics.avg:.1f}%")
    ks = sorted(metrics.pass_at)
    curve.plot(ks, [100 * metrics.pass_at[k] for k in ks], marker="o", label="pass@k")
    curve.plot(ks, [100 * metrics.maj_at[k] for k in ks], marker="s", label="maj@k")
    curve.set_xscale("log", base=2)
    curve.set_xticks(ks, [str(k) for k in ks])
    curve.set_xlabel("k")
    curve.set_ylabel("%")
    curve.set_ylim(0, 100)
    curve.legend()
    curve.set_title(f"{name}: pass@k and maj@k")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def load_results(run_dir: str | Path) -> dict:
    path = Path(run_dir) / RESULTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} the --out folder of a finished `sse-rl eval` run?")
    return json.loads(path.read_text(encoding="utf-8"))


def compare(run_dirs: list[str | Path], out_dir: str | Path | None = None) -> str:
    """Markdown table of the runs side by side per benchmark; with out_dir also compare.md and compare.png there."""
    if len(run_dirs) < 2:
        raise ValueError(f"compare needs at least two run folders, got {len(run_dirs)}")
    runs = {Path(d).name: load_results(d) for d in run_dirs}
    if len(runs) != len(run_dirs):
        raise ValueError(f"run folders must have distinct names to label the table, got {[str(d) for d in run_dirs]}")
    names = list(dict.fromkeys(b for r in runs.values() for b in r["benchmarks"]))
    lines = []
    for bench in names:
        metrics = {run: metrics_from_dict(r["benchmarks"][bench]["metrics"])
                   for run, r in runs.items() if bench in r["benchmarks"]}
        ks = sorted(set.intersection(*(set(m.pass_at) for m in metrics.values())))
        header = ["run", "model", "n", "avg@n", "SE problems", "SE samples"] + [f"pass@{k}" for k in ks]
        header += ["maj@n", "mean tokens", "truncated %"]
        lines += [f"## {bench}", "", _md_row(header), _md_row(["---"] * len(header))]
        for run, m in metrics.items():
            row = [run, f"`{runs[run]['model']}`", str(m.samples), _pct(m.avg), _pct(m.se_problems),
                   _pct(m.se_samples)] + [_pct(m.pass_at[k]) for k in ks]
            row += [_pct(m.maj_at[m.samples]), f"{m.mean_tokens:.0f}", _pct(m.truncation_rate)]
            lines.append(_md_row(row))
        lines.append("")
    table = "\n".join(lines)
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "compare.md").write_text(table, encoding="utf-8")
        plot_compare(runs, names, out_dir / "compare.png")
    return table


def plot_compare(runs: dict[str, dict], benchmarks: list[str], path: Path) -> None:
    """One panel per benchmark: the pass@k curve of every run (pass@1 = avg@n), avg@n in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(benchmarks), figsize=(5 * len(benchmarks), 4), squeeze=False)
    for ax, bench in zip(axes[0], benchmarks):
        all_ks: set[int] = set()
        for run, results in runs.items():
            if bench not in results["benchmarks"]:
                continue
            m = metrics_from_dict(results["benchmarks"][bench]["metrics"])
            ks = sorted(m.pass_at)
            all_ks.update(ks)
            ax.plot(ks, [100 * m.pass_at[k] for k in ks], marker="o",
                    label=f"{run} (avg@{m.samples} {100 * m.avg:.1f})")
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(all_ks), [str(k) for k in sorted(all_ks)])
        ax.set_ylim(0, 100)
        ax.set_xlabel("k")
        ax.set_ylabel("pass@k (%)")
        ax.set_title(bench)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
