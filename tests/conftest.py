"""Shared fixtures: tiny local backbones (no hub), demo tasks and a quiet CPU Trainer."""
from __future__ import annotations

import os
import warnings
from collections import Counter
from collections.abc import Callable, Generator
from pathlib import Path

import lightning as L
import pytest
import torch

from gainlora.model.backbone import Backbone, load_backbone
from gainlora.model.tiny import build_tiny_backbone


def pytest_configure(config: pytest.Config) -> None:
    # Tiny models gain nothing from intra-op threads, and on a busy 2-core machine the thread pool
    # spins: a 64x64 matmul measured 23 ms with 2 threads under load, 60 us with one.
    torch.set_num_threads(1)
    # Tiny CPU fits: Lightning's advice about dataloader workers and log intervals is noise here.
    config.addinivalue_line("filterwarnings", "ignore:.*does not have many workers.*")
    config.addinivalue_line("filterwarnings", "ignore:.*log_every_n_steps.*")
    config.addinivalue_line("filterwarnings", "ignore:You defined a `validation_step` but have no `val_dataloader`")
    config.addinivalue_line("filterwarnings", "ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated")


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where tiny backbones are built: $GAINLORA_CACHE if set (reused across sessions), else a
    per-session temporary folder (a build takes seconds)."""
    env = os.environ.get("GAINLORA_CACHE")
    return Path(env) if env else tmp_path_factory.mktemp("tiny-backbones")


@pytest.fixture(scope="session")
def tiny_t5_path(tiny_cache: Path) -> Path:
    return build_tiny_backbone("t5-test", cache_dir=tiny_cache)


@pytest.fixture(scope="session")
def tiny_llama_path(tiny_cache: Path) -> Path:
    return build_tiny_backbone("llama-test", cache_dir=tiny_cache)


@pytest.fixture(scope="session")
def t5_backbone(tiny_t5_path: Path) -> Callable[[], Backbone]:
    """A factory: every call loads a fresh tiny T5 (ContinualLM rewrites the model in place)."""
    return lambda: load_backbone(str(tiny_t5_path))


@pytest.fixture(scope="session")
def llama_backbone(tiny_llama_path: Path) -> Callable[[], Backbone]:
    return lambda: load_backbone(str(tiny_llama_path))


def cpu_trainer(max_steps: int = 20, callbacks: list[L.Callback] | None = None) -> L.Trainer:
    """A silent single-process CPU Trainer for a few optimizer steps."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False,
                         enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                         num_sanity_val_steps=0, limit_val_batches=0, callbacks=callbacks or [])


@pytest.fixture(scope="session")
def make_trainer() -> Callable[..., L.Trainer]:
    """``make_trainer(max_steps=20, callbacks=[...])``: see ``cpu_trainer``."""
    return cpu_trainer


@pytest.hookimpl(wrapper=True, tryfirst=True)  # outermost: after pytest's own short summary (-ra)
def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> Generator[None]:
    """End the run with what did not run and why: one line per skip reason with its count (``-ra``
    lists every skipped test; this groups them so that a whole-suite run can be read at a glance)."""
    yield
    skipped = terminalreporter.stats.get("skipped", [])
    if not skipped:
        terminalreporter.write_sep("-", "no test skipped")
        return
    reasons: Counter[str] = Counter()
    for report in skipped:
        # A skip's longrepr is (path, line, "Skipped: <reason>"); keep only the reason.
        message = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        reasons[message.removeprefix("Skipped: ")] += 1
    terminalreporter.section(f"{len(skipped)} skipped, by reason", sep="-")
    for reason, count in reasons.most_common():
        terminalreporter.write_line(f"{count:5d}  {reason}")
