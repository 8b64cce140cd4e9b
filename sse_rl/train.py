"""`sse-rl train RECIPE.yaml [key=value ...] [--resume] [--accept-changes] [--overwrite] [--address ADDR]`: GRPO
on an SSE-H policy.

Reads top to bottom: check the recipe (`config.validate`, the trackers of run.report_to too: nothing is written
before it passes), prepare the run directory and the policy (built from `model.init` when the path does not
exist yet), load the prompts, start Ray (local unless --address / RAY_ADDRESS), run the controller, then export the
last checkpoint as OUT_DIR/final with its model code and card (`sse_rl.export`).
Resume is a contract:
1) A run directory that holds an intact checkpoint is resumed from the newest one (--resume insists on one); newer
   damaged checkpoints are skipped, each named with the reason.
2) The recipe must equal the one stored with that checkpoint (out_dir aside: a moved run directory is the same run;
   keys the stored recipe lacks, added to the schema since, take their defaults). Differences are refused, listed
   key by key, unless --accept-changes: then every new value applies from here on and each is recorded in
   recipe_changes.jsonl.
3) A run directory with an earlier run's outputs but no intact checkpoint is refused unless --overwrite, which
   deletes those outputs: nothing is truncated silently.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from sse_rl import check_worker_imports, checkpoint, dry_run, export, metrics_log
from sse_rl.config.describe import recipe_parser
from sse_rl.config import RESOLVED_FILE, Recipe, RecipeError, SamplingConfig, parse_recipe, validate, write_recipe
from sse_rl.data import encode_prompts, import_function, is_function_spec, load_prompts, row_prompt

if TYPE_CHECKING:
    from sse_rl.controller import ValSet

logger = logging.getLogger("sse_rl.train")
# Environment of every Ray worker: quiet vLLM, and no oversubscription of the cores by OpenMP spin-waits.
WORKER_ENV = {"VLLM_LOGGING_LEVEL": "WARNING", "OMP_WAIT_POLICY": "PASSIVE", "TOKENIZERS_PARALLELISM": "false"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = recipe_parser("sse-rl train", __doc__.split("\n\n")[0], Recipe, "recipes/tiny_cpu.yaml")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the run directory's newest intact checkpoint")
    parser.add_argument("--accept-changes", action="store_true",
                        help="resume although the recipe differs from the checkpoint's; the changes are recorded")
    parser.add_argument("--overwrite", action="store_true",
                        help="start over in an out_dir whose earlier run left outputs but no intact checkpoint")
    parser.add_argument("--address", default=None, help="join this Ray cluster (default: RAY_ADDRESS, else local)")
    return parser.parse_intermixed_args(argv)  # flags may come after the overrides


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted keys of a recipe dict, as overrides name them; lists are compared whole."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def recipe_changes(stored: dict[str, Any], recipe: Recipe) -> list[tuple[str, Any, Any]]:
    """(key, stored value, new value) for each key whose value differs (module doc, point 2)."""
    old = _flat(stored)
    new = _flat(yaml.safe_load(yaml.safe_dump(dataclasses.asdict(recipe))))  # as config.yaml stores it
    return [(k, old[k], v) for k, v in new.items() if k != "out_dir" and k in old and old[k] != v]


def find_checkpoint(run_dir: Path, resume: bool) -> Path | None:
    """The newest intact checkpoint, newer damaged ones logged with the reason; --resume without one is an error."""
    path, skipped = checkpoint.scan(run_dir)
    for bad, why in skipped:
        logger.warning("skipping checkpoint %s: %s", bad, why)
    if resume and path is None:
        raise SystemExit(f"--resume: {run_dir} has no intact checkpoint to resume from"
                         + "".join(f"\n  skipped {bad}: {why}" for bad, why in skipped))
    return path


def check_resume(recipe: Recipe, path: Path, accept: bool) -> None:
    """Resuming from `path`: the recipe must match the stored one, or the changes are accepted and recorded."""
    stored = checkpoint.load_recipe(path)
    if stored is None:
        logger.warning("checkpoint %s stores no recipe (saved before recipes were stored): not compared", path)
        return
    changes = recipe_changes(stored, recipe)
    if not changes:
        return
    listed = "".join(f"\n  {key}: {old!r} -> {new!r}" for key, old, new in changes)
    if not accept:
        raise SystemExit(f"the recipe differs from the one checkpoint {path} was trained with:{listed}\n"
                         f"Resume with that recipe ({path / RESOLVED_FILE}), or pass --accept-changes to train with "
                         f"the new values from here on (recorded in {metrics_log.RECIPE_CHANGES_FILE}).")
    logger.warning("resuming from %s with accepted recipe changes:%s", path, listed)
    metrics_log.log_recipe_changes(recipe.out_dir, checkpoint.load_state(path)["step"], changes)


def start_over(run_dir: Path, overwrite: bool) -> None:
    """A fresh start: an earlier run's outputs (and damaged checkpoints) are refused, or deleted with --overwrite."""
    earlier = metrics_log.run_outputs(run_dir) + [path for path in (run_dir / checkpoint.ROOT_DIR,
                                                                    run_dir / export.FINAL_DIR) if path.exists()]
    if earlier and not overwrite:
        raise SystemExit(f"out_dir {run_dir} holds an earlier run ({', '.join(p.name for p in earlier)}) but no "
                         "intact checkpoint to resume from; pass --overwrite to delete it and start over, or choose "
                         "another out_dir")
    for path in earlier:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()


def build_policy(recipe: Recipe, run_dir: Path) -> str:
    """The policy checkpoint to start from; built from `model.init` (tokenizer + random weights) if missing."""
    from sse_rl.init_model import init_model

    path = Path(recipe.model.path) if recipe.model.path else run_dir / "base_model"
    init = recipe.model.init
    if path.exists() or init is None:
        return str(path) if path.exists() else recipe.model.path
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = init.tokenizer or None
    if tokenizer and is_function_spec(tokenizer):
        tokenizer = import_function(tokenizer)(tmp)
    init_model(init.preset, tmp, tokenizer=tokenizer, seed=init.seed, **init.overrides)
    os.rename(tmp, path)
    return str(path)


def load_val_set(recipe: Recipe, tokenizer: Any) -> ValSet | None:
    """The eval.benchmark problems as a `ValSet` (None when off), prompts rendered like training prompts.

    `config.validate` has checked the source and the template; a hub benchmark that fails to load, or prompts that
    leave no room for the answer within rollout.max_model_len (this needs the tokenizer), fail naming eval.benchmark.
    """
    from sse_rl.controller import ValSet
    from sse_rl.eval import load_benchmark
    from sse_rl.eval.runner import build_prompt

    e, source = recipe.eval, recipe.eval.benchmark
    if not source:
        return None
    is_file = Path(source).suffix in (".jsonl", ".parquet")
    d = recipe.data
    try:
        problems = [dataclasses.replace(p, problem=row_prompt({"problem": p.problem}, d.prompt_template,
                                                              system_prompt=d.system_prompt, chat=d.chat_template,
                                                              where=f"problem {p.id}"))
                    for p in load_benchmark(source, source if is_file else None)]
    except (OSError, ValueError, TypeError) as err:
        raise RecipeError([f"eval.benchmark: {err}"]) from None
    sampling = SamplingConfig(temperature=e.benchmark_temperature, top_p=e.benchmark_top_p, top_k=0,
                              max_tokens=e.benchmark_max_tokens or recipe.rollout.max_tokens)
    budget = recipe.rollout.max_model_len - sampling.max_tokens
    too_long = [p.id for p in problems
                if len(build_prompt(p.problem, tokenizer, "", recipe.data.chat_template)[1]) > budget]
    if too_long:
        raise RecipeError([f"eval.benchmark: {len(too_long)} problems (first {too_long[0]!r}) have prompts longer "
                           f"than rollout.max_model_len - max tokens = {budget} tokens"])
    return ValSet(Path(source).stem if is_file else source, problems, tokenizer, sampling)


def start_ray(address: str | None, num_cpus: int) -> None:
    import ray

    address = address or os.environ.get("RAY_ADDRESS")
    runtime_env = {"env_vars": WORKER_ENV}
    if address:
        ray.init(address=address, runtime_env=runtime_env)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, runtime_env=runtime_env)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_worker_imports()  # before any work: the run's Ray workers must import this sse-rl
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    recipe = validate(*parse_recipe(args.recipe, args.overrides, Recipe))
    if args.dry_run:
        print(dry_run.report(recipe))
        return 0
    run_dir = Path(recipe.out_dir)
    resume_from = find_checkpoint(run_dir, args.resume)
    if resume_from is not None and args.overwrite:
        raise SystemExit(f"--overwrite: {run_dir} holds checkpoint {resume_from.name}; resume it (without "
                         "--overwrite) or choose another out_dir")
    if resume_from is not None:
        check_resume(recipe, resume_from, args.accept_changes)
    else:
        start_over(run_dir, args.overwrite)
    write_recipe(recipe, run_dir)
    model_path = build_policy(recipe, run_dir)

    from transformers import AutoTokenizer

    import sse_rl.models  # noqa: F401  (registers SSE-H with the Auto classes)

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    d = recipe.data
    common = {"subset": d.subset, "template": d.prompt_template, "answer_column": d.answer_column,
              "tokenizer": tokenizer, "chat_template": d.chat_template, "system_prompt": d.system_prompt,
              "drop_incomplete": d.drop_incomplete}
    budget = recipe.rollout.max_model_len - recipe.rollout.max_tokens
    train_prompts = encode_prompts(load_prompts(d.train, split=d.train_split, **common), tokenizer, budget, d.train)
    eval_prompts = []
    if d.eval:
        eval_prompts = encode_prompts(load_prompts(d.eval, split=d.eval_split, **common), tokenizer, budget, d.eval)
    val = load_val_set(recipe, tokenizer)
    logger.info("run %s: %d train / %d eval prompts, %d validation problems, policy %s", run_dir, len(train_prompts),
                len(eval_prompts), len(val.problems) if val else 0, model_path)

    import ray

    from sse_rl.actors import ClusterTooSmall, EngineRefused
    from sse_rl.controller import Controller
    from sse_rl.grpo.guard import RunStopped
    from sse_rl.workers.rollout import STAGING_PARENT, remove_stale_staging

    start_ray(args.address, recipe.run.ray_num_cpus)
    controller = Controller(recipe, run_dir, model_path, train_prompts, eval_prompts, val)
    try:
        controller.start_actors()
        start = controller.restore()
        if start:
            logger.info("resuming after step %d from %s", start, resume_from)
        png = controller.run(start)
        controller.close()
        final = export.export(run_dir, run_dir / export.FINAL_DIR, overwrite=True)
        logger.info("done: %s, %s, %s", run_dir / "metrics.jsonl", png, final)
    except RunStopped as stop:  # a fault the guard caught: its message says what, where and how to resume
        logger.error("%s", stop)
        return 1
    except (ClusterTooSmall, EngineRefused) as refused:  # what is short or overridden, and the keys to change
        logger.error("%s", refused)
        return 1
    finally:
        ray.shutdown()
        # an engine killed during a weight update leaves its staging copy of the model on this node (/dev/shm)
        remove_stale_staging(STAGING_PARENT)
    return 0


if __name__ == "__main__":  # through the CLI, so that a refused recipe is its message and exit 2
    from sse_rl.cli import main as cli_main

    raise SystemExit(cli_main(["train", *sys.argv[1:]]))
