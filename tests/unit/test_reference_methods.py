"""The reference runs of docs/method.md: single-task (S for FWT) and multi-task (joint training).

- single_task: every task starts from the plain backbone; its diagonal is S; FWT of another run
  from a finished single-task run equals mean_j (R[j][j] - S[j]); bad references are refused.
- multi_task: one fit whose loader holds every task's examples, max_steps x T steps, one row of
  scores in results.json with FT/BWT/FWT null, plots and W&B payload without crashing, resume.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir

from gainlora.artifacts import RunDir
from gainlora.data.collate import Collator
from gainlora.data.datamodule import TaskStreamDataModule
from gainlora.data.demo import make_demo_task
from gainlora.loop import ContinualLoop
from gainlora.methods import IncLoRA, Method, MultiTask, SingleTask
from gainlora.metrics import cl_metrics
from gainlora.model.module import ContinualLM
from gainlora.report import ReportError, compare_runs, load_results, single_task_scores
from gainlora.run_kinds import RUN_KINDS
from gainlora.build import build_method, single_task_reference, trainer_factory
from gainlora.run import CONF_DIR
from gainlora.schema import ConfigError

TASKS = ("demo_colour", "demo_parity")
N_TRAIN, BATCH, STEPS = 8, 8, 3


def make_module(backbone) -> ContinualLM:
    torch.manual_seed(0)
    return ContinualLM(backbone, rank=4, alpha=32, optimizer=functools.partial(torch.optim.AdamW, lr=1e-2),
                       task_names=list(TASKS))


def make_datamodule(backbone, n_test: int = 0) -> TaskStreamDataModule:
    tasks = [make_demo_task(name, n_train=N_TRAIN, n_val=0, n_test=n_test) for name in TASKS]
    return TaskStreamDataModule(tasks, Collator(backbone.tokenizer, backbone.kind, 128, 8), batch_size=BATCH,
                                eval_batch_size=8)


def logits(module: ContinualLM, dm: TaskStreamDataModule, task: int) -> torch.Tensor:
    current = dm.task
    dm.set_task(task)
    module.eval()
    try:
        with torch.no_grad():
            return torch.cat([module.backbone(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                                              labels=b["labels"]).logits for b in dm.feature_batches()])
    finally:
        dm.set_task(current)


def compose_cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides))


# -- configs ----------------------------------------------------------------------------------------
def test_reference_methods_are_selectable() -> None:
    single = build_method(compose_cfg("method=single_task"))
    multi = build_method(compose_cfg("method=multi_task"))
    assert isinstance(single, SingleTask) and (single.name, single.run_kind) == ("single_task", "single_task")
    assert isinstance(multi, MultiTask) and (multi.name, multi.run_kind) == ("multi_task", "multi_task")
    assert multi.joint_training and not single.joint_training and not Method.joint_training
    assert single.gate_spec is None and multi.gate_spec is None  # gate-free, like every baseline


def test_joint_fit_gets_max_steps_per_task(tmp_path: Path) -> None:
    """trainer.max_steps is a per-task budget: a joint fit over k tasks runs k times it."""
    make = trainer_factory(compose_cfg("trainer.max_steps=3", "trainer.accelerator=cpu"), RunDir(tmp_path), [])
    assert make(0, []).max_steps == 3
    assert make(3, [], 4).max_steps == 12
    epochs = trainer_factory(compose_cfg("trainer.max_steps=-1", "trainer.accelerator=cpu"), RunDir(tmp_path), [])
    assert epochs(3, [], 4).max_steps == -1  # an epoch budget is epochs over the union


# -- single task --------------------------------------------------------------------------------------
def lifecycle(module: ContinualLM, dm: TaskStreamDataModule, method: Method, run_dir: Path) -> ContinualLoop:
    """The loop around an existing module, to drive its begin_task / end_task by hand."""
    method.setup(module, len(TASKS))
    return ContinualLoop(module=module, datamodule=dm, method=method, run_dir=RunDir(run_dir),
                         make_trainer=None, info={}, progress_bar=False)


def test_single_task_starts_every_task_from_the_plain_backbone(t5_backbone, make_trainer, tmp_path) -> None:
    backbone = t5_backbone()
    module, dm = make_module(backbone), make_datamodule(backbone)
    plain = logits(module, dm, 1)  # no branch at all yet: the plain backbone
    method = SingleTask()
    loop = lifecycle(module, dm, method, tmp_path)

    loop.begin_task(0)
    make_trainer(STEPS).fit(module, train_dataloaders=dm.train_dataloader())
    trained = logits(module, dm, 1)
    assert (trained - plain).abs().max() > 1e-3, "task 1's branch should change the outputs"
    first_A = {name: layer.lora_A.detach().clone() for name, layer in module.adapted.items()}

    loop.begin_task(1)
    torch.testing.assert_close(logits(module, dm, 1), plain, rtol=0, atol=1e-6)  # no earlier branch active
    assert module.num_branches == 1 and method.branch_for_task(1) == 0
    for name, layer in module.adapted.items():
        assert layer.num_frozen == 0  # task 1's branch is gone, not frozen and summed
        assert torch.count_nonzero(layer.lora_B) == 0
        assert not torch.equal(layer.lora_A, first_A[name])  # a fresh kaiming draw
    trainable = {id(p) for p in module.trainable_parameters()}
    assert trainable == {id(p) for layer in module.adapted.values() for p in (layer.lora_A, layer.lora_B)}


def test_inclora_keeps_the_earlier_branch_active(t5_backbone, make_trainer, tmp_path) -> None:
    """The contrast that makes the test above meaningful: IncLoRA's task 2 does not start plain."""
    backbone = t5_backbone()
    module, dm = make_module(backbone), make_datamodule(backbone)
    plain = logits(module, dm, 1)
    loop = lifecycle(module, dm, IncLoRA(), tmp_path)
    loop.begin_task(0)
    make_trainer(STEPS).fit(module, train_dataloaders=dm.train_dataloader())
    loop.begin_task(1)
    assert (logits(module, dm, 1) - plain).abs().max() > 1e-3


def test_single_task_metrics_use_the_diagonal_only() -> None:
    matrix = [[80.0, None, None], [5.0, 60.0, None], [0.0, 1.0, 90.0]]
    m = RUN_KINDS["single_task"].metrics(matrix)
    assert m["AP"] == pytest.approx((80 + 60 + 90) / 3) == m["FWT_diag"]
    assert m["FT"] is m["BWT"] is m["BWT_ref"] is m["FWT"] is None
    assert RUN_KINDS["single_task"].metrics(matrix[:2])["AP"] == pytest.approx(70.0)  # a partial run, so far


# -- FWT from a single-task reference -----------------------------------------------------------------
REF_TASKS = ["a", "b", "c"]
REF_MATRIX = [[70.0, None, None], [3.0, 50.0, None], [4.0, 5.0, 90.0]]  # S = 70, 50, 90


def write_reference(run_dir: Path, **overrides) -> Path:
    results = {"experiment": "x", "method": "single_task", "benchmark": "demo", "order": 1,
               "tasks": REF_TASKS, "run_kind": "single_task", "matrix": REF_MATRIX, "status": "finished",
               **overrides}
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "results.json").write_text(json.dumps(results))
    return run_dir


def test_fwt_from_a_single_task_reference(tmp_path: Path) -> None:
    ref = write_reference(tmp_path / "st")
    S = single_task_scores(ref, REF_TASKS)
    assert S == [70.0, 50.0, 90.0]
    assert single_task_scores(ref / "results.json", REF_TASKS) == S  # the file itself also works
    R = [[75.0, None, None], [60.0, 40.0, None], [55.0, 35.0, 99.0]]
    expected = ((75 - 70) + (40 - 50) + (99 - 90)) / 3
    assert cl_metrics(R, S)["FWT"] == pytest.approx(expected)
    assert RUN_KINDS["continual"].metrics(R, S)["FWT"] == pytest.approx(expected)
    assert RUN_KINDS["continual"].metrics(R[:2], S)["FWT"] == pytest.approx(((75 - 70) + (40 - 50)) / 2)
    cfg = compose_cfg(f"metrics.single_task_run={ref}", "method=inclora")
    assert single_task_reference(cfg, REF_TASKS) == S
    assert single_task_reference(compose_cfg("method=inclora"), REF_TASKS) is None  # the default: no FWT


@pytest.mark.parametrize("case, fragment", [
    ("missing", "results.json: not found"),
    ("running", "status is 'running', not 'finished'"),
    ("other tasks", "its tasks ['a', 'b', 'c'] differ from this run's ['a', 'c', 'b']"),
    ("not single-task", "not a single-task reference run (method 'inclora'"),
    ("reference method", "FWT applies to continual methods, not to the multi_task reference run"),
])
def test_bad_single_task_reference_is_refused(case: str, fragment: str, tmp_path: Path) -> None:
    ref, tasks, method = tmp_path / "st", REF_TASKS, "inclora"
    if case == "running":
        write_reference(ref, status="running")
    elif case == "other tasks":
        write_reference(ref)
        tasks = ["a", "c", "b"]
    elif case == "not single-task":
        write_reference(ref, method="inclora", run_kind="continual")
    elif case == "reference method":
        write_reference(ref)
        method = "multi_task"
    cfg = compose_cfg(f"metrics.single_task_run={ref}", f"method={method}")
    with pytest.raises(ConfigError) as err:
        single_task_reference(cfg, tasks)
    message = str(err.value)
    assert message.startswith(f"metrics.single_task_run={ref}: ") and fragment in message and "\n" not in message
    if case != "reference method":
        assert f"{ref / 'results.json'}: " in message  # names the file


def test_fwt_needs_the_reference_to_have_scored_the_same_test_examples(tmp_path: Path) -> None:
    """Same task names, other test examples (the demo at another seed): S[j] scores other inputs, so
    FWT is refused; it was computed silently."""
    from gainlora.build import check_reference_tests

    ref = write_reference(tmp_path / "st", tasks=["demo_colour"], matrix=[[70.0]])
    ours = make_demo_task("demo_colour", seed=0, n_train=8, n_val=2, n_test=4)
    folder = RunDir(ref).task_dir(0, "demo_colour")
    folder.mkdir(parents=True)
    (folder / "predictions.json").write_text(json.dumps([
        {"task": 0, "source": e.source, "prediction": "", "references": list(e.references)} for e in ours.test]))
    cfg = compose_cfg(f"metrics.single_task_run={ref}", "method=inclora")
    check_reference_tests(cfg, [ours])  # the same tests
    other = make_demo_task("demo_colour", seed=5, n_train=8, n_val=2, n_test=4)
    with pytest.raises(ConfigError, match=rf"^metrics.single_task_run={ref}: task demo_colour was tested on other "
                                          r"examples than this run's \(another seed or other data\)"):
        check_reference_tests(cfg, [other])
    (folder / "predictions.json").write_text("[")
    with pytest.raises(ConfigError, match=r"task 1's folder holds no readable test predictions"):
        check_reference_tests(cfg, [ours])


def test_report_fills_fwt_only_from_a_reference_with_the_same_tests(tmp_path: Path) -> None:
    """``make report --single-task``: a continual run tested on other examples than the reference gets
    no FWT from it (it was computed from scores on other inputs)."""
    def run(root: Path, task, **results) -> Path:
        write_reference(root, tasks=[task.name], matrix=[[60.0]], **results)
        folder = RunDir(root).task_dir(0, task.name)
        folder.mkdir(parents=True)
        (folder / "predictions.json").write_text(json.dumps([
            {"task": 0, "source": e.source, "prediction": "", "references": list(e.references)} for e in task.test]))
        return root

    seed0 = make_demo_task("demo_colour", seed=0, n_train=8, n_val=2, n_test=4)
    seed5 = make_demo_task("demo_colour", seed=5, n_train=8, n_val=2, n_test=4)
    ref = run(tmp_path / "st", seed0)
    continual = {"method": "inclora", "run_kind": "continual"}
    same, other = run(tmp_path / "a", seed0, **continual), run(tmp_path / "b", seed5, **continual)
    _, table = compare_runs([same, other], tmp_path / "report", single_task=[ref])
    rows = [line.split(" | ") for line in table.read_text().splitlines()[2:]]
    assert [row[-2] for row in rows] == ["0.00", "-"]  # FWT = 60 - 60 for the same tests; none for the others


# -- the loop: results.json for each kind ---------------------------------------------------------------
class Recorder(L.Callback):
    """Which training examples the fit's batches held, and how many optimizer steps it made."""

    def __init__(self, dm: TaskStreamDataModule) -> None:
        self.dm, self.seen, self.steps, self.active = dm, [], 0, False
        collate = dm.collator.train_batch

        def recording(examples):
            if self.active:
                self.seen.extend(examples)
            return collate(examples)

        dm.collator.train_batch = recording

    def on_train_start(self, trainer, pl_module) -> None:
        self.active = True

    def on_train_end(self, trainer, pl_module) -> None:
        self.active = False
        self.steps = trainer.global_step


def loop_for(method: Method, backbone, run_dir: Path, make_trainer, **kwargs) -> ContinualLoop:
    module, dm = make_module(backbone), make_datamodule(backbone, n_test=4)
    info = {"experiment": "unit", "method": method.name, "benchmark": "demo", "order": 1}
    return ContinualLoop(module=module, datamodule=dm, method=method, run_dir=RunDir(run_dir),
                         make_trainer=make_trainer, info=info, progress_bar=False, **kwargs)


def run_factory(tmp_path: Path, *extra: L.Callback):
    """run.py's own trainer factory (max_steps per task, scaled for a joint fit), quiet, on the CPU."""
    cfg = compose_cfg(f"trainer.max_steps={STEPS}", "trainer.max_epochs=-1", "trainer.accelerator=cpu",
                      "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1")
    make = trainer_factory(cfg, RunDir(tmp_path), [])
    return lambda t, callbacks, scale=1: make(t, [*callbacks, *extra], scale)


def test_multi_task_one_joint_fit_on_every_task(t5_backbone, tmp_path: Path) -> None:
    backbone = t5_backbone()
    recorder = None

    def factory(t, callbacks, scale=1):
        return run_factory(tmp_path, recorder)(t, callbacks, scale)

    loop = loop_for(MultiTask(), backbone, tmp_path / "run", factory)
    recorder = Recorder(loop.datamodule)
    results = loop.run()

    # One fit whose batches held every task's training examples, for max_steps x T steps.
    for task in loop.datamodule.tasks:
        assert any(e in task.train for e in recorder.seen), f"no example of {task.name} in the joint fit"
    assert set(recorder.seen) == {e for task in loop.datamodule.tasks for e in task.train}
    assert recorder.steps == STEPS * len(TASKS)

    # results.json: one row that scores every task; AP its mean; the rest does not apply.
    on_disk = json.loads((tmp_path / "run" / "results.json").read_text())
    assert on_disk == results and results["status"] == "finished" and results["run_kind"] == "multi_task"
    (row,) = results["matrix"]
    assert len(row) == len(TASKS) and all(isinstance(v, float) for v in row)
    assert results["AP"] == pytest.approx(sum(row) / len(row))
    assert all(results[k] is None for k in ("FT", "BWT", "BWT_ref", "FWT", "FWT_diag"))
    assert "multi-task reference run" in results["note"]
    assert (tmp_path / "run" / "plots" / "scores.png").stat().st_size > 1000
    assert not (tmp_path / "run" / "plots" / "forgetting.png").exists()
    assert (tmp_path / "run" / "tasks" / f"{len(TASKS):02d}-joint" / "DONE").is_file()
    assert load_results(tmp_path / "run")["AP"] == results["AP"]  # make report reads it

    # W&B: the payload of the joint fit (task index T - 1) builds from the single row.
    from gainlora.wandb_logging import task_end_payload

    payload = task_end_payload(len(TASKS) - 1, results)
    assert [payload[f"cl/score/{name}"] for name in TASKS] == row
    assert payload["cl/AP"] == results["AP"] and "cl/FT" not in payload and "cl/forgetting" not in payload

    # Resume: a finished joint fit is restored from disk, nothing is trained again.
    def no_training(*args):
        raise AssertionError("a finished joint fit must not be trained again")

    again = loop_for(MultiTask(), t5_backbone(), tmp_path / "run", no_training).run()
    assert again["matrix"] == results["matrix"] and again["status"] == "finished"


def test_single_task_loop_and_fwt_in_results(t5_backbone, tmp_path: Path) -> None:
    """The loop labels a single-task run, and a continual run given its diagonal reports FWT."""
    single = loop_for(SingleTask(), t5_backbone(), tmp_path / "st", run_factory(tmp_path)).run()
    assert single["run_kind"] == "single_task" and "Only the diagonal R[j][j] is meaningful" in single["note"]
    assert all(single[k] is None for k in ("FT", "BWT", "BWT_ref", "FWT"))
    diag = [single["matrix"][j][j] for j in range(len(TASKS))]
    assert single["AP"] == pytest.approx(sum(diag) / len(diag))
    assert not (tmp_path / "st" / "plots" / "forgetting.png").exists()

    S = single_task_scores(tmp_path / "st", list(TASKS))
    assert S == diag
    R = [[40.0, None], [30.0, 20.0]]  # a finished continual matrix; only the results are written
    loop = loop_for(IncLoRA(), t5_backbone(), tmp_path / "inc", run_factory(tmp_path), single_task=S)
    loop.forgetting.matrix = R
    loop.consistent = True  # as if the two tasks had been restored
    results = loop.finish("finished")
    assert results["run_kind"] == "continual" and "note" not in results
    assert results["FWT"] == pytest.approx(((40.0 - S[0]) + (20.0 - S[1])) / 2)
    assert json.loads((tmp_path / "inc" / "results.json").read_text())["FWT"] == results["FWT"]


def test_report_compares_reference_runs_and_fills_fwt(tmp_path: Path) -> None:
    common = {"experiment": "x", "benchmark": "demo", "order": 1, "tasks": REF_TASKS, "status": "finished"}
    runs = {
        "cont": {**common, "method": "inclora", "run_kind": "continual",
                 "matrix": [[75.0, None, None], [60.0, 40.0, None], [55.0, 35.0, 99.0]],
                 "AP": 63.0, "FT": 12.5, "BWT": -12.5, "FWT": None},
        "multi": {**common, "method": "multi_task", "run_kind": "multi_task", "matrix": [[90.0, 80.0, 70.0]],
                  "AP": 80.0, "FT": None, "BWT": None, "FWT": None},
    }
    for name, results in runs.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(results))
    ref = write_reference(tmp_path / "st")
    figure, table = compare_runs([tmp_path / "cont", tmp_path / "multi", ref], tmp_path / "out",
                                 single_task=[ref])
    assert figure.stat().st_size > 1000
    lines = {line.split(" | ")[0].strip("| "): line for line in table.read_text().splitlines()[2:]}
    fwt = ((75 - 70) + (40 - 50) + (99 - 90)) / 3
    here = tmp_path.name  # the folder column: <experiment folder>/<run folder>
    assert lines["inclora"].endswith(f"| {fwt:.2f} | {here}/cont |")
    assert lines["multi_task"] == f"| multi_task | demo | 1 | 80.00 | - | - | - | {here}/multi |"
    assert lines["single_task"] == f"| single_task | demo | 1 | 70.00 | - | - | - | {here}/st |"  # diagonal mean
    with pytest.raises(ReportError, match="bad matrix"):  # a multi-task row must score every task
        (tmp_path / "multi" / "results.json").write_text(json.dumps({**runs["multi"], "matrix": [[90.0, None, 70.0]]}))
        load_results(tmp_path / "multi")
