"""Every baseline added beside GainLoRA through the entry point, in process (Hydra compose +
``gainlora.run.run``), on a tiny T5 and a tiny LLaMA with ``debug=cpu_tiny``; and a resume of the
methods that carry state between tasks (EWC's Fisher, the replay buffer, SAPT's memories, EPI's statistics,
KIF-LoRA's importances, the prompts of L2P and LFPT5) giving the uninterrupted run's results and tensors."""
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
           "sapt_lora", "epi", "kiflora", "l2p", "lfpt5")
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
    if method.endswith("_replay") or method == "sapt_lora":
        assert set(k for k in memory if k.startswith("replay.")) == {"replay.task.0", "replay.task.1"}
        assert memory["replay.task.0"].dtype == torch.int64
    if method == "sapt_lora":
        assert memory["sapt.target.0"].tolist() == [1.0] and memory["sapt.target.1"].shape == (2,)
        assert any(k.startswith("sapt.query.") for k in memory) and set(files[1]["gate"]) == {"key"}
    if method in ("l2p", "lfpt5"):  # prompt methods: no branch file, the prompts are the memory
        assert files[1]["branch"] == {} and files[0]["branch"] == {}
        assert set(memory) == ({"l2p.prompts", "l2p.keys"} if method == "l2p" else {"lfpt5.prompt"})
        assert not torch.equal(files[0]["memory"][next(iter(memory))], memory[next(iter(memory))])  # task 2 trained
    if method == "epi":
        assert set(memory) == {"epi.means.0", "epi.means.1", "epi.cov_sum"}
    if method == "kiflora":
        assert any(k.startswith("kif.importance.") for k in memory)
    gated = method.startswith("gainlora_")
    assert bool(files[1]["gate"]) == (gated or method == "sapt_lora")
    assert any(k.startswith("gate.") for k in memory) == gated


# SAPT's shared query network only moves once there are two keys to attend over: stop after task 2 of 3
RESUME_TASKS = {"ewc": 2, "tasl": 2, "seqlora_replay": 2, "sapt_lora": 3, "epi": 2, "kiflora": 2, "l2p": 2,
                "lfpt5": 2}


@pytest.mark.parametrize("method", list(RESUME_TASKS))
def test_resume_before_the_last_task_is_exact(method: str, tmp_path: Path) -> None:
    """The last task re-trained on a run restored from the earlier tasks' files (Fisher, buffer, SAPT's
    targets and query network, EPI's statistics, prompts: all from memory.safetensors) equals the
    uninterrupted run: the same scores, the same last-task tensors."""
    tasks = f"benchmark.num_tasks={RESUME_TASKS[method]}"
    whole = run_method(method, "tiny_t5_test", tmp_path, tasks)
    uninterrupted = task_files(tmp_path, method)
    task_dirs = sorted((tmp_path / "demo" / method / "tasks").iterdir())
    shutil.rmtree(task_dirs[-1])  # as if the run had stopped before its last task
    resumed = run_method(method, "tiny_t5_test", tmp_path, tasks, "resume=true")
    assert resumed["matrix"] == whole["matrix"]
    again = task_files(tmp_path, method)
    for kind in ("branch", "gate", "memory"):
        assert again[-1][kind].keys() == uninterrupted[-1][kind].keys()
        for key, value in uninterrupted[-1][kind].items():
            assert torch.equal(again[-1][kind][key], value), (kind, key)
    saved = json.loads((tmp_path / "demo" / method / "results.json").read_text())
    assert saved["status"] == "finished"
