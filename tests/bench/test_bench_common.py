"""bench/common.py, the bench scripts' shared helpers, and every script's command line."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = sorted(p.stem for p in (ROOT / "bench").glob("*.py") if p.stem not in ("__init__", "common"))


@pytest.mark.parametrize("name, kind", [
    ("sse_decode_kernel", "sse"),
    ("chunk_bwd_dqkg_kernel", "sse"),
    ("pair_sum_kernel", "sse"),
    ("router_fwd_kernel", "sse"),
    ("flash_fwd_splitkv_kernel", "attention"),  # "splitk" is a matmul name too: attention comes first
    ("fmha_cutlassF_bf16_aligned_64x128_rf_sm80", "attention"),
    ("nvjet_tst_128x64_64x8_1x2_h_bz_TNT", "matmul"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "matmul"),
    ("triton_tem_fused_mm_0", "matmul"),
    ("triton_red_fused__log_softmax_1", "fused elementwise (Inductor)"),
    ("void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, float>", "sampling/softmax/sort"),
    ("void at::native::radixSortKVInPlace<-2, -1, 32, 4>", "sampling/softmax/sort"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>>", "elementwise/copy"),
    ("Memcpy DtoD (Device -> Device)", "elementwise/copy"),
    ("ncclDevKernel_AllReduce_Sum_f32_RING_LL", "communication"),
    ("void at::native::(anonymous namespace)::fused_dropout_kernel_vec<float, float, unsigned int, 1, 4, bool>",
     "other"),
    ("vllm_stream_kernel", "other"),  # not ours: only whole kernel names of models/ops count as SSE
])
def test_kernel_kind_by_name(bench_common, name: str, kind: str) -> None:
    assert bench_common.kernel_kind(name) == kind


def _parameters(config) -> int:
    from transformers import AutoModelForCausalLM

    import sse_rl.models  # noqa: F401  (registers SSE-H with the Auto classes)

    with torch.device("meta"):
        return sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())


def test_shapes_state_their_head_and_count_as_the_results_do(bench_common) -> None:
    assert all("tie_word_embeddings" in shape for shape in bench_common.SHAPES.values())
    assert _parameters(bench_common.model_config("sse-h-2b")) == 2_267_055_360  # README's preset table
    qwen = bench_common.model_config("qwen3-1.7b-shape")
    assert qwen.tie_word_embeddings and qwen.architectures == ["Qwen3ForCausalLM"]
    assert _parameters(qwen) == 1_720_574_976  # Qwen3-1.7B: the head is the embedding
    untied = bench_common.model_config("qwen3-1.7b-shape", tie_word_embeddings=False)
    grpo_step = json.loads((ROOT / "bench" / "results" / "grpo_step.json").read_text())
    assert _parameters(untied) == grpo_step["qwen3-1.7b-shape"]["pipeline"]["params"]["total"]


def test_results_are_written_as_json_and_markdown(bench_common, tmp_path: Path) -> None:
    data = {"device": "cpu", "rows": [{"ms": 0.25}]}
    bench_common.write_results(tmp_path / "new" / "run.json", data, "# report\n")
    assert json.loads((tmp_path / "new" / "run.json").read_text()) == data
    assert (tmp_path / "new" / "run.md").read_text() == "# report\n"
    bench_common.write_results(tmp_path / "only.json", data)
    assert not (tmp_path / "only.md").exists()


def test_device_name_is_the_gpu_or_the_cpu(bench_common) -> None:
    name = bench_common.device_name()
    assert name == (torch.cuda.get_device_name() if torch.cuda.is_available() else bench_common.cpu_name())
    assert name


@pytest.mark.gpu
def test_copy_bandwidth_and_timing_on_the_gpu(bench_common) -> None:
    x = torch.empty(2**26, device="cuda")
    one, two = bench_common.bench_ms(lambda: x.mul_(1.0)), bench_common.bench_ms(lambda: (x.mul_(1.0), x.mul_(1.0)))
    assert 0 < one < two  # two passes over 256 MiB take longer than one
    assert 100e9 < bench_common.copy_bandwidth() < 20e12  # bytes/s, read + written: HBM of a data-centre GPU


def test_roofline_report_is_made_from_the_committed_throughput_results(tmp_path: Path) -> None:
    """The committed decode_roofline.md is what `bench.roofline_decode` makes of vllm_throughput.json and the
    model shapes (weights read per step depend on the tied head)."""
    subprocess.run([sys.executable, "-m", "bench.roofline_decode", "--out", str(tmp_path)], check=True,
                   capture_output=True, cwd=ROOT)
    committed = (ROOT / "bench" / "results" / "decode_roofline.md").read_text()
    assert (tmp_path / "decode_roofline.md").read_text() == committed


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_imports_and_parses_its_arguments(script: str) -> None:
    """GPU-only scripts too: `python -m bench.NAME --help` from the repository root."""
    done = subprocess.run([sys.executable, "-m", f"bench.{script}", "--help"], capture_output=True, text=True,
                          cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("usage:")


def test_grpo_step_recipe_loads_with_what_the_bench_sets() -> None:
    """The bench's own GRPO recipe leaves the policy and prompts to bench_grpo_step.py; with them it is valid."""
    from sse_rl.config import Recipe, load_recipe

    recipe = load_recipe(ROOT / "bench" / "grpo_step_recipe.yaml",
                         ["out_dir=runs/check", "model.path=some/model", "data.train=prompts.jsonl"])
    assert isinstance(recipe, Recipe) and recipe.train.steps >= 1
