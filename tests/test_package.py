"""The distribution: package list, wheel contents, imports from outside the repo, the console script."""
from __future__ import annotations

import json
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAPPED = {"sse_rl": "sse_rl", "sse_rl.models": "models", "sse_rl.rewards": "rewards", "sse_rl.eval": "eval"}


def _packages_on_disk() -> set[str]:
    found = set()
    for package, folder in MAPPED.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            if "__pycache__" in rel.parts:
                continue
            found.add(".".join([package, *rel.parts]))
    return found


def test_pyproject_lists_every_package():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    listed = set(config["tool"]["setuptools"]["packages"])
    assert listed == _packages_on_disk(), f"pyproject packages differ from folders: {listed ^ _packages_on_disk()}"
    assert config["tool"]["setuptools"]["package-dir"] == MAPPED


def test_wheel_ships_mapped_folders(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path),
         str(ROOT)],
        check=True,
    )
    (wheel,) = tmp_path.glob("sse_rl-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for package in _packages_on_disk():
        assert package.replace(".", "/") + "/__init__.py" in names, f"{package} missing from the wheel"
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "sse-rl = sse_rl.cli:main" in text and "vllm.general_plugins" in text


def test_imports_work_outside_the_repo(tmp_path):
    code = "import sse_rl.models, sse_rl.rewards, sse_rl.eval; print(sse_rl.models.__name__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True, capture_output=True, text=True)
    assert out.stdout.strip() == "sse_rl.models"


def test_console_script_help_and_env(tmp_path):
    exe = Path(sys.executable).with_name("sse-rl")
    out = subprocess.run([str(exe), "--help"], cwd=tmp_path, check=True, capture_output=True, text=True).stdout
    for command in ("env", "init-model"):
        assert command in out
    info = json.loads(subprocess.run([str(exe), "env", "--json"], cwd=tmp_path, check=True, capture_output=True,
                                     text=True).stdout)
    assert info["packages"]["torch"].startswith("2.")
    assert info["vllm_import"] == "ok" and info["triton_import"] == "ok"
    assert info["cuda_available"] is False and info["gpus"] == []


def test_unknown_command_names_it(tmp_path):
    exe = Path(sys.executable).with_name("sse-rl")
    proc = subprocess.run([str(exe), "trian"], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode != 0 and "'trian'" in proc.stderr


def _fake_checkout(root: Path) -> Path:
    """A folder laid out like a source checkout of sse-rl (only what the check looks at)."""
    (root / "sse_rl").mkdir()
    (root / "sse_rl" / "__init__.py").write_text("")
    return root


def test_worker_import_check_names_a_shadowing_checkout(tmp_path):
    import sse_rl

    sse_rl.check_worker_imports(tmp_path)  # no checkout here: fine
    sse_rl.check_worker_imports(Path(sse_rl.__file__).resolve().parents[1])  # the imported package's own root: fine
    with pytest.raises(RuntimeError, match="holds a source checkout of sse-rl") as err:
        sse_rl.check_worker_imports(_fake_checkout(tmp_path))
    assert str(tmp_path) in str(err.value) and "pip install -e ." in str(err.value)


def test_train_refuses_to_start_workers_from_a_shadowing_checkout(tmp_path):
    exe = Path(sys.executable).with_name("sse-rl")
    proc = subprocess.run([str(exe), "train", str(ROOT / "recipes" / "tiny_cpu.yaml"), f"out_dir={tmp_path / 'run'}"],
                          cwd=_fake_checkout(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "Ray workers would import the checkout's sse_rl/ folder" in proc.stderr
    assert not (tmp_path / "run").exists()  # refused before any work
