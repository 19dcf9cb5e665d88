"""Test-only: the measured CPU memory of one training step, for tests/unit/test_plan.py.

    python measure_peak.py OVERRIDE ...   (Hydra overrides, as for gainlora.plan)

Builds the configured model with real (random) weights and as many branches and gates as the
planner assumes, then prints one JSON line: the resident-set growth over the step's forward and
backward (sampled every 0.2 ms; run with MALLOC_MMAP_THRESHOLD_ so that freed blocks leave the
process) and the growth of loading the backbone.
"""
from __future__ import annotations

import gc
import json
import sys
import threading
import time

import psutil
import torch
from hydra import compose, initialize_config_dir


def main(overrides: list[str]) -> None:
    from gainlora.plan import num_tasks
    from gainlora.build import build_model
    from gainlora.run import CONF_DIR

    torch.set_num_threads(1)
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    process = psutil.Process()
    gc.collect()
    before_model = process.memory_info().rss
    module, _, _ = build_model(cfg, ["t"])
    weights = process.memory_info().rss - before_model
    for _ in range(num_tasks(cfg)):
        module.add_branch()
        module.gates.add_gate(copy_previous=False)
    module.train()
    b, s, t = cfg.data.batch_size, cfg.backbone.max_source_length, cfg.backbone.max_target_length
    vocab = module.backbone.get_input_embeddings().num_embeddings
    n = s if module.kind == "seq2seq" else s + t  # a causal row holds the source and the answer
    labels = torch.randint(2, vocab, (b, t if module.kind == "seq2seq" else n))
    if module.kind == "causal":
        labels[:, :s] = -100
    batch = {"input_ids": torch.randint(2, vocab, (b, n)), "attention_mask": torch.ones(b, n, dtype=torch.long),
             "gate_mask": torch.ones(b, n, dtype=torch.long), "labels": labels, "global_tokens": b * t, "replicas": 1}
    gc.collect()
    base = process.memory_info().rss
    peak, done = [base], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.0002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    module(batch).backward()
    done.set()
    sampler.join()
    print(json.dumps({"step": peak[0] - base, "weights": weights}))


if __name__ == "__main__":
    main(sys.argv[1:])
