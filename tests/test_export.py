"""Export (`sse_rl.export`, `models/remote_code.py`): an SSE-H checkpoint loads with trust_remote_code in a Python
that cannot import sse_rl and computes the package model's logits; `sse-rl export` of a run writes the weights
(hard-linked), tokenizer, code and model card; `--push-to-hub` sends its requests to a local stand-in for the Hub."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM
from transformers.dynamic_module_utils import get_imports

from sse_rl import checkpoint
from sse_rl.cli import main as cli
from sse_rl.models import SSEHConfig, SSEHForCausalLM
from sse_rl.models.remote_code import AUTO_MAP
from sse_rl.tasks.max_digit import build_tokenizer

IDS = [[3, 7, 1, 9, 4, 4, 2, 8, 5, 11]]
# Runs with -S and PYTHONPATH = site-packages only: no .pth files, so the editable sse_rl is not on the path.
LOAD_WITHOUT_SSE_RL = """
import sys, torch
try:
    import sse_rl
except ImportError:
    pass
else:
    raise SystemExit("sse_rl is importable")
from transformers import AutoModelForCausalLM
from transformers.dynamic_module_utils import get_imports
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
position_ids = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4]])  # two packed sequences
plain, packed = model(torch.tensor(%s)).logits, model(torch.tensor(%s), position_ids=position_ids).logits
torch.save({"plain": plain, "packed": packed}, sys.argv[2])
""" % (IDS, IDS)


def _tiny_model(seed: int = 0) -> SSEHForCausalLM:
    torch.manual_seed(seed)
    return SSEHForCausalLM(SSEHConfig.from_preset("sse-h-tiny", vocab_size=64)).eval()


def test_a_saved_checkpoint_loads_as_remote_code_where_sse_rl_is_not_installed(tmp_path):
    model = _tiny_model()
    model.save_pretrained(tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["auto_map"] == AUTO_MAP
    for copy in sorted((tmp_path / "ckpt").glob("*.py")):  # the packages transformers requires of remote code
        assert set(get_imports(copy)) <= {"__future__", "collections", "dataclasses", "huggingface_hub", "importlib",
                                          "itertools", "math", "os", "torch", "transformers", "typing"}, copy
    env = {"PYTHONPATH": sysconfig.get_paths()["purelib"], "HF_MODULES_CACHE": str(tmp_path / "modules"),
           "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-S", "-c", LOAD_WITHOUT_SSE_RL, str(tmp_path / "ckpt"),
                           str(tmp_path / "logits.pt")], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    remote = torch.load(tmp_path / "logits.pt")
    with torch.no_grad():
        torch.testing.assert_close(remote["plain"], model(torch.tensor(IDS)).logits, rtol=1e-5, atol=1e-5)
        packed = model(torch.tensor(IDS), position_ids=torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4]])).logits
        torch.testing.assert_close(remote["packed"], packed, rtol=1e-5, atol=1e-5)


def _fake_run(run_dir: Path) -> SSEHForCausalLM:
    """A GRPO run directory as the trainer leaves it: config.yaml, metrics.jsonl, two checkpoints (steps 2, 4)."""
    run_dir.mkdir()
    recipe = {"out_dir": str(run_dir), "model": {"path": "", "init": {"preset": "sse-h-tiny"}}, "train": {"steps": 4}}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(recipe))
    rows = [{"step": 0, "eval/reward": 0.1, "val/avg@4": 0.0}, {"step": 2, "reward/mean": 0.3, "val/avg@4": 0.25},
            {"step": 4, "reward/mean": 0.5, "eval/reward": 0.6, "val/avg@4": 0.5, "val/pass@4": 0.75}]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    tokenizer = build_tokenizer(run_dir / "tokenizer")
    for step in (2, 4):
        model = _tiny_model(step)

        def write(tmp: Path, model: SSEHForCausalLM = model) -> None:
            model.save_pretrained(tmp / "model")
            shutil.copytree(tokenizer, tmp / "model", dirs_exist_ok=True)
            (tmp / "trainer.pt").write_bytes(b"")

        checkpoint.save(run_dir, step, write, {"sampler": {}}, keep=2)
    return model


def test_export_of_a_run_writes_weights_tokenizer_code_and_card(tmp_path):
    model = _fake_run(tmp_path / "run")
    assert cli(["export", str(tmp_path / "run"), str(tmp_path / "out")]) == 0
    out, ckpt = tmp_path / "out", tmp_path / "run" / "checkpoints" / "step_000004" / "model"
    assert (out / "model.safetensors").stat().st_ino == (ckpt / "model.safetensors").stat().st_ino  # hard link
    assert sorted(p.name for p in out.iterdir()) == sorted({p.name for p in ckpt.iterdir()} | {"README.md"})
    assert json.loads((out / "config.json").read_text())["auto_map"] == AUTO_MAP
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(torch.tensor(IDS)).logits, model(torch.tensor(IDS)).logits)
    card = (out / "README.md").read_text()
    assert "- Base model: `random weights, preset sse-h-tiny`" in card and "- Steps: 4 of 4" in card
    assert "## Final validation metrics (step 4)" in card
    assert "| val/avg@4 | 0.5 |" in card and "| val/pass@4 | 0.75 |" in card and "| eval/reward | 0.6 |" in card
    assert "trust_remote_code=True" in card and "train:\n  steps: 4" in card
    with pytest.raises(SystemExit, match="exists; choose another folder or pass --overwrite"):
        cli(["export", str(tmp_path / "run"), str(out)])


def test_export_of_one_checkpoint_takes_its_step_and_metrics(tmp_path):
    _fake_run(tmp_path / "run")
    assert cli(["export", str(tmp_path / "run" / "checkpoints" / "step_000002"), str(tmp_path / "out")]) == 0
    card = (tmp_path / "out" / "README.md").read_text()
    assert "- Steps: 2 of 4" in card and "## Final validation metrics (step 2)" in card
    assert "| val/avg@4 | 0.25 |" in card


class _Hub(BaseHTTPRequestHandler):
    """Stands in for the Hub: records each request; answers what huggingface_hub needs to create a repository and
    commit files sent inline ("regular" upload mode)."""

    requests: list[tuple[str, str, bytes]] = []

    def _answer(self, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:  # noqa: N802  (http.server's name)
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.requests.append(("POST", self.path, body))
        base = f"http://127.0.0.1:{self.server.server_port}"
        if self.path == "/api/repos/create":
            self._answer({"url": f"{base}/me/policy", "name": "me/policy", "id": "me/policy"})
        elif self.path == "/api/validate-yaml":  # the model card's metadata
            self._answer({"errors": [], "warnings": []})
        elif self.path.endswith("/preupload/main"):
            files = json.loads(body)["files"]
            self._answer({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                    for f in files]})
        elif self.path.endswith("/commit/main"):
            self._answer({"commitUrl": f"{base}/me/policy/commit/abc123", "commitOid": "abc123", "success": True})
        else:
            self.send_error(404)

    def do_GET(self) -> None:  # noqa: N802
        self.requests.append(("GET", self.path, b""))
        self.send_error(404)

    def log_message(self, *args) -> None:
        pass


def test_push_to_hub_creates_a_private_repo_and_commits_the_folder(tmp_path):
    _fake_run(tmp_path / "run")
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = {"HF_ENDPOINT": f"http://127.0.0.1:{server.server_port}", "HF_TOKEN": "hf_test", "HF_HUB_DISABLE_XET": "1",
           "HF_HUB_DISABLE_TELEMETRY": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    try:
        done = subprocess.run([sys.executable, "-m", "sse_rl.cli", "export", str(tmp_path / "run"),
                               str(tmp_path / "out"), "--push-to-hub", "me/policy"], env=env, capture_output=True,
                              text=True, timeout=300)
    finally:
        server.shutdown()
    assert done.returncode == 0, done.stderr[-3000:]
    assert "uploaded: http://127.0.0.1" in done.stdout
    posts = {path: body for method, path, body in _Hub.requests if method == "POST"}
    create = json.loads(posts["/api/repos/create"])
    assert create["visibility"] == "private" and create["name"] == "policy" and create["organization"] == "me"
    assert "library_name: transformers" in json.loads(posts["/api/validate-yaml"])["content"]
    commit = [json.loads(line) for line in posts["/api/models/me/policy/commit/main"].splitlines()]
    sent = {c["value"]["path"] for c in commit if c["key"] == "file"}
    assert {"model.safetensors", "config.json", "README.md", "modeling_sse_h.py", "sse_h_ops.py",
            "tokenizer_config.json"} <= sent


def test_export_repositories_are_private_unless_public():
    from sse_rl.export import parse_args

    assert parse_args(["RUN", "OUT", "--push-to-hub", "me/p"]).private is True
    assert parse_args(["RUN", "OUT", "--private"]).private is True
    assert parse_args(["RUN", "OUT", "--public"]).private is False
