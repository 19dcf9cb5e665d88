"""W&B: the sweep specs (sweeps/*.yaml) and the run logging their objective comes from.

Sweeps: every command is the Hydra entry point on an existing experiment, every swept key and
candidate value composes with that experiment and builds its method, and the appendix studies' keys
(gate width and depth, LoRA rank) reach the tensors a run saves. Logging: the logger config,
offline mode without a key, stable ids, and what ``log_task_end`` writes into an offline run.
"""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.errors import MissingConfigException
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict
from safetensors import safe_open

from gainlora.report import plot_forgetting, plot_matrix
from gainlora.build import build_method
from gainlora.run import CONF_DIR
from gainlora.wandb_logging import (
    ID_FILE,
    log_task_end,
    method_label,
    sample_predictions,
    should_run_offline,
    stable_run_id,
)

ROOT = Path(__file__).resolve().parents[2]
SWEEPS = sorted((ROOT / "sweeps").glob("*.yaml"))
APPENDIX = {"gate_width": ("method.hidden", [50, 100, 200]), "lora_rank": ("lora.rank", [2, 4, 8]),
            "gate_depth": ("method.depth", [1, 3, 5]),
            "gate_output": ("method.output", ["abs_2sigmoid", "abs_cos", "sigmoid"])}
MACROS = {"${env}", "${interpreter}", "${args_no_hyphens}"}
MISSING = object()


def compose_cfg(*overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def load_sweep(path: Path) -> dict:
    return yaml.safe_load(path.read_text())  # not OmegaConf: ${env} etc. are W&B macros


def fixed_overrides(spec: dict) -> list[str]:
    """The command's own Hydra overrides (experiment=..., logger=wandb, ...)."""
    return [c for c in spec["command"][4:] if c not in MACROS]


def candidates(param: dict) -> list:
    if "values" in param:
        return list(param["values"])
    if "value" in param:
        return [param["value"]]
    return [param["min"], param["max"]]


def test_there_are_sweeps() -> None:
    assert {p.stem for p in SWEEPS} >= {"demo_lr", "t5_large_order1_thresholds"}


def test_sweeps_are_not_experiments() -> None:
    """Sweep specs are W&B files, not Hydra configs: they must not compose as ``experiment=...``."""
    assert not list((ROOT / "experiments").rglob("*/*.yaml"))
    with pytest.raises(MissingConfigException):
        compose_cfg("experiment=sweeps/demo_lr")


@pytest.mark.parametrize("scale", ["demo", "t5_large_order1"])
@pytest.mark.parametrize("study", sorted(APPENDIX))
def test_appendix_studies_have_sweeps(scale: str, study: str) -> None:
    """The paper's appendix studies on the demo and at paper scale: one grid over the study's values."""
    key, values = APPENDIX[study]
    spec = load_sweep(ROOT / "sweeps" / f"{scale}_{study}.yaml")
    assert spec["method"] == "grid" and f"experiment={scale}" in spec["command"]
    assert spec["parameters"][key]["values"] == values


@pytest.mark.slow
def test_appendix_keys_reach_the_saved_tensors(tmp_path: Path) -> None:
    """Gate width and depth and LoRA rank are read by the model: a run's saved gate and branch have
    those sizes; the output function is recorded in its config.yaml."""
    width, rank, depth = APPENDIX["gate_width"][1][0], APPENDIX["lora_rank"][1][0], APPENDIX["gate_depth"][1][1]
    output = APPENDIX["gate_output"][1][1]
    cmd = [sys.executable, "-m", "gainlora.run", "experiment=demo", "backbone=tiny_t5_test",
           f"method.hidden={width}", f"lora.rank={rank}", f"method.depth={depth}", f"method.output={output}", "benchmark.num_tasks=2", "benchmark.n_train=16",
           "benchmark.n_test=8", "trainer.max_steps=1", "trainer.enable_progress_bar=false", "run_id=appendix",
           f"paths.runs_dir={tmp_path}"]
    done = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    task = min((tmp_path / "demo" / "appendix" / "tasks").iterdir())
    with safe_open(str(task / "gate.safetensors"), "pt") as gate:
        layers = [f"G{i}" for i in range(1, depth + 2)]
        assert sorted(gate.keys()) == sorted([*layers, "key"])
        assert gate.get_slice("G1").get_shape()[0] == width and gate.get_slice(layers[-1]).get_shape()[1] == width
        assert all(gate.get_slice(n).get_shape() == [width, width] for n in layers[1:-1])
    assert yaml.safe_load((tmp_path / "demo" / "appendix" / "config.yaml").read_text())["method"]["output"] == output
    with safe_open(str(task / "branch.safetensors"), "pt") as branch:
        shapes = {name: branch.get_slice(name).get_shape() for name in branch.keys()}
    assert shapes and all(s[0] == rank for n, s in shapes.items() if n.endswith(".A"))
    assert all(s[1] == rank for n, s in shapes.items() if n.endswith(".B"))


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_sweep_spec_shape(path: Path) -> None:
    spec = load_sweep(path)
    assert spec["method"] in ("grid", "random", "bayes")
    assert spec["metric"] == {"name": "AP", "goal": "maximize"}  # log_task_end keeps summary AP
    command = spec["command"]
    assert command[:4] == ["${env}", "${interpreter}", "-m", "gainlora.run"]
    assert command[-1] == "${args_no_hyphens}"
    experiments = [c.split("=", 1)[1] for c in command if c.startswith("experiment=")]
    assert len(experiments) == 1 and (ROOT / "experiments" / f"{experiments[0]}.yaml").is_file()
    assert "logger=wandb" in command
    assert spec["parameters"]


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_swept_parameters_exist_and_compose(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_RUN_ID", "sweeprun01")  # what the agent sets for each run
    spec = load_sweep(path)
    base = compose_cfg(*fixed_overrides(spec))
    assert base.run_id == "sweeprun01"
    for key, param in spec["parameters"].items():
        assert OmegaConf.select(base, key, default=MISSING) is not MISSING, f"{path.name}: no key {key}"
        for value in candidates(param):
            cfg = compose_cfg(*fixed_overrides(spec), f"{key}={value}")  # exactly what the agent passes
            chosen = OmegaConf.select(cfg, key)
            method = build_method(cfg)
            if key == "method":  # a group choice replaces the whole node
                assert method.name == value
            else:
                if isinstance(chosen, ListConfig):
                    chosen = OmegaConf.to_container(chosen)
                assert chosen == yaml.safe_load(str(value)), (key, value)


# -- logging ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("env", "offline", "expected"), [
    ({}, None, True),
    ({"WANDB_API_KEY": "k" * 40}, None, False),
    ({"WANDB_MODE": "online"}, None, False),
    ({"WANDB_MODE": "offline", "WANDB_API_KEY": "k" * 40}, None, True),
    ({"WANDB_API_KEY": "k" * 40}, True, True),
])
def test_offline_without_a_key(env: dict, offline, expected: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert should_run_offline(offline) is expected


def test_run_id_is_stable_per_run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)
    a, b = tmp_path / "exp" / "run-a", tmp_path / "exp" / "run-b"
    first = stable_run_id(a)
    assert stable_run_id(a) == first != stable_run_id(b)
    assert (a / ID_FILE).read_text().strip() == first
    moved = tmp_path / "moved"
    a.rename(moved)
    assert stable_run_id(moved) == first  # the stored id travels with the directory
    monkeypatch.setenv("WANDB_RUN_ID", "agent42")
    assert stable_run_id(tmp_path / "fresh") == "agent42"  # a sweep agent's id wins for new runs
    assert stable_run_id(moved) == first


@pytest.mark.parametrize(("method", "label"), [
    ("gainlora_inflora", "gainlora_inflora"), ("gainlora_olora", "gainlora_olora"),
    ("gainlora_inflora_noinit", "gainlora_inflora_noinit"), ("olora", "olora"), ("seqlora", "seqlora"),
])
def test_method_label_matches_the_method(method: str, label: str) -> None:
    cfg = compose_cfg("experiment=demo", f"method={method}")
    assert method_label(OmegaConf.to_container(cfg.method)) == label == build_method(cfg).name


def test_sample_predictions_round_robin() -> None:
    preds = [{"task": t, "source": f"s{t}{i}", "prediction": "p", "references": ["r", "q"]}
             for t in (0, 1) for i in range(5)]
    rows = sample_predictions(preds, ["a", "b"], limit=3)
    assert [r[0] for r in rows] == ["a", "b", "a"] and rows[0][3] == "r | q"


def read_wandb_records(path: Path) -> list:
    """Records of an offline run's .wandb file (a LevelDB-style log of protobuf records)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, pos = path.read_bytes(), 32768, 7  # 7: the W&B file header
    records, pending = [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST chunk
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def test_log_task_end_writes_cl_metrics_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_key = "0123456789abcdef-should-never-be-written-0123"
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_API_KEY", fake_key)
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name in ("WANDB_RUN_ID", "WANDB_SWEEP_ID", "WANDB_PROJECT", "WANDB_ENTITY"):
        monkeypatch.delenv(name, raising=False)
    run_dir = tmp_path / "runs" / "demo" / "r1"
    tasks = ["alpha", "beta", "gamma"]
    matrix = [[60.0, None, None], [55.0, 80.0, None], [50.0, 75.0, 90.0]]
    aps = [60.0, 67.5, 215 / 3]
    plot_matrix([r[: i + 1] for i, r in enumerate(matrix)], tasks, run_dir / "plots" / "matrix.png")
    plot_forgetting([r[: i + 1] for i, r in enumerate(matrix)], tasks, run_dir / "plots" / "forgetting.png")
    (run_dir / "predictions.json").write_text(json.dumps(
        [{"task": t, "source": f"x{t}", "prediction": f"y{t}", "references": [f"y{t}"]} for t in range(3)]))

    cfg = compose_cfg("experiment=demo", "logger=wandb")
    with open_dict(cfg):
        cfg.paths.run_dir = str(run_dir)
    logger = instantiate(cfg.logger.wandb)
    assert instantiate(cfg.logger.csv) is not None  # logger=wandb keeps the CSV logger
    try:
        for t in range(3):
            rows = [r if i <= t else [None] * 3 for i, r in enumerate(matrix)]
            results = {"tasks": tasks, "matrix": rows, "AP": aps[t], "FT": 10.0 * t, "BWT": -10.0 * t}
            assert log_task_end([object(), logger], t, results)  # non-W&B loggers are skipped
        run_id = logger.experiment.id
    finally:
        logger.experiment.finish()

    assert run_id == (run_dir / ID_FILE).read_text().strip()
    (offline_run,) = (run_dir / "wandb").glob(f"offline-run-*-{run_id}")
    records = read_wandb_records(offline_run / f"run-{run_id}.wandb")
    metrics = {(m.metric.name or m.metric.glob_name): m.metric.step_metric
               for m in records if m.WhichOneof("record_type") == "metric"}
    assert metrics["cl/*"] == metrics["cl/AP"] == metrics["cl/score/alpha"] == "cl/task"
    history = [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    history = [h for h in history if "cl/task" in h]
    assert [h["cl/task"] for h in history] == [1, 2, 3]
    assert [h["cl/AP"] for h in history] == pytest.approx(aps)
    assert [h["cl/score/alpha"] for h in history] == [60.0, 55.0, 50.0]  # task 1's forgetting curve
    assert "cl/score/gamma" not in history[1] and history[2]["cl/score/gamma"] == 90.0

    media = offline_run / "files" / "media"
    final = json.loads(max((media / "table" / "cl").glob("matrix_2_*.table.json")).read_text())
    assert final["columns"] == ["after_task", *tasks]
    assert [row[1:] for row in final["data"]] == [[60.0, None, None], [55.0, 80.0, None], [50.0, 75.0, 90.0]]
    preds = json.loads(max((media / "table" / "cl").glob("predictions_2_*.table.json")).read_text())
    assert [row[:3] for row in preds["data"]] == [["alpha", "x0", "y0"], ["beta", "x1", "y1"], ["gamma", "x2", "y2"]]
    assert list((media / "table" / "cl").glob("forgetting_table_2_*.table.json"))
    assert len(list((media / "images" / "cl").glob("matrix_heatmap_*.png"))) == 3
    # The API key is never written: not in the run directory, not in W&B's files.
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert fake_key.encode() not in path.read_bytes(), path


def test_log_task_end_without_wandb_does_nothing() -> None:
    assert log_task_end([], 0, {"tasks": ["a"], "matrix": [[1.0]]}) is False
    assert log_task_end(None, 0, {"tasks": ["a"], "matrix": [[1.0]]}) is False


def test_log_task_end_only_on_rank_zero(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning.pytorch.loggers import WandbLogger
    from lightning.pytorch.utilities import rank_zero_only

    logger = WandbLogger(save_dir=str(tmp_path), offline=True)
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    assert log_task_end(logger, 0, {"tasks": ["a"], "matrix": [[1.0]], "AP": 1.0}) is False
    assert logger._experiment is None  # no W&B run was started on a worker rank
