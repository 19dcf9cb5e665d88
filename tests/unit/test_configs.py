"""Every experiment composes, builds its method, optimizer and strategy, carries the paper's
hyperparameters (from its recipe in conf/recipe/), and turns into a CPU smoke run with the single
override ``debug=cpu_tiny``."""
from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from gainlora.data.types import DataError
from gainlora.build import build_method
from gainlora.run import CONF_DIR
from gainlora.schema import validate_config

ROOT = Path(__file__).resolve().parents[2]
EXPERIMENTS = sorted(p.stem for p in (ROOT / "experiments").glob("*.yaml"))
METHODS = sorted(p.stem for p in (CONF_DIR / "method").glob("*.yaml"))
RECIPES = sorted(p.stem for p in (CONF_DIR / "recipe").glob("*.yaml"))
DATA = Path(os.environ.get("GAINLORA_DATA", ROOT / "data" / "CL_Benchmark"))

# name: (backbone, benchmark, order, lr, epochs, rank, source length, precision, strategy class)
DS = "lightning.pytorch.strategies.DeepSpeedStrategy"
PAPER = {
    "t5_large_order1": ("google-t5/t5-large", "superni", 1, 3e-4, 100, 4, 512, "32-true", None),
    "t5_large_order2": ("google-t5/t5-large", "superni", 2, 3e-4, 100, 4, 512, "32-true", None),
    "t5_large_order3": ("google-t5/t5-large", "long", 3, 3e-4, 10, 8, 512, "32-true", None),
    "t5_large_order4": ("google-t5/t5-large", "long", 4, 3e-4, 10, 8, 512, "32-true", None),
    "t5_xl_order1": ("google-t5/t5-3b", "superni", 1, 3e-4, 100, 4, 512, "32-true", None),
    "t5_xl_order2": ("google-t5/t5-3b", "superni", 2, 3e-4, 100, 4, 512, "32-true", None),
    "llama2_7b_order1": ("meta-llama/Llama-2-7b-hf", "superni", 1, 5e-5, 50, 4, 1024, "bf16-mixed", DS),
    "llama2_7b_order2": ("meta-llama/Llama-2-7b-hf", "superni", 2, 5e-5, 50, 4, 1024, "bf16-mixed", DS),
    "llama2_13b_order1": ("meta-llama/Llama-2-13b-hf", "superni", 1, 5e-5, 50, 4, 1024, "bf16-mixed", DS),
    "llama2_13b_order2": ("meta-llama/Llama-2-13b-hf", "superni", 2, 5e-5, 50, 4, 1024, "bf16-mixed", DS),
    "llama3_8b_order1": ("meta-llama/Meta-Llama-3-8B", "superni", 1, 5e-5, 50, 4, 1024, "bf16-mixed", DS),
    "llama3_8b_order2": ("meta-llama/Meta-Llama-3-8B", "superni", 2, 5e-5, 50, 4, 1024, "bf16-mixed", DS),
}


@functools.lru_cache(maxsize=None)  # composing takes ~0.3 s; the tests only read the result
def compose_cfg(*overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_every_paper_experiment_exists() -> None:
    assert set(PAPER) <= set(EXPERIMENTS), sorted(set(PAPER) - set(EXPERIMENTS))


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_and_builds(name: str) -> None:
    cfg = compose_cfg(f"experiment={name}")
    assert cfg.exp_name == name  # the experiment's values win over conf/config.yaml's
    method = build_method(cfg)
    assert method.name
    optimizer = instantiate(cfg.optimizer)(torch.nn.Linear(2, 2).parameters())
    assert optimizer.param_groups[0]["lr"] == pytest.approx(cfg.optimizer.lr)
    if "_target_" in cfg.strategy:
        assert get_class(cfg.strategy._target_)  # the class resolves even where it cannot run


def read_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text()) or {}


def leaves(tree: dict, prefix: str = "") -> dict:
    """{"data.batch_size": 16, ...}: the dotted keys of a YAML file's values (``defaults`` left out)."""
    out = {}
    for key, value in tree.items():
        if key == "defaults" and not prefix:
            continue
        if isinstance(value, dict):
            out.update(leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def recipe_of(name: str) -> str | None:
    defaults = read_yaml(ROOT / "experiments" / f"{name}.yaml").get("defaults", [])
    found = [d["/recipe"] for d in defaults if isinstance(d, dict) and "/recipe" in d]
    assert len(found) <= 1, found
    return found[0] if found else None


def test_every_paper_experiment_has_a_recipe() -> None:
    assert set(RECIPES) == {"t5_superni", "t5_long", "llama_superni"}
    used = {name: recipe_of(name) for name in PAPER}
    assert set(used.values()) == set(RECIPES), used
    for name, recipe in used.items():  # named <backbone family>_<benchmark>
        family = "llama" if name.startswith("llama") else "t5"
        assert recipe == f"{family}_{PAPER[name][1]}", (name, recipe)


@pytest.mark.parametrize("name", sorted(PAPER))
def test_recipe_values_reach_the_resolved_config(name: str) -> None:
    """Every value the recipe sets is in the experiment's resolved config, unless the experiment
    itself sets that key (then the experiment's value wins)."""
    recipe = leaves(read_yaml(CONF_DIR / "recipe" / f"{recipe_of(name)}.yaml"))
    own = leaves(read_yaml(ROOT / "experiments" / f"{name}.yaml"))
    cfg = compose_cfg(f"experiment={name}")
    assert recipe
    for key, value in {**recipe, **own}.items():
        assert OmegaConf.select(cfg, key) == value, (key, value)
    assert set(own) - {"exp_name", "benchmark.order"} <= {"data.batch_size", "data.eval_batch_size"}, \
        "an experiment overrides only its backbone, order, name and per-device batch sizes"


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_hyperparameters(name: str) -> None:
    backbone, benchmark, order, lr, epochs, rank, source, precision, strategy = PAPER[name]
    cfg = compose_cfg(f"experiment={name}")
    assert cfg.backbone.name_or_path == backbone and cfg.backbone.tiny is None
    assert (cfg.benchmark.name, cfg.benchmark.order) == (benchmark, order)
    assert cfg.method._target_ == "gainlora.methods.GainLoRA"
    assert cfg.method.branches._target_ == "gainlora.methods.InfLoRA"
    assert cfg.optimizer._target_ == "torch.optim.AdamW" and cfg.optimizer.lr == pytest.approx(lr)
    assert cfg.optimizer.weight_decay == 0.0
    assert (cfg.trainer.max_epochs, cfg.trainer.max_steps) == (epochs, -1)
    assert (cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout) == (rank, 32, 0.0)
    assert cfg.method.hidden == 100
    assert (cfg.backbone.max_source_length, cfg.backbone.max_target_length, cfg.backbone.max_new_tokens) == \
        (source, 50, 50)
    assert cfg.trainer.precision == precision
    assert cfg.trainer.gradient_clip_val == 1.0  # the reference Trainer's default max_grad_norm
    assert cfg.data.global_batch_size == 32 and 32 % cfg.data.batch_size == 0
    assert cfg.strategy.get("_target_") == strategy
    if strategy:
        assert cfg.strategy.stage == 2 and cfg.backbone.dtype == "bfloat16"


def test_orders_match_the_documented_lists() -> None:
    """conf/benchmark/{superni,long}.yaml hold exactly the orders of docs/benchmark_orders.md."""
    text = (ROOT / "docs" / "benchmark_orders.md").read_text()
    documented = dict(re.findall(r"^(\w+) -> ([\w,]+)$", text, flags=re.MULTILINE))
    expected = {("superni", 1): "superni_order1", ("superni", 2): "superni_order2", ("long", 3): "long_order3",
                ("long", 4): "long_order4", **{("long", f"lit{k}"): f"order{k}" for k in range(1, 7)}}
    for (benchmark, order), doc_name in expected.items():
        orders = compose_cfg(f"benchmark={benchmark}").benchmark.orders
        assert list(orders[order]) == documented[doc_name].split(","), (benchmark, order)
    assert sum(len(compose_cfg(f"benchmark={b}").benchmark.orders) for b in ("superni", "long")) == len(expected)


def test_deepspeed_strategies_instantiate() -> None:
    """The three DeepSpeed configs build Lightning strategies with the stage/offload they name."""
    pytest.importorskip("deepspeed")
    expected = {"deepspeed_stage_2": (2, False), "deepspeed_stage_2_offload": (2, True),
                "deepspeed_stage_3": (3, False)}
    for choice, (stage, offload) in expected.items():
        cfg = compose_cfg("experiment=llama2_7b_order1", f"strategy={choice}")
        strategy = instantiate(cfg.strategy)
        zero = strategy.config["zero_optimization"]
        assert zero["stage"] == stage and ("offload_optimizer" in zero) == offload
        assert strategy.config["train_micro_batch_size_per_gpu"] == cfg.data.batch_size


@functools.lru_cache(maxsize=None)
def method_node(method: str) -> DictConfig:
    """conf/method/<method>.yaml as Hydra composes it (interpolations left for the run's config)."""
    return OmegaConf.create(OmegaConf.to_container(compose_cfg(f"method={method}").method, resolve=False))


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_any_method_by_override(name: str) -> None:
    """`make run EXP=<name> ARGS="method=<m>"` for every method: the config validates (keys, types,
    cross-key rules; not this machine's accelerator) and the method builds, with the experiment's
    settings intact. Composing each pair costs 0.3 s, so the method's node is swapped in, which is
    what Hydra does because no experiment sets a method key (checked first)."""
    cfg = compose_cfg(f"experiment={name}")
    own = OmegaConf.to_container(cfg.method, resolve=False)
    assert own == OmegaConf.to_container(method_node("gainlora_inflora"), resolve=False)  # every experiment's own
    for method in METHODS:
        probe = cfg.copy()
        probe.method = method_node(method)
        validate_config(probe, machine=False)
        assert build_method(probe).name, method
        if name in PAPER:
            assert probe.lora.rank == PAPER[name][5]  # the experiment's settings survive the override


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_cpu_tiny_debug(name: str) -> None:
    full = compose_cfg(f"experiment={name}")
    cfg = compose_cfg(f"experiment={name}", "debug=cpu_tiny")
    family = full.backbone.get("family", "t5")
    assert cfg.backbone.tiny == f"{family}-test" and cfg.backbone.name_or_path is None
    assert cfg.backbone.dtype == "float32" and cfg.trainer.precision == "32-true"
    assert (cfg.trainer.accelerator, cfg.trainer.devices) == ("cpu", 1)
    assert "_target_" not in cfg.strategy  # DeepSpeed refuses a CPU
    assert (cfg.trainer.max_steps, cfg.trainer.max_epochs) == (2, -1)
    assert cfg.benchmark.num_tasks == 2
    if "max_train_per_task" in cfg.benchmark:
        assert (cfg.benchmark.max_train_per_task, cfg.benchmark.max_eval_per_task) == (16, 8)
    assert cfg.data.global_batch_size is None
    # Same experiment otherwise: benchmark, order, method and name.
    assert (cfg.exp_name, cfg.benchmark.name, cfg.benchmark.get("order")) == \
        (full.exp_name, full.benchmark.name, full.benchmark.get("order"))
    assert cfg.method == full.method
    build_method(cfg)


def test_llama_experiments_debug_with_a_tiny_llama() -> None:
    assert compose_cfg("experiment=llama2_13b_order2", "debug=cpu_tiny").backbone.tiny == "llama-test"
    assert compose_cfg("experiment=t5_xl_order1", "debug=cpu_tiny").backbone.tiny == "t5-test"


@pytest.mark.skipif(not (DATA / "Long_Sequence").is_dir(), reason="no CL_Benchmark data")
@pytest.mark.skipif((DATA / "Long_Sequence" / "yahoo" / "train.json").is_file(),
                    reason="the Long Sequence data is complete (nothing to refuse)")
@pytest.mark.parametrize("name", ["t5_large_order3", "t5_large_order4"])
def test_long_orders_refuse_missing_files_before_training(name: str) -> None:
    """A copy without the large Long Sequence files (docs/benchmark_data.md, "What is missing, and
    why"): the run must stop at validation, naming one."""
    from gainlora.data.tasks import load_stream

    cfg = compose_cfg(f"experiment={name}", f"paths.data_dir={DATA}")
    with pytest.raises(DataError, match=r"Long_Sequence/\w+/\w+\.json is missing"):
        load_stream(cfg.benchmark, seed=0)


def data_with_stand_ins(root: Path) -> Path:
    """The benchmark at DATA, linked, with a stand-in for each split it lacks (a dataset's dev/test
    made of its first training instances), so that every order can start."""
    for group in ("SuperNI", "Long_Sequence"):
        for dataset in sorted((DATA / group).iterdir()):
            target = root / group / dataset.name
            target.mkdir(parents=True)
            for f in dataset.iterdir():
                (target / f.name).symlink_to(f)
            for split in ("dev", "test"):
                if not (target / f"{split}.json").exists() and (dataset / "train.json").exists():
                    instances = json.loads((dataset / "train.json").read_text())
                    if isinstance(instances, dict):
                        instances = {**instances, "Instances": instances["Instances"][:8]}
                    (target / f"{split}.json").write_text(json.dumps(instances))
    return root


@pytest.fixture(scope="module")
def cpu_tiny_runs(tmp_path_factory) -> Path:
    """Every named experiment with ``debug=cpu_tiny``, in one Hydra multirun (one interpreter)."""
    tmp = tmp_path_factory.mktemp("cpu_tiny")
    data = data_with_stand_ins(tmp / "data")
    cmd = [sys.executable, "-m", "gainlora.run", "-m", f"experiment={','.join(EXPERIMENTS)}", "debug=cpu_tiny",
           f"paths.data_dir={data}", f"paths.runs_dir={tmp / 'runs'}", f"hydra.sweep.dir={tmp / 'multirun'}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return tmp / "runs"


@pytest.mark.slow
@pytest.mark.data
@pytest.mark.skipif(not (DATA / "SuperNI").is_dir(), reason="no CL_Benchmark data")
@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_runs_end_to_end_on_cpu(cpu_tiny_runs: Path, name: str) -> None:
    found = sorted((cpu_tiny_runs / compose_cfg(f"experiment={name}").exp_name).glob("*/results.json"))
    assert len(found) == 1, found
    results = json.loads(found[0].read_text())
    full = compose_cfg(f"experiment={name}")
    assert results["status"] == "finished" and results["benchmark"] == full.benchmark.name
    if full.benchmark.get("orders") is not None:
        assert results["tasks"] == list(full.benchmark.orders[full.benchmark.order][:2])
    matrix = results["matrix"]
    assert len(matrix) == 2 and all(len(row) == 2 for row in matrix)
    assert matrix[0][1] is None and all(v is not None for v in matrix[1])