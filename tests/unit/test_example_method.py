"""The worked example of docs/extending.md: a method added as one file, one config and this test."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from gainlora.methods.example_l2 import L2IncLoRA
from gainlora.model.lora import BranchContext, GatedLoRALinear

ROOT = Path(__file__).resolve().parents[2]


def test_regularizer_is_the_new_branch_weight_change_squared() -> None:
    g = torch.Generator().manual_seed(0)
    layers = {}
    for name, (d_in, d_out) in {"a": (5, 4), "b": (3, 6)}.items():
        layer = GatedLoRALinear(nn.Linear(d_in, d_out), rank=2, alpha=8.0, context=BranchContext(), stream="encoder")
        layer.add_branch(torch.randn(2, d_in, generator=g), torch.randn(d_out, 2, generator=g))  # frozen: ignored
        layer.add_branch(torch.randn(2, d_in, generator=g), torch.randn(d_out, 2, generator=g))
        layers[name] = layer
    model = SimpleNamespace(adapted=layers)
    explicit = sum((l.scale * l.lora_B @ l.lora_A).pow(2).sum() for l in layers.values())
    torch.testing.assert_close(L2IncLoRA(lam=0.3).regularizer(model), 0.3 * explicit)
    assert L2IncLoRA(lam=0.0).regularizer(model) is None


@pytest.mark.slow
def test_trains_two_tiny_tasks_through_the_entry_point(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "gainlora.run", "experiment=demo", "method=example_l2", "backbone=tiny_t5_test",
           "benchmark.num_tasks=2", "benchmark.n_train=16", "benchmark.n_val=0", "benchmark.n_test=4",
           "data.batch_size=8", "trainer.max_steps=2", "trainer.log_every_n_steps=1",
           "trainer.enable_progress_bar=false", f"paths.runs_dir={tmp_path}", "run_id=example"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run_dir = Path(done.stdout.strip().splitlines()[-1]).parent
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "finished" and results["method"] == "example_l2"
    assert len(results["matrix"]) == 2 and len(results["matrix"][1]) == 2
    # The loss term reached training: after a task's first step its B is non-zero, so the pull is > 0.
    with (run_dir / "metrics.csv").open() as f:
        regs = [float(row["train/reg"]) for row in csv.DictReader(f) if row.get("train/reg")]
    assert regs and max(regs) > 0
