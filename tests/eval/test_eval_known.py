"""evaluate() on completions whose correctness is known: exact metrics, files, interruption and resume.

The completions come from a script instead of a model (a `GenerateFn`, the same interface the GRPO trainer's
engines use); prompts, grading (the real sandboxed math_accuracy), the completions file and the report are real.
"""
import json

import pytest
from sse_rl.config import STANDARD_INSTRUCTION
from sse_rl.eval import Generation, MathGrader, Problem, evaluate, load_results
from sse_rl.eval.store import CompletionStore, SampleRecord

PROBLEMS = [Problem("p1", "What is 200 + 4?", "204"), Problem("p2", "What is 5 * 5?", "25"),
            Problem("p3", "What is 1 / 2?", "\\frac{1}{2}")]
# problem id -> per sample (completion, tokens, finish reason); comments give (correct, vote)
SCRIPT = {
    "p1": [("So \\boxed{204}.", 5, "stop"),  # right, 204
           ("<think>\\boxed{204}</think> so \\boxed{203}", 9, "stop"),  # wrong: only the box after </think> counts
           ("The answer is 204", 100, "length"),  # wrong: no box, no vote
           ("\\boxed{0204}", 4, "stop")],  # right, 204
    "p2": [("\\boxed{24}", 3, "stop"), ("\\boxed{24}", 3, "stop"),  # wrong, 24 (twice)
           ("\\boxed{25}", 3, "stop"),  # right, 25
           ("\\boxed{ 24 }", 100, "length")],  # wrong, 24
    "p3": [("\\boxed{\\dfrac{2}{4}}", 6, "stop"),  # right (math-verify), vote \dfrac{2}{4}
           ("\\boxed{0.5}", 4, "stop"),  # right, 0.5
           ("\\boxed{1/3}", 4, "stop"),  # wrong
           ("no idea", 2, "stop")],  # wrong, no vote
}
CORRECT = {"p1": [True, False, False, True], "p2": [False, False, True, False], "p3": [True, True, False, False]}


class ScriptedModel:
    """A GenerateFn answering from SCRIPT; finishes requests in reverse order; can stop after `stop_after` samples."""

    def __init__(self, stop_after: int | None = None):
        self.stop_after = stop_after
        self.requests = []  # one list of (problem id, sample) per call

    def __call__(self, requests, sampling):
        keys = [self.key(r) for r in requests]
        self.requests.append(keys)
        for done, index in enumerate(reversed(range(len(requests)))):
            if done == self.stop_after:
                raise KeyboardInterrupt
            pid, sample = keys[index]
            yield index, Generation(*SCRIPT[pid][sample])

    @staticmethod
    def key(request):
        benchmark, pid, sample = request.id.split("/")
        assert benchmark == "val"
        return pid, int(sample)


@pytest.fixture(scope="module")
def grader():
    with MathGrader() as g:
        yield g


def check_expected_metrics(m):
    assert m.num_problems == 3 and m.samples == 4
    assert m.avg == pytest.approx(5 / 12)
    # pass@2: 1 - C(4-c, 2)/C(4, 2) per problem: c=2 -> 5/6, c=1 -> 1/2
    assert m.pass_at == pytest.approx({1: 5 / 12, 2: (5 / 6 + 1 / 2 + 5 / 6) / 3, 4: 1.0})
    # maj@1: p1 right (204), p2 wrong (24), p3 right; maj@2: p1 tie 204/203 -> 204 first; p3 tie -> \dfrac{2}{4}
    # first; maj@4: p1 204 x2, p2 24 x3, p3 four-way tie -> first seen
    assert m.maj_at == pytest.approx({1: 2 / 3, 2: 2 / 3, 4: 2 / 3})
    assert m.mean_tokens == pytest.approx(sum(t for rows in SCRIPT.values() for _, t, _ in rows) / 12)
    assert m.truncation_rate == pytest.approx(2 / 12)


def test_known_completions_give_exact_metrics_and_files(tmp_path, tiny_tokenizer, grader):
    model = ScriptedModel()
    metrics = evaluate(model, PROBLEMS, tokenizer=tiny_tokenizer, samples=4, grader=grader, out_dir=tmp_path)
    check_expected_metrics(metrics)
    assert len(model.requests) == 1 and len(model.requests[0]) == 12
    lines = [json.loads(line) for line in (tmp_path / "completions.jsonl").read_text().splitlines()]
    assert len(lines) == 12
    assert {(r["problem_id"], r["sample"]): r["correct"] for r in lines} == {
        (pid, s): ok for pid, flags in CORRECT.items() for s, ok in enumerate(flags)}
    votes = {(r["problem_id"], r["sample"]): r["pred"] for r in lines}
    assert votes[("p1", 2)] is None and votes[("p1", 3)] == "204" and votes[("p3", 0)] == "\\dfrac{2}{4}"
    results = load_results(tmp_path)
    rows = {row["id"]: row for row in results["benchmarks"]["val"]["problems"]}
    assert rows["p2"]["accuracy"] == 0.25 and rows["p2"]["majority_answer"] == "24"
    assert not rows["p2"]["majority_correct"]
    assert "41.7" in (tmp_path / "summary.md").read_text()  # avg@4 = 5/12
    assert (tmp_path / "val.png").stat().st_size > 10_000


def test_prompt_uses_chat_template_and_instruction(tiny_tokenizer, grader):
    seen = []

    def capture(requests, sampling):
        seen.extend(requests)
        yield from ((i, Generation("\\boxed{204}", 3, "stop")) for i in range(len(requests)))

    m = evaluate(capture, PROBLEMS[:1], tokenizer=tiny_tokenizer, samples=2, grader=grader)
    assert m.avg == 1.0
    prompt = seen[0].prompt
    assert prompt == f"<|im_start|>user\nWhat is 200 + 4?\n{STANDARD_INSTRUCTION}<|im_end|>\n<|im_start|>assistant\n"
    assert tiny_tokenizer.decode(seen[0].prompt_token_ids) == prompt
    assert [r.id for r in seen] == ["val/p1/0", "val/p1/1"]


def test_interrupted_run_resumes_without_redoing_samples(tmp_path, tiny_tokenizer, grader):
    first = ScriptedModel(stop_after=5)
    with pytest.raises(KeyboardInterrupt):
        evaluate(first, PROBLEMS, tokenizer=tiny_tokenizer, samples=4, grader=grader, out_dir=tmp_path)
    saved = (tmp_path / "completions.jsonl").read_text().splitlines()
    assert len(saved) == 5 and not (tmp_path / "results.json").exists()
    with pytest.raises(FileExistsError, match="--resume"):
        evaluate(ScriptedModel(), PROBLEMS, tokenizer=tiny_tokenizer, samples=4, grader=grader, out_dir=tmp_path)
    second = ScriptedModel()
    metrics = evaluate(second, PROBLEMS, tokenizer=tiny_tokenizer, samples=4, grader=grader, out_dir=tmp_path,
                       resume=True)
    done_first = {(r["problem_id"], r["sample"]) for r in map(json.loads, saved)}
    assert len(second.requests[0]) == 7 and not done_first & set(second.requests[0])
    assert (tmp_path / "completions.jsonl").read_text().splitlines()[:5] == saved
    check_expected_metrics(metrics)


def test_resume_with_more_samples_generates_only_the_new_ones(tmp_path, tiny_tokenizer, grader):
    evaluate(ScriptedModel(), PROBLEMS, tokenizer=tiny_tokenizer, samples=2, grader=grader, out_dir=tmp_path)
    more = ScriptedModel()
    metrics = evaluate(more, PROBLEMS, tokenizer=tiny_tokenizer, samples=4, grader=grader, out_dir=tmp_path,
                       resume=True)
    assert sorted(more.requests[0]) == sorted((p.id, s) for p in PROBLEMS for s in (2, 3))
    check_expected_metrics(metrics)


def _record(sample):
    return SampleRecord("val", "p1", sample, "204", "\\boxed{204}", "204", 1.0, True, 3, "stop")


def test_store_drops_a_torn_last_line(tmp_path):
    path = tmp_path / "completions.jsonl"
    store = CompletionStore(path, resume=False)
    store.append([_record(0), _record(1)])
    with path.open("a") as f:
        f.write('{"benchmark": "val", "problem_')  # killed mid-write
    reopened = CompletionStore(path, resume=True)
    assert len(reopened) == 2 and ("val", "p1", 1) in reopened and ("val", "p1", 2) not in reopened
    reopened.append([_record(2)])
    assert len(CompletionStore(path, resume=True)) == 3
    path.write_text('{"benchmark": "val"}\n' + path.read_text())
    with pytest.raises(ValueError, match="line 1 is not a sample record"):
        CompletionStore(path, resume=True)
