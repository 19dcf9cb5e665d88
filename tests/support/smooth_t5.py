"""Test-only: the demo's random-init tiny T5 with GELU instead of ReLU in its feed-forward blocks,
for tests that compare a sharded run with the one-process run to float32 rounding.

A ReLU's gradient jumps where its input crosses zero. Two runs whose forwards differ by rounding
(another summation order: a second process, or one process summing its batch in two halves) now
and then meet a unit whose input lies within that rounding of zero, and take its gradient as 0 in
one run and 1 in the other: in one such step some entries of a branch's gradient differed by 2-5%.
A lower learning rate does not avoid it; GELU, smooth, does (docs/benchmarks.md, "Sharded runs
against one process"). Same weights, same tokenizer; only the activation differs.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from gainlora.model.tiny import build_tiny_backbone, with_overrides


def smooth_demo_t5(cache: Path, dest: Path) -> Path:
    """The demo backbone (t5-demo, no pre-training, as experiment=demo builds it) copied to ``dest``
    with ``feed_forward_proj`` gelu; a directory for ``backbone.name_or_path``."""
    source = build_tiny_backbone(with_overrides("t5-demo", pretrain_steps=0), cache_dir=cache)
    shutil.copytree(source, dest)
    config = json.loads((dest / "config.json").read_text())
    assert config["feed_forward_proj"] == "relu", config["feed_forward_proj"]
    config.update(feed_forward_proj="gelu", dense_act_fn="gelu")  # transformers' exact (erf) GELU
    (dest / "config.json").write_text(json.dumps(config, indent=2))
    return dest


def overrides(path: Path) -> list[str]:
    """The entry point's overrides that load it in place of the demo's tiny T5."""
    return ["backbone.tiny=null", f"backbone.name_or_path={path}"]
