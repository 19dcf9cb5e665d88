"""Test-only: several runs of the entry point's ``run(cfg)`` in one process, one after another, so a
test over many methods pays the imports and DeepSpeed's start-up once instead of once per method.

    python run_many.py SPEC.json OUT.json

SPEC.json: ``{"name": [override, ...], ...}``; each run gets ``run_id=<name>``. OUT.json: ``{"name":
{"results": <results.json path>} or {"error": "<type>: <message>"}}``, written after every run, so
a run that fails is reported and the next ones still run. One process only: a multi-process
strategy's launcher would re-run this script for rank 1.
"""
from __future__ import annotations

import gc
import json
import sys
import traceback
from pathlib import Path

from hydra import compose, initialize_config_dir

from gainlora.run import CONF_DIR, run


def main(spec: Path, out: Path) -> None:
    done: dict[str, dict] = {}
    gc.freeze()
    for name, overrides in json.loads(spec.read_text()).items():
        try:
            with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
                cfg = compose("config", overrides=[*overrides, f"run_id={name}"])
            run(cfg)
            done[name] = {"results": str(Path(cfg.paths.runs_dir) / cfg.exp_name / name / "results.json")}
        except Exception as err:  # noqa: BLE001 - reported per run, the test names it
            traceback.print_exc()
            done[name] = {"error": f"{type(err).__name__}: {err}"[:2000]}
        out.write_text(json.dumps(done, indent=1))
        # What outlives a run (modules imported on the way) out of the collector's sight: DeepSpeed
        # calls gc.collect() whenever a ZeRO-3 Trainer ends, ~0.7 s each over the imports' objects.
        gc.collect()
        gc.freeze()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
