"""The package builds into a wheel with the compiled module and the Triton kernels, and imports anywhere."""
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_contains_native_module_and_kernels(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q", "-w",
                    str(tmp_path), str(ROOT)], check=True, capture_output=True, timeout=600)
    (wheel,) = tmp_path.glob("cai_engine-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.startswith("cai_engine/_native") and n.endswith(".so") for n in names)
    for module in ("kernels/__init__.py", "kernels/logprob.py", "kernels/pm_loss.py", "ops/logprob.py",
                   "model/decoder.py", "engine/llm.py", "train/__main__.py", "data/comparisons.py",
                   "cai/constitution.py", "cai/critique.py", "data/prompts.py",
                   "cai/data/constitution.toml", "data/builtin_prompts.jsonl"):  # data files too: the stages read them
        assert f"cai_engine/{module}" in names, module


def test_imports_from_any_directory(tmp_path):
    code = ("import cai_engine, cai_engine.ops, cai_engine.kernels, cai_engine._native as n, numpy as np;"
            "print(float(n.logsumexp_rows(np.zeros((1, 4), dtype=np.float32))[0]))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True, capture_output=True, text=True)
    assert abs(float(out.stdout) - 1.3862943) < 1e-6
