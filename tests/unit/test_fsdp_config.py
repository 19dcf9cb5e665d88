"""strategy=fsdp at config time: what is accepted and refused (one line, before anything runs), the
strategy it builds, in-task checkpoints off, and the planner's per-device figure. The runs
themselves: tests/integration/test_fsdp.py."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from lightning.pytorch.strategies import ModelParallelStrategy

from gainlora.build import in_task_checkpoints, make, plain
from gainlora.plan import Plan
from gainlora.run import CONF_DIR
from gainlora.schema import ConfigError, validate_config
from gainlora.targets import bind_strategy

ROOT = Path(__file__).resolve().parents[2]
TWO_CPUS = ["strategy=fsdp", "trainer.accelerator=cpu", "trainer.devices=2", "data.batch_size=16"]


def cfg_of(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=["experiment=demo", *overrides])


def test_fsdp_config_builds_a_data_parallel_model_parallel_strategy() -> None:
    cfg = cfg_of(*TWO_CPUS)
    validate_config(cfg)
    strategy = make(bind_strategy(plain(cfg.strategy)))
    assert isinstance(strategy, ModelParallelStrategy)
    assert (strategy._data_parallel_size, strategy._tensor_parallel_size) == (2, 1)


REFUSED = {
    "strategy.tensor_parallel_size=2": "strategy.tensor_parallel_size=2: 1 (FSDP here is data parallel only)",
    "strategy.data_parallel_size=1": "strategy.data_parallel_size=1: 2, every device",
    "trainer.devices=auto": "trainer.devices=auto: a number of devices under strategy=fsdp",
}


@pytest.mark.parametrize("override", list(REFUSED))
def test_bad_fsdp_settings_are_refused(override: str) -> None:
    with pytest.raises(ConfigError) as err:
        validate_config(cfg_of(*TWO_CPUS, override))
    assert str(err.value).startswith(REFUSED[override]) and "\n" not in str(err.value)


@pytest.mark.parametrize("override", ["strategy._target_=lightning.pytorch.strategies.FSDPStrategy",
                                      "~strategy._target_"])
def test_lightning_fsdp1_strategy_is_refused(override: str) -> None:
    """FSDPStrategy (by class or registry name) would wrap the module again for every task's Trainer."""
    extra = ["~strategy.data_parallel_size", "~strategy.tensor_parallel_size"]
    if override.startswith("~"):
        extra.append("+strategy.name=fsdp")
    with pytest.raises(ConfigError, match=r"^strategy=\S*(FSDPStrategy|fsdp): strategy=fsdp \(conf/strategy/fsdp.yaml"):
        validate_config(cfg_of(*TWO_CPUS, override, *extra))


def test_the_entry_point_refuses_with_one_line_and_exit_2(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run([sys.executable, "-m", "gainlora.run", *TWO_CPUS, "strategy.tensor_parallel_size=2",
                           f"paths.runs_dir={tmp_path}"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: " + REFUSED["strategy.tensor_parallel_size=2"]), lines
    assert not any(tmp_path.iterdir())  # nothing written


def test_in_task_checkpoints_are_off_under_fsdp() -> None:
    assert in_task_checkpoints(cfg_of(*TWO_CPUS, "checkpoint.every_n_epochs=1")) is None
    assert in_task_checkpoints(cfg_of("checkpoint.every_n_epochs=1")) is not None


def test_planner_shards_the_blocks_and_keeps_the_rest() -> None:
    p = Plan(parameters=0, weights=1000, block_weights=800, largest_block=100, branches=10, gates=5, memories=7,
             trainable=2, collection=0, activations=50, activations_ckpt=20)
    rest = 10 + 5 + 7 + 4 * 2 * 3 + 50  # branches, gates, memories, replicated AdamW state, activations
    assert p.per_device("fsdp", 4, False) == 200 + 800 // 4 + 100 + rest
    assert p.per_device("ddp", 4, False) == 1000 + rest
