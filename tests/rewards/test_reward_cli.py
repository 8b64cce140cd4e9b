"""`sse-rl rewards agreement|check` through `main(argv)` (the lead wires it into `sse-rl`)."""
import json

import pytest
from sse_rl.rewards.cli import main

PEER = "peer_graded/qwen25math_harness_math_cot_100_flat.jsonl"


def _last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_agreement_on_the_peer_file(shared_data, capsys):
    assert main(["agreement", str(shared_data / PEER), "--min-agree", "799"]) == 0
    summary = _last_json(capsys)
    assert summary["rows"] == 800 and summary["agree"] >= 799 and summary["timeouts"] == 0


def test_agreement_fails_below_the_bar(tmp_path, capsys):
    rows = [{"completion": r"\boxed{3}", "gold": "3", "peer_correct": True},
            {"completion": r"\boxed{4}", "gold": "3", "peer_correct": True}]
    data = tmp_path / "peer.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    assert main(["agreement", str(data), "--min-agree", "2", "--workers", "1"]) == 1
    out = capsys.readouterr().out
    assert "row 1: gold '3', peer True, ours 0.0" in out and '"agree": 1' in out
    (tmp_path / "bad.jsonl").write_text(json.dumps({"text": "x"}))
    with pytest.raises(SystemExit, match="need rows with 'completion'"):
        main(["agreement", str(tmp_path / "bad.jsonl")])


def test_check_with_a_user_reward_file(tmp_path, capsys):
    path = tmp_path / "my_rewards.py"
    path.write_text("def brevity(prompts, completions, **columns):\n"
                    "    return [1.0 / (1 + len(c)) for c in completions]\n")
    completion = r"<think>x</think>\boxed{7}"
    assert main(["check", "--answer", "7", "--reward", "math_accuracy", "--reward", f"{path}:brevity",
                 "--workers", "1", completion]) == 0
    result = _last_json(capsys)
    assert result["per_function"] == {"math_accuracy": [1.0], "brevity": [pytest.approx(1 / (1 + len(completion)))]}
    assert result["total"] == [pytest.approx(1 + 1 / (1 + len(completion)))]
