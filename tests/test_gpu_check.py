"""benchmarks/gpu_check.sh in its CPU dry run: the same steps the GPU machine runs, so the script that no
CPU session can run for real still works when a GPU is lent."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.slow
def test_the_gpu_check_runs_end_to_end_on_the_cpu(tmp_path):
    out = tmp_path / "gpu"
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(out), "--dry-run"], capture_output=True,
                       text=True, timeout=600, env={**os.environ, "PYTHON": sys.executable})
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads((out / "gpu-check.json").read_text())
    assert report["dry_run"] is True and report["failed"] == []
    steps = report["steps"]
    assert set(steps) == {"environment", "prepare", "train-tiny", "train-tiny-llama", "generate", "bench", "serve"}
    for preset in ("tiny", "tiny-llama"):
        run = steps[f"train-{preset}"]["result"]
        assert run["steps"] == 4 and run["tokens_per_s_steady"] > 0 and len(run["loss_curve"]) == 4
        assert (out / f"loss-{preset}.png").stat().st_size > 1000
    assert steps["generate"]["result"]["greedy_equal"] is True
    assert steps["serve"]["result"]["status"] == 200 and steps["serve"]["result"]["completion_tokens"] == 32
    assert steps["bench"]["result"]
    assert not (out / "work").exists()  # only the figures and curves are left to bring back
