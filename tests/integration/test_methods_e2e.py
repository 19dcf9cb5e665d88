"""Every baseline added beside GainLoRA through the entry point, in process (Hydra compose +
``gainlora.run.run``), on a tiny T5 and a tiny LLaMA with ``debug=cpu_tiny``; and a resume of the
methods that carry state between tasks (EWC's Fisher, the replay buffer, the prompts of L2P and
LFPT5) giving the uninterrupted run's results and tensors."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file

from gainlora.run import CONF_DIR, run

METHODS = ("ewc", "clora", "migu", "tasl", "gainlora_inclora", "gainlora_clora", "seqlora_replay", "inclora_replay",
           "l2p", "lfpt5")
# cheap settings for the prompt methods (LFPT5 samples pseudo-samples before task 2)
EXTRA = {"lfpt5": ("method.prompt_length=10", "method.pseudo_per_task=3", "method.generation_tokens=8")}
SMALL = ["experiment=demo", "debug=cpu_tiny", "benchmark.n_train=16", "benchmark.n_val=4", "benchmark.n_test=4"]

pytestmark = pytest.mark.slow


def run_method(method: str, backbone: str, runs: Path, *extra: str) -> dict:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[*SMALL, f"backbone={backbone}", f"method={method}",
                                           f"paths.runs_dir={runs}", f"run_id={method}", *EXTRA.get(method, ()),
                                           *extra])
    return run(cfg)


def task_files(runs: Path, method: str) -> list[dict[str, dict[str, torch.Tensor]]]:
    tasks = sorted(p for p in (runs / "demo" / method / "tasks").iterdir() if (p / "DONE").is_file())
    return [{kind: load_file(str(t / f"{kind}.safetensors")) if (t / f"{kind}.safetensors").is_file() else {}
             for kind in ("branch", "gate", "memory")} for t in tasks]  # gate-free runs write no gate file


@pytest.mark.parametrize("backbone", ["tiny_t5_test", "tiny_llama"])
@pytest.mark.parametrize("method", METHODS)
def test_method_runs_end_to_end(method: str, backbone: str, tmp_path: Path) -> None:
    results = run_method(method, backbone, tmp_path)
    assert results["status"] == "finished" and results["method"] == method
    assert len(results["matrix"]) == 2 and all(v is not None for v in results["matrix"][1])
    files = task_files(tmp_path, method)
    assert len(files) == 2
    memory = files[1]["memory"]
    if method == "ewc":
        assert any(k.startswith("ewc.fisher.") for k in memory) and any(k.startswith("ewc.anchor.") for k in memory)
    if method == "tasl":
        assert any(k.startswith("tasl.importance.") for k in memory)
    if method.endswith("_replay"):
        assert set(k for k in memory if k.startswith("replay.")) == {"replay.task.0", "replay.task.1"}
        assert memory["replay.task.0"].dtype == torch.int64
    if method in ("l2p", "lfpt5"):  # prompt methods: no branch file, the prompts are the memory
        assert files[1]["branch"] == {} and files[0]["branch"] == {}
        assert set(memory) == ({"l2p.prompts", "l2p.keys"} if method == "l2p" else {"lfpt5.prompt"})
        assert not torch.equal(files[0]["memory"][next(iter(memory))], memory[next(iter(memory))])  # task 2 trained
    gated = method.startswith("gainlora_")
    assert bool(files[1]["gate"]) == gated and any(k.startswith("gate.") for k in memory) == gated


@pytest.mark.parametrize("method", ["ewc", "tasl", "seqlora_replay", "l2p", "lfpt5"])
def test_resume_after_the_first_task_is_exact(method: str, tmp_path: Path) -> None:
    """Task 2 re-trained on a run restored from task 1's files (Fisher / buffer from memory.safetensors)
    equals the uninterrupted run: the same scores, the same task-2 tensors."""
    whole = run_method(method, "tiny_t5_test", tmp_path)
    uninterrupted = task_files(tmp_path, method)
    task_dirs = sorted((tmp_path / "demo" / method / "tasks").iterdir())
    shutil.rmtree(task_dirs[1])  # as if the run had stopped after task 1
    resumed = run_method(method, "tiny_t5_test", tmp_path, "resume=true")
    assert resumed["matrix"] == whole["matrix"]
    again = task_files(tmp_path, method)
    for kind in ("branch", "memory"):
        assert again[1][kind].keys() == uninterrupted[1][kind].keys()
        for key, value in uninterrupted[1][kind].items():
            assert torch.equal(again[1][kind][key], value), (kind, key)
    saved = json.loads((tmp_path / "demo" / method / "results.json").read_text())
    assert saved["status"] == "finished"
