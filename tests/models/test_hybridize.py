"""`sse-rl hybridize`: kept attention layers compute the teacher exactly, SSE layers take the teacher's projections,
and unsupported teachers or bad arguments fail naming what is wrong, with nothing written."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config, Qwen2MoeConfig, T5Config

import sse_rl.models  # noqa: F401  (registers SSE-H with the Auto classes)
from sse_rl.init_model import init_model
from sse_rl.models import SSEHConfig
from sse_rl.models.hybridize import auto_attn_layers, decay_bias, default_attn_layers, hybridize, lazy_ratios
from sse_rl.tokenizer import build_tiny_tokenizer

# Each family's options that the attention layer must reproduce, on top of the tiny presets.
TEACHERS = {
    "llama-tiny": {"attention_bias": True,  # q/k/v and o biases
                   "rope_parameters": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 1024}},
    "qwen2-tiny": {},  # q/k/v bias, GQA 4/2
    "qwen3-tiny": {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0,
                                       "original_max_position_embeddings": 1024}},  # q/k-norm, GQA, tied
}


@pytest.fixture(scope="module")
def teachers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Random teachers whose biases and norm weights are far from their init, so a dropped one shows."""
    root = tmp_path_factory.mktemp("teachers")
    build_tiny_tokenizer(root / "tokenizer")
    paths = {}
    for i, (preset, overrides) in enumerate(TEACHERS.items()):
        path = root / preset
        init_model(preset, path, tokenizer=str(root / "tokenizer"), seed=i, **overrides)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        torch.manual_seed(i)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("bias") or "norm" in name:
                    param.add_(0.3 * torch.randn_like(param))
        model.save_pretrained(path)
        paths[preset] = path
    return paths


def logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("preset", list(TEACHERS))
def test_all_attention_layers_reproduce_the_teacher(teachers: dict[str, Path], tmp_path: Path, preset: str) -> None:
    student = hybridize(teachers[preset], tmp_path / "student", "all")
    ids = torch.randint(0, 500, (2, 80), generator=torch.Generator().manual_seed(0))
    diff = (logits(teachers[preset], ids) - logits(student, ids)).abs().max().item()
    assert diff <= 1e-4, f"{preset}: max |teacher - student| logit = {diff}"
    assert AutoTokenizer.from_pretrained(student).chat_template == AutoTokenizer.from_pretrained(
        teachers[preset]).chat_template


def test_sse_layers_take_the_teachers_projections(teachers: dict[str, Path], tmp_path: Path) -> None:
    """Qwen2 (GQA 4 q / 2 kv heads): SSE q/o are the teacher's, k/v its heads repeated over each group; the kept
    layer is the teacher's attention with its biases; the new parts start as documented."""
    teacher = AutoModelForCausalLM.from_pretrained(teachers["qwen2-tiny"], dtype=torch.float32).state_dict()
    student = AutoModelForCausalLM.from_pretrained(hybridize(teachers["qwen2-tiny"], tmp_path / "s", [2]),
                                                   dtype=torch.float32)
    assert student.config.attn_layers == [2] and student.config.num_heads == 4 and student.config.head_dim == 32
    sse, kept = student.model.layers[0].attn, student.model.layers[2].attn
    src = "model.layers.0.self_attn."
    assert torch.equal(sse.q_proj.weight, teacher[src + "q_proj.weight"])
    assert torch.equal(sse.o_proj.weight, teacher[src + "o_proj.weight"])
    k_heads = sse.k_proj.weight.unflatten(0, (4, 32))
    teacher_k = teacher[src + "k_proj.weight"].unflatten(0, (2, 32))
    for head in range(4):
        assert torch.equal(k_heads[head], teacher_k[head // 2])
    assert torch.equal(kept.k_proj.bias, teacher["model.layers.2.self_attn.k_proj.bias"])
    assert torch.count_nonzero(sse.lora_q_proj[1].weight) == 0 and torch.count_nonzero(sse.gk_proj[1][1].weight) == 0
    assert torch.equal(sse.gk_proj[0][1].bias, decay_bias(student.config))
    # the bias gives head h its half-life: exp(logsigmoid(b) / normalizer) ** t_h = 0.5 at t = 16 for head 0
    decay = torch.exp(torch.nn.functional.logsigmoid(sse.gk_proj[0][1].bias[0].double()) / 16)
    assert decay.item() ** 16 == pytest.approx(0.5, rel=1e-5)


def test_hybrid_generates_and_trains(teachers: dict[str, Path], tmp_path: Path) -> None:
    """The converted model loads with the Auto classes, generates from the cache as its full forward does, and
    every new SSE parameter gets a gradient (none is stuck at a zero init)."""
    model = AutoModelForCausalLM.from_pretrained(hybridize(teachers["qwen3-tiny"], tmp_path / "s", [1, 3]),
                                                 dtype=torch.float32)
    ids = torch.randint(0, 500, (1, 12), generator=torch.Generator().manual_seed(1))
    out = model.generate(ids, max_new_tokens=6, do_sample=False)
    with torch.no_grad():
        full = model(out[:, :-1]).logits[0, ids.shape[1] - 1:].argmax(-1)
    assert torch.equal(full, out[0, ids.shape[1]:])
    model.train()
    model(ids, labels=ids).loss.backward()
    first_two = [p for n, p in model.named_parameters() if ".0.attn." in n]
    assert all(p.grad is not None for p in first_two)
    model.zero_grad()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert torch.count_nonzero(model.model.layers[0].attn.lora_q_proj[1].weight) > 0


def test_default_placement_follows_the_paper() -> None:
    assert default_attn_layers(18) == [5, 11, 17]
    assert default_attn_layers(28) == [4, 10, 15, 21, 27]
    assert default_attn_layers(4) == [3]


def unsupported_teacher(root: Path, name: str) -> Path:
    """A config.json alone: each must be refused before any weight is looked for."""
    configs = {
        "moe": Qwen2MoeConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=2, num_key_value_heads=2),
        "sliding": Qwen2Config(num_hidden_layers=2, hidden_size=64, num_attention_heads=2, use_sliding_window=True,
                               sliding_window=16, max_window_layers=0),
        "head16": Qwen2Config(num_hidden_layers=2, hidden_size=64, num_attention_heads=4),
        "t5": T5Config(d_model=64, num_layers=2, num_heads=2),
    }
    configs[name].save_pretrained(root / name)
    return root / name


@pytest.mark.parametrize(("name", "named"), [("moe", "num_experts"), ("sliding", "use_sliding_window=True"),
                                             ("head16", "head_dim=16"), ("t5", "is_encoder_decoder=True")])
def test_unsupported_teacher_is_refused_naming_the_field(tmp_path: Path, name: str, named: str) -> None:
    teacher = unsupported_teacher(tmp_path, name)
    with pytest.raises(ValueError, match=named):
        hybridize(teacher, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sse_rl.cli", "hybridize", *args], capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow
def test_cli_errors_name_the_problem_and_write_nothing(teachers: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    cases = [([str(teachers["llama-tiny"]), str(out), "--attn-layers", "1,4"], "--attn-layers"),
             ([str(tmp_path / "no_such_teacher"), str(out)], "no_such_teacher"),
             ([str(teachers["llama-tiny"]), str(out), "--num-heads", "3"], "num_heads * head_dim"),
             ([str(teachers["llama-tiny"]), str(out), "--attn-layers", "auto:0"], "--attn-layers"),
             ([str(teachers["llama-tiny"]), str(out), "--attn-layers", "auto:2"], "--calibration"),
             ([str(teachers["llama-tiny"]), str(out), "--attn-layers", "auto:2", "--calibration",
               str(tmp_path / "none.jsonl")], "none.jsonl")]
    for args, named in cases:
        result = run_cli(*args)
        assert result.returncode == 2 and named in result.stderr and "Traceback" not in result.stderr, result.stderr
        assert not out.exists()
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    result = run_cli(str(teachers["llama-tiny"]), str(out))
    assert result.returncode == 2 and "not empty" in result.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_cli_writes_a_checkpoint(teachers: dict[str, Path], tmp_path: Path) -> None:
    result = run_cli(str(teachers["qwen2-tiny"]), str(tmp_path / "out"), "--attn-layers", "0,3", "--top-k", "2")
    assert result.returncode == 0, result.stderr
    config = AutoModelForCausalLM.from_pretrained(tmp_path / "out").config
    assert config.attn_layers == [0, 3] and config.num_writer == 2 and config.attn_qkv_bias


def planted_far_layer(path: Path, far: int) -> None:
    """A llama-tiny teacher whose layers attend to their own token (q = k = 3 x the normed input, which every other
    token matches far less) except layer `far`, whose zero queries spread attention evenly over the whole prefix."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            eye = 3.0 * torch.eye(layer.self_attn.q_proj.weight.shape[0])
            layer.self_attn.q_proj.weight.copy_(torch.zeros_like(eye) if i == far else eye)
            layer.self_attn.k_proj.weight.copy_(eye)
    model.save_pretrained(path)


def test_auto_keeps_the_layers_that_attend_far(teachers: dict[str, Path], tmp_path: Path) -> None:
    teacher = tmp_path / "teacher"
    init_model("llama-tiny", teacher, tokenizer=str(teachers["llama-tiny"]), seed=0)
    planted_far_layer(teacher, far=2)
    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
    ratios = lazy_ratios(model, [torch.randperm(500, generator=torch.Generator().manual_seed(s))[:64]
                                 for s in range(3)])
    assert ratios[2] < 0.5 < min(r for i, r in enumerate(ratios) if i != 2), ratios
    assert model.config._attn_implementation != "eager"  # restored after reading attention probabilities

    calibration = tmp_path / "calibration.jsonl"
    calibration.write_text("".join(json.dumps({"text": " ".join(f"w{s}x{i}" for i in range(40))}) + "\n"
                                   for s in range(3)))
    result = run_cli(str(teacher), str(tmp_path / "out"), "--attn-layers", "auto:1", "--calibration",
                     str(calibration))
    assert result.returncode == 0, result.stderr
    assert SSEHConfig.from_pretrained(tmp_path / "out").attn_layers == [2]


@pytest.mark.gpu
def test_auto_ranks_on_the_gpu_as_on_the_cpu(teachers: dict[str, Path], tmp_path: Path) -> None:
    """With a GPU the calibration forwards run there: the same ratios as on the CPU, the teacher back on the CPU."""
    teacher = tmp_path / "teacher"
    init_model("llama-tiny", teacher, tokenizer=str(teachers["llama-tiny"]), seed=0)
    planted_far_layer(teacher, far=2)
    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
    sequences = [torch.randperm(500, generator=torch.Generator().manual_seed(s))[:64] for s in range(3)]
    on_cpu = lazy_ratios(model, sequences)
    on_gpu = lazy_ratios(model.cuda(), sequences)
    assert on_gpu == pytest.approx(on_cpu, abs=1e-4)
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    texts = [" ".join(f"w{s}x{i}" for i in range(40)) for s in range(3)]
    assert auto_attn_layers(model.cpu(), tokenizer, texts, 1) == [2]
    assert next(model.parameters()).device.type == "cpu"
