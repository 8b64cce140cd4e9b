"""Where a recipe is checked: the entry points that read and check a recipe of any kind, and the checks on what a
recipe names.

Two levels of checks, reported together, each problem under its dotted key (`algo.clip_eps_high: must be >= 0, got -1`):
1) A recipe on its own: types, bounds and unknown keys while it is built (`parse_recipe`, on `reading`'s builder),
   then the constraints between its fields (each kind's `*_rules`, beside its schema). `load_recipe` stops here: it
   reads nothing the recipe names, so tests, tools and a run's own config.yaml use it.
2) What the recipe names (this module): local files and directories (a local data file is read once, row by row,
   so an empty, malformed or non-UTF-8 one fails here naming the file and line), hub ids by their form (no download),
   `pkg.mod:fn` functions, reward specs, model presets, the distillation teacher's and student's configs and
   tokenizers, training data that is an evaluation benchmark, an eval run folder to resume.
`validate` runs both levels and raises every problem at once; each command calls it first, so nothing is written, no
Ray started and no model built for a recipe it refuses. The level-2 checks import what they read (transformers, the
eval package, the reward registry) inside themselves, so importing the config stays cheap.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sse_rl.config.distill import DistillRecipe, distill_rules
from sse_rl.config.eval import COMPLETIONS_FILE, EVAL_CONFIG_FILE, GENERATION_KEYS, EvalRecipe, eval_rules
from sse_rl.config.grpo import ModelConfig, Recipe, RewardConfig, grpo_rules
from sse_rl.config.reading import R, RecipeError, build_recipe, read_raw
from sse_rl.config.sft import SFTDataConfig, SFTRecipe, sft_rules
from sse_rl.data import (
    DATA_FILE_SUFFIXES,
    check_not_benchmark,
    check_source,
    is_function_spec,
    prompt_rows,
    read_data_file,
    sft_examples,
    template_fields,
)


PROBE_ROWS = 16  # training rows the reward probe reads for its one row (rows missing a field may be dropped)


def parse_recipe(path: str | Path | None, overrides: list[str] = (), cls: type[R] = Recipe,
                 ) -> tuple[R, list[str]]:
    """Read a recipe YAML (or start empty with `path=None`) and apply overrides: the recipe and the problems found
    building it (see `build_recipe`). A missing file or a malformed override raises at once."""
    return build_recipe(cls, read_raw(path, overrides))


def load_recipe(path: str | Path | None, overrides: list[str] = (), cls: type[R] = Recipe) -> R:
    """A recipe checked on its own (types, bounds, unknown keys, constraints between fields), raising RecipeError
    with every problem; reads nothing the recipe names. Commands use `validate(*parse_recipe(...))` instead."""
    recipe, errors = parse_recipe(path, overrides, cls)
    errors += _CHECKS[cls][0](recipe)
    if errors:
        raise RecipeError(errors)
    return recipe


def validate(recipe: R, errors: Sequence[str] = ()) -> R:
    """Every check of a recipe, before its command has any side effect; returns the recipe or raises RecipeError
    listing `errors` (found while building it: types, bounds, unknown keys), the constraints between its fields and
    the problems with what it names, each under its key."""
    rules, inputs = _CHECKS[type(recipe)]
    errors = [*errors, *rules(recipe), *inputs(recipe)]
    if errors:
        raise RecipeError(errors)
    return recipe


def _raised(key: str, check: Callable[[], Any]) -> list[str]:
    """[] when `check()` passes, else its error as one message under `key`."""
    try:
        check()
    except (OSError, ValueError, TypeError) as err:
        text = str(err)
        return [text if text.startswith(f"{key}:") else f"{key}: {text}"]
    return []


def _missing_path(key: str, path: str) -> list[str]:
    """A local checkpoint or tokenizer path that does not exist (a hub id 'org/name' is not looked up)."""
    from sse_rl.models.hybridize import is_missing_local_path

    if path and is_missing_local_path(path):
        return [f"{key}: {path!r} does not exist (neither a local directory nor a hub id org/name)"]
    return []


def _model_inputs(model: ModelConfig) -> list[str]:
    """The policy: an existing checkpoint, or `init` with a known preset and a tokenizer that can be found."""
    if not model.path and model.init is None:
        return []  # reported by the rules
    if model.init is None or (model.path and Path(model.path).exists()):
        return _missing_path("model.path", model.path)
    from sse_rl.init_model import preset_names

    errors = []
    if model.init.preset not in preset_names():
        errors.append(f"model.init.preset: unknown preset {model.init.preset!r}; choose from "
                      f"{', '.join(preset_names())}")
    tokenizer = model.init.tokenizer
    if tokenizer and is_function_spec(tokenizer):
        errors += _raised("model.init.tokenizer", lambda: check_source(tokenizer))
    else:
        errors += _missing_path("model.init.tokenizer", tokenizer)
    return errors


RowsCheck = Callable[[list[dict[str, Any]], str, str], Any]  # (rows, source, recipe key) -> raises on a bad row


def _data_inputs(sources: dict[str, str], rows_check: RowsCheck) -> list[str]:
    """Each named data source readable (key -> source), a local file's rows passing `rows_check`; training data that
    is an evaluation benchmark refused."""
    errors = [e for key, source in sources.items() if source
              for e in _raised(key, lambda k=key, s=source: _readable(k, s, rows_check))]
    if sources.get("data.train"):
        errors += _raised("data.train", lambda: check_not_benchmark(sources["data.train"]))
    return errors


def _readable(key: str, source: str, rows_check: RowsCheck) -> None:
    """`check_source`, then a local data file read and its rows turned into prompts or examples as the command will
    (a field missing or not text, chat messages where text belongs): its faults are found before the command writes
    anything (reading a file is cheap; tokenising is left to the run)."""
    check_source(source)
    if not is_function_spec(source) and Path(source).suffix in DATA_FILE_SUFFIXES:
        rows_check(read_data_file(source), source, key)


def _reward_inputs(reward: RewardConfig) -> list[str]:
    """Every reward spec resolves (a typo fails in a second, not after engine start-up)."""
    from sse_rl.rewards.registry import RewardSpecError, load_reward

    errors = []
    for i, fn in enumerate(reward.functions):
        try:
            if fn.spec:
                load_reward(fn.spec)
        except RewardSpecError as e:
            errors.append(f"reward.functions.{i}.spec: {e}")
    return errors


def _reward_probe(recipe: Recipe) -> list[str]:
    """Every reward called once, in this process and as the reward pool calls it (`sse_rl.rewards.pool.probe`), on
    the first usable training row with a stand-in completion: a reward whose signature does not take TRL's call, or
    that needs a column the data lacks, fails here in seconds, naming it. Skipped for a hub dataset (not downloaded
    here) and when the specs or the data have problems of their own (their checks report them); a reward that does
    not return within reward.timeout_s is only logged (the run's time limit handles it)."""
    from sse_rl.rewards.pool import RewardFunctionError, probe
    from sse_rl.workers.reward import reward_specs

    prompt = _probe_prompt(recipe)
    if prompt is None or not all(fn.spec for fn in recipe.reward.functions) or _reward_inputs(recipe.reward):
        return []
    errors = []
    for i, spec in enumerate(reward_specs(recipe.reward)):
        try:
            probe(spec, prompt.messages or prompt.text, prompt.columns, recipe.reward.timeout_s)
        except RewardFunctionError as err:
            errors.append(f"reward.functions.{i}: {err}")
        except TimeoutError as err:
            logging.getLogger(__name__).warning("reward.functions.%d: %s", i, err)
    return errors


def _probe_prompt(recipe: Recipe) -> Any:
    """The first usable training row as `prompt_rows` builds it (a Prompt), or None when the data is a hub dataset
    or cannot be read (the data checks report why)."""
    from sse_rl.data import read_rows

    d = recipe.data
    if not d.train or not (is_function_spec(d.train) or Path(d.train).suffix in DATA_FILE_SUFFIXES):
        return None
    try:
        rows = read_rows(d.train, d.train_split, d.subset)
        return prompt_rows(rows[:PROBE_ROWS], d.train, template=d.prompt_template, answer_column=d.answer_column,
                           system_prompt=d.system_prompt, chat_template=d.chat_template,
                           drop_incomplete=d.drop_incomplete)[0]
    except Exception:  # noqa: BLE001 - whatever stops reading the data is the data checks' to report
        return None


def _benchmark_inputs(source: str) -> list[str]:
    """eval.benchmark: a benchmark the eval package knows, or a local problem file it reads."""
    from sse_rl.eval.benchmarks import BENCHMARKS, load_problems_file

    if not source or source in BENCHMARKS:
        return []
    if Path(source).suffix not in (".jsonl", ".parquet"):
        return [f"eval.benchmark: {source!r} is neither a .jsonl/.parquet file nor a benchmark of the eval package "
                f"({', '.join(sorted(BENCHMARKS))})"]
    return _raised("eval.benchmark", lambda: load_problems_file(source))


def _grpo_inputs(recipe: Recipe) -> list[str]:
    d = recipe.data
    rows_check = functools.partial(_prompt_rows, template=d.prompt_template, answer_column=d.answer_column,
                                   system_prompt=d.system_prompt, chat_template=d.chat_template,
                                   drop_incomplete=d.drop_incomplete)
    return (_reward_inputs(recipe.reward) + _data_inputs({"data.train": d.train, "data.eval": d.eval}, rows_check)
            + _model_inputs(recipe.model) + _benchmark_inputs(recipe.eval.benchmark) + _reward_probe(recipe)
            + _tracker_inputs(recipe.run.report_to))


def _tracker_inputs(report_to: list[str]) -> list[str]:
    """run.report_to: every tracker installed and configured here (the run would fail at its first log, or TRL's)."""
    from sse_rl.trackers import report_to_errors

    return report_to_errors(report_to)


def _prompt_rows(rows: list[dict[str, Any]], source: str, _key: str, **options: Any) -> None:
    if template_fields(options["template"]):  # a template without fields: the rules report it
        prompt_rows(rows, source, **options)


def _sft_rows(data: SFTDataConfig) -> RowsCheck:
    return lambda rows, source, key: sft_examples(rows, data, source, key)


def _sft_inputs(recipe: SFTRecipe) -> list[str]:
    return (_data_inputs({"data.train": recipe.data.train}, _sft_rows(recipe.data)) + _model_inputs(recipe.model)
            + _tracker_inputs(recipe.run.report_to))


def _distill_inputs(recipe: DistillRecipe) -> list[str]:
    d = recipe.data
    return (_data_inputs({"data.train": d.train, "data.eval": d.eval}, _sft_rows(d)) + _teacher_student_inputs(recipe)
            + _tracker_inputs(recipe.run.report_to))


def _load_model_config(path: str, key: str, errors: list[str]) -> Any:
    """The model config at `path` (None after an error); a missing local path fails without asking the hub."""
    from transformers import AutoConfig

    import sse_rl.models  # noqa: F401  (registers SSE-H with the Auto classes)

    missing = _missing_path(key, path)
    if missing:
        errors += missing
        return None
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        errors.append(f"{key}: cannot load a model config from {path!r}: {err}")
        return None


def _load_tokenizer(path: str, key: str, errors: list[str]) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError) as err:
        errors.append(f"{key}: cannot load the tokenizer saved with {path!r}: {err}")
        return None


def _unsupported_logits(config: Any) -> str:
    """What in a teacher config the logits stage does not reproduce (its LM head is used as a plain linear map)."""
    for name in ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier"):
        if getattr(config, name, None) not in (None, 1, 1.0):
            return f"{name}={getattr(config, name)!r}"
    return ""


def _teacher_student_inputs(recipe: DistillRecipe) -> list[str]:
    """The teacher a dense Transformer the student can be distilled from: loadable, not SSE-H, with a tokenizer; a
    given student SSE-H with the teacher's layers, width, vocabulary and tokenizer; an empty student path
    hybridizable."""
    import torch

    errors: list[str] = []
    teacher = _load_model_config(recipe.teacher.path, "teacher.path", errors) if recipe.teacher.path else None
    if teacher is None:
        return errors
    if teacher.model_type == "sse_h":
        errors.append(f"teacher.path: {recipe.teacher.path} is an SSE-H model; the teacher is a dense Transformer")
    if "logits" in recipe.stages and _unsupported_logits(teacher):
        errors.append(f"teacher.path: config has {_unsupported_logits(teacher)}; the logits stage compares plain "
                      "LM-head logits")
    teacher_tok = _load_tokenizer(recipe.teacher.path, "teacher.path", errors)
    if recipe.student.path:
        sse_layers = _student_inputs(recipe, teacher, teacher_tok, errors)
    else:
        sse_layers = _hybridizable_inputs(recipe, teacher, errors)
    if "align" in recipe.stages and sse_layers == 0:
        errors.append("stages: align fits SSE layers to the attention they replace, but the student has none")
    if recipe.student.dtype == "bfloat16" and not torch.cuda.is_available():
        errors.append("student.dtype: bfloat16 autocast runs on a GPU here (transformers refuses it on CPU); use "
                      "float32")
    if recipe.logits.top_k >= teacher.vocab_size:
        errors.append(f"logits.top_k: {recipe.logits.top_k} must be below the vocabulary ({teacher.vocab_size}); "
                      "0 = full vocabulary")
    return errors


def _student_inputs(recipe: DistillRecipe, teacher: Any, teacher_tok: Any, errors: list[str]) -> int:
    """Errors of a given student against the teacher; returns its number of SSE layers."""
    student = _load_model_config(recipe.student.path, "student.path", errors)
    if student is None:
        return 0
    if student.model_type != "sse_h":
        errors.append(f"student.path: model_type {student.model_type!r}, expected an SSE-H checkpoint (sse_h)")
        return 0
    for name in ("num_hidden_layers", "hidden_size", "vocab_size"):
        if getattr(student, name) != getattr(teacher, name):
            errors.append(f"student.path: {name}={getattr(student, name)} but the teacher's is "
                          f"{getattr(teacher, name)}; the student must have the teacher's shape")
    student_tok = _load_tokenizer(recipe.student.path, "student.path", errors)
    if student_tok is not None and teacher_tok is not None:
        same = (student_tok.get_vocab() == teacher_tok.get_vocab() and student_tok.eos_token == teacher_tok.eos_token
                and student_tok.pad_token == teacher_tok.pad_token)
        if not same:
            errors.append(f"student.path: its tokenizer differs from the teacher's ({recipe.teacher.path}: vocabulary, "
                          "eos or pad token); distillation compares distributions over one shared vocabulary")
    return student.layer_types.count("linear_attention")


def _hybridizable_inputs(recipe: DistillRecipe, teacher: Any, errors: list[str]) -> int:
    """Errors of hybridizing the teacher with student.attn_layers; returns the student's number of SSE layers."""
    from sse_rl.models.hybridize import check_teacher, parse_attn_layers

    try:
        check_teacher(teacher)
    except ValueError as err:
        errors.append(f"teacher.path: cannot be hybridized into the student (student.path is empty): {err}")
        return 0
    try:
        layers = parse_attn_layers(recipe.student.attn_layers or None, teacher.num_hidden_layers)
    except ValueError as err:
        errors.append(f"student.attn_layers: {str(err).removeprefix('--attn-layers: ')}")
        return 0
    return teacher.num_hidden_layers - len(layers)


def _eval_inputs(recipe: EvalRecipe) -> list[str]:
    """The model, each data file read as the run reads it (missing, empty, malformed, non-UTF-8 or without problem
    and answer fields: named with its line or row), the benchmarks, the run folder's resume rules."""
    from sse_rl.eval.benchmarks import BENCHMARKS, load_problems_file

    errors = _missing_path("model", recipe.model)
    errors += [e for f in recipe.data_files
               for e in _raised("data_files", lambda f=f: load_problems_file(f, recipe.problem_column,
                                                                             recipe.answer_column))]
    if not recipe.data_files:
        errors += [f"benchmarks: unknown benchmark {name!r}; choose from {', '.join(sorted(BENCHMARKS))} or give "
                   "--data-file" for name, _ in recipe.sources() if name not in BENCHMARKS]
    return errors + _resume_inputs(recipe)


def _resume_inputs(recipe: EvalRecipe) -> list[str]:
    """A run folder with completions continues only with --resume, and then with the same generation settings."""
    out = recipe.out_dir()
    if (out / COMPLETIONS_FILE).exists() and not recipe.resume:
        return [f"resume: {out / COMPLETIONS_FILE} already holds completions: pass --resume to continue that run, "
                "or choose another --out"]
    saved_path = out / EVAL_CONFIG_FILE
    if not (recipe.resume and saved_path.is_file()):
        return []
    # a key an older run did not save had its default then
    saved = {**dataclasses.asdict(EvalRecipe()), **json.loads(saved_path.read_text(encoding="utf-8"))}
    current = dataclasses.asdict(recipe)
    changed = [f"{k}: {saved[k]!r} -> {current[k]!r}" for k in GENERATION_KEYS if saved[k] != current[k]]
    if changed:
        return [f"resume: cannot resume {out}: generation settings differ from the saved run ({'; '.join(changed)}); "
                "use the same settings or another --out"]
    return []


# The two levels of checks of each kind: (constraints between fields, what the recipe names).
_CHECKS: dict[type, tuple[Callable[[Any], list[str]], Callable[[Any], list[str]]]] = {
    Recipe: (grpo_rules, _grpo_inputs),
    SFTRecipe: (sft_rules, _sft_inputs),
    DistillRecipe: (distill_rules, _distill_inputs),
    EvalRecipe: (eval_rules, _eval_inputs),
}
