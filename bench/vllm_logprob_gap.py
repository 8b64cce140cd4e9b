"""Where a vLLM-vs-HF logprob gap comes from: a converted Qwen3 teacher, hybridized (attention at 2 of 4 layers) and
with every layer kept as attention, greedy in vLLM (fp32), compared with HF on the CPU and on the engine's device.

    python -m bench.vllm_logprob_gap --out OUT_DIR

Prints one row per (model, prompt): max |logprob| differences vLLM-HF(CPU), vLLM-HF(device), HF(device)-HF(CPU).
Results: bench/results/hybridize_h100/README.md.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from sse_rl.init_model import init_model
from sse_rl.models.hybridize import hybridize
from sse_rl.tokenizer import build_tiny_tokenizer

from tests.vllm.vllm_testing import engine_env, greedy, hf_teacher_forced, load_hf, make_llm, random_prompts


def teacher(root: Path) -> Path:
    """The checkpoint of tests/vllm/test_vllm_hybridize.py: qwen3-tiny, seed 3, norm weights perturbed."""
    build_tiny_tokenizer(root / "tokenizer")
    init_model("qwen3-tiny", root / "teacher", tokenizer=str(root / "tokenizer"), seed=3)
    model = AutoModelForCausalLM.from_pretrained(root / "teacher", dtype=torch.float32)
    torch.manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.3 * torch.randn_like(param))
    model.save_pretrained(root / "teacher")
    return root / "teacher"


def device_logprobs(model, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    ids = torch.tensor([prompt + tokens], device=model.device)
    with torch.no_grad():
        logprobs = model(ids, use_cache=False).logits[0].float().log_softmax(-1).cpu()
    return logprobs[torch.arange(len(prompt) - 1, len(prompt) + len(tokens) - 1), torch.tensor(tokens)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="scratch directory for the checkpoints")
    root = Path(parser.parse_args().out)
    source = teacher(root)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for layers, name in (([1, 3], "hybrid"), ("all", "all-attention")):
        path = hybridize(source, root / name, layers)
        with engine_env():
            llm = make_llm(str(path))
            completions = greedy(llm, random_prompts([5, 40, 120], vocab_size=512, seed=1), max_tokens=24)
            del llm
        cpu, dev = load_hf(str(path)), load_hf(str(path)).to(device)
        for c in completions:
            engine = torch.tensor(c.logprobs)
            hf_cpu = hf_teacher_forced(cpu, c.prompt, c.tokens)[1]
            hf_dev = device_logprobs(dev, c.prompt, c.tokens)
            print(f"{name} prompt {len(c.prompt)}: vLLM-HF(cpu) {(engine - hf_cpu).abs().max():.2e} "
                  f"vLLM-HF({device}) {(engine - hf_dev).abs().max():.2e} "
                  f"HF({device})-HF(cpu) {(hf_dev - hf_cpu).abs().max():.2e}", flush=True)


if __name__ == "__main__":
    main()
