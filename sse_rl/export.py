"""`sse-rl export RUN_DIR|CHECKPOINT|MODEL_DIR OUT [--push-to-hub REPO_ID] [--public] [--overwrite]`: a trained
policy as a self-contained Hugging Face model folder, optionally uploaded to the Hub. Every GRPO run ends with one in
OUT_DIR/final (`sse_rl.train`).

Choices:
1) The source is a run directory (its newest intact checkpoint), one checkpoint (RUN/checkpoints/step_N) or a model
   folder. OUT gets the checkpoint's HF weights and tokenizer (hard links where the file system allows: no second
   copy of the weights on disk; the checkpoint's files are never written through them), then config.json saved
   afresh, which writes the model's PyTorch code and `auto_map` (`sse_rl.models.remote_code`), so OUT loads with
   `trust_remote_code=True` where sse-rl is not installed, and with sse-rl as any SSE-H checkpoint.
2) OUT/README.md is a model card: base model, steps, the final validation and held-out metrics (the newest
   metrics.jsonl row up to the checkpoint's step that has them), how to load, and the resolved recipe.
3) OUT is written as OUT.tmp and renamed, so an interrupted export leaves no half folder under its name; an existing
   OUT is refused unless overwrite.
4) The Hub upload goes through huggingface_hub (`create_repo`, then `upload_folder`); a new repository is private
   unless --public (an existing one keeps its visibility). The token and endpoint are huggingface_hub's own
   (HF_TOKEN or `hf auth login`, HF_ENDPOINT).
"""
from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path
from typing import Any

import yaml

from sse_rl import checkpoint
from sse_rl.metrics_log import read_metrics

FINAL_DIR = "final"  # OUT_DIR/final of a GRPO run
MODEL_SUBDIR = "model"  # the HF folder inside a checkpoint (`checkpoint.save_trainer`)
CARD_FILE = "README.md"
# Written afresh into OUT, never through a hard link into the source (choice 1).
REWRITTEN = ("config.json", CARD_FILE, "*.py")


def locate(source: Path) -> tuple[Path, Path | None]:
    """(model folder, checkpoint or None) of a run directory, a checkpoint or a model folder (choice 1)."""
    if (source / checkpoint.ROOT_DIR).is_dir():
        newest = checkpoint.latest(source)
        if newest is None:
            raise SystemExit(f"sse-rl export: {source} has no intact checkpoint")
        return newest / MODEL_SUBDIR, newest
    if (source / MODEL_SUBDIR / "config.json").is_file():
        return source / MODEL_SUBDIR, source
    if (source / "config.json").is_file():
        return source, None
    raise SystemExit(f"sse-rl export: {source} is neither a run directory (checkpoints/), a checkpoint (model/) nor "
                     "a model folder (config.json)")


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def export(source: str | Path, out: str | Path, *, overwrite: bool = False) -> Path:
    """Write the model folder of `source` with its code and model card into `out` (choices 1-3); returns `out`."""
    from transformers import AutoConfig

    import sse_rl.models  # noqa: F401  (SSE-H's config class, whose save writes the code)

    model_dir, ckpt = locate(Path(source))
    out = Path(out)
    if out.exists() and not overwrite:
        raise SystemExit(f"sse-rl export: {out} exists; choose another folder or pass --overwrite")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(model_dir, tmp, copy_function=_link_or_copy, ignore=shutil.ignore_patterns(*REWRITTEN))
    AutoConfig.from_pretrained(model_dir).save_pretrained(tmp)
    (tmp / CARD_FILE).write_text(model_card(out.name, ckpt))
    shutil.rmtree(out, ignore_errors=True)
    os.rename(tmp, out)
    return out


def final_metrics(run_dir: Path, step: int) -> tuple[int, dict[str, float]] | None:
    """(step, its val/* and eval/* metrics) of the newest metrics.jsonl row up to `step` that has any, else None."""
    for row in reversed(read_metrics(run_dir)):
        shown = {k: v for k, v in row.items() if k.startswith(("val/", "eval/"))}
        if row["step"] <= step and shown:
            return row["step"], shown
    return None


def model_card(name: str, ckpt: Path | None) -> str:
    """README.md of an exported policy (choice 2); from a bare model folder only the loading part."""
    recipe: dict[str, Any] = (checkpoint.load_recipe(ckpt) if ckpt else None) or {}
    model = recipe.get("model") or {}
    base = model.get("path") or (f"random weights, preset {model['init']['preset']}" if model.get("init") else "")
    lines = ["---", "library_name: transformers", "tags: [sse-rl, sse-h, grpo]", "---", "", f"# {name}", "",
             "An SSE-H policy (Sparse State Expansion linear attention hybrid) post-trained with GRPO by sse-rl.", ""]
    if ckpt is not None:
        step = checkpoint.load_state(ckpt)["step"]
        steps = (recipe.get("train") or {}).get("steps", "?")
        lines += [f"- Base model: `{base or 'unknown'}`", f"- Steps: {step} of {steps} (checkpoint `{ckpt.name}`)", ""]
        found = final_metrics(ckpt.parent.parent, step)
        if found:
            lines += [f"## Final validation metrics (step {found[0]})", "", "| metric | value |", "| --- | --- |"]
            lines += [f"| {k} | {v:.4g} |" for k, v in found[1].items()] + [""]
    lines += ["## How to load", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              "tokenizer = AutoTokenizer.from_pretrained(PATH)",
              "# without sse-rl: the model code in this folder (PyTorch reference op)",
              "model = AutoModelForCausalLM.from_pretrained(PATH, trust_remote_code=True)",
              "# with sse-rl installed (pip install sse-rl): Triton kernels on CUDA; vLLM loads it through the plugin",
              "import sse_rl.models", "model = AutoModelForCausalLM.from_pretrained(PATH)", "```", ""]
    if recipe:
        lines += ["## Recipe", "", "```yaml", yaml.safe_dump(recipe, sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines)


def push_to_hub(folder: Path, repo_id: str, *, private: bool) -> str:
    """Upload `folder` to the Hub model repository `repo_id`, created if missing (choice 4); returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    repo = api.create_repo(repo_id, private=private, exist_ok=True)
    commit = api.upload_folder(repo_id=repo.repo_id, folder_path=folder, commit_message=f"sse-rl export {folder.name}")
    return commit.commit_url


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="sse-rl export", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="a run directory (its newest checkpoint), a checkpoint or a model folder")
    parser.add_argument("out", help="the folder to write")
    parser.add_argument("--push-to-hub", metavar="REPO_ID", default=None, help="then upload OUT to this repository")
    visibility = parser.add_mutually_exclusive_group()
    visibility.add_argument("--private", dest="private", action="store_true", default=True,
                            help="a new repository is private (default)")
    visibility.add_argument("--public", dest="private", action="store_false", help="a new repository is public")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = export(args.source, args.out, overwrite=args.overwrite)
    print(f"exported {out}")
    if args.push_to_hub:
        print(f"uploaded: {push_to_hub(out, args.push_to_hub, private=args.private)}")
    return 0
