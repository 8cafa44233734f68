"""Every benchmark script README's Benchmarks section names runs to the end, at a tiny size.

The figures are not checked (the machine is shared and the sizes are tiny); each script must
finish and print them. The scripts' ``main(argv)`` run in this process, which has torch and MONAI
imported already (torch's thread setting is put back after each); the widget's, which starts its
own napari viewer and needs a display (pytest-xvfb provides one), runs in a subprocess.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"

# Each README benchmark with arguments that make it small (a tile or two of a tiny model).
TINY = {
    "bench_pipeline.py": ["--shape", "4,64,64", "--tiles", "4,32,32"],
    "bench_model.py": ["--shape", "16,32,64", "--tile", "16,32,32"],
    "bench_engine.py": ["--base", "16,32,64", "--tile", "16,32,32", "--only", "speed"],
    "bench_throughput.py": ["--shape", "32,64,64", "--device", "all"],
    # Two workers: several blocks, merged (one worker is the same code with one block).
    "bench_distributed.py": ["--shape", "16,32,64", "--tile", "16,32,32", "--workers", "2"],
    "bench_remedies.py": ["--shape", "48,64,64"],
    "bench_widget.py": ["--repeat", "1", "--shape", "16,64,64", "--hidden"],
}


def readme_benchmarks() -> set[str]:
    """The scripts the Benchmarks section of README names."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Benchmarks", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"benchmarks/(bench_\w+\.py)", section))


def load_script(name: str):
    """The benchmark script as a module (it imports its siblings from its own folder)."""
    spec = importlib.util.spec_from_file_location(Path(name).stem, BENCHMARKS / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def torch_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_every_readme_benchmark_is_run_here():
    assert readme_benchmarks() == set(TINY)


@pytest.mark.parametrize("script", [s for s in TINY if s != "bench_widget.py"])
def test_benchmark_runs_to_the_end(script, tmp_path, monkeypatch, capsys, torch_threads):
    monkeypatch.chdir(tmp_path)  # a script that writes next to itself would show here
    code = load_script(script).main(TINY[script])
    assert code in (0, None)
    printed = capsys.readouterr().out
    assert len(printed.splitlines()) >= 2, printed


def test_pipeline_memory_mode_runs_to_the_end(tmp_path, monkeypatch, capsys, torch_threads):
    # --memory grows the volume 16x and 64x in y and x: from one 4x32x32 tile here.
    monkeypatch.chdir(tmp_path)
    argv = ["--memory", "--shape", "4,64,64", "--tiles", "4,32,32"]
    assert load_script("bench_pipeline.py").main(argv) in (0, None)
    printed = capsys.readouterr().out
    assert "volume 4x32x32" in printed and "volume 4x256x256" in printed
    assert (
        "peak RSS 16x/1x" in printed and printed.count("in use (with MALLOC_MMAP_THRESHOLD_") == 3
    )


def test_widget_benchmark_runs_to_the_end(tmp_path):
    pytest.importorskip("napari")
    if not os.environ.get("DISPLAY"):
        pytest.skip("no X display (pytest-xvfb provides one)")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "bench_widget.py"), *TINY["bench_widget.py"]],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert "largest GUI gap" in done.stdout


def test_pipeline_blend_mode_runs_to_the_end(capsys, torch_threads):
    argv = ["--blend", "--shape", "8,64,64", "--tiles", "4,32,32", "1,32,32", "--threads", "1", "2"]
    assert load_script("bench_pipeline.py").main(argv) in (0, None)
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 4 and all("Mvoxel/s" in line for line in printed)


def test_pipeline_cores_mode_runs_to_the_end(tmp_path, monkeypatch, capsys):
    if not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2:
        pytest.skip("pinning a process to 1 and 2 CPUs needs Linux and 2 CPUs")
    monkeypatch.chdir(tmp_path)
    argv = ["--shape", "4,64,64", "--tiles", "4,32,32", "--cores", "1", "2", "--cache-mb", "1"]
    assert load_script("bench_pipeline.py").main(argv) in (0, None)
    printed = capsys.readouterr().out
    assert "on 1 core(s):" in printed and "on 2 core(s):" in printed
    assert printed.count("Mvoxel/s of input") == 2
