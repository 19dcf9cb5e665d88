"""Test-only: several runs of the entry point's ``run(cfg)`` in one process, one after another, so a
test over many methods pays the imports and DeepSpeed's start-up once instead of once per method.

    python run_many.py SPEC.json OUT.json        (tests call ``launch``)

SPEC.json: ``{"name": [override, ...], ...}``; each run gets ``run_id=<name>``. OUT.json: ``{"name":
{"results": <results.json path>} or {"error": "<type>: <message>"}}``, written after every run, so
a run that fails is reported and the next ones still run. Under a multi-process strategy
Lightning's launcher re-runs this script for the other ranks when the first Trainer starts: they
make the same runs in the same order, and join each run directory as the entry point's do.
"""
from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
# what a run's last task trained, by method: (artifact, key suffix); LoRA methods: ("branch", ".B")
TRAINED = {"l2p": ("memory", "l2p.prompts"), "lfpt5": ("memory", "lfpt5.prompt")}  # prompts, no branch file


def launch(root: Path, spec: dict[str, list[str]]) -> dict[str, dict]:
    """For a test: the runs of ``spec`` (each given ``paths.runs_dir=<root>``) in one subprocess of
    this script; its output kept in <root>/run_many.log. Returns each run's outcome."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "DS_ACCELERATOR": "cpu", "GAINLORA_TRUSTED_MODULES": "cpu_deepspeed",  # the CPU DeepSpeed shim
           "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    (root / "spec.json").write_text(json.dumps({k: [*v, f"paths.runs_dir={root}"] for k, v in spec.items()}))
    done = subprocess.run([sys.executable, str(HERE / "run_many.py"), str(root / "spec.json"), str(root / "out.json")],
                          cwd=HERE.parents[1], env=env, capture_output=True, text=True, timeout=900)
    (root / "run_many.log").write_text(done.stdout + "\n--- stderr ---\n" + done.stderr)
    assert done.returncode == 0 and (root / "out.json").is_file(), done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads((root / "out.json").read_text())


def main(spec: Path, out: Path) -> None:
    from hydra import compose, initialize_config_dir

    from gainlora.run import CONF_DIR, run

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
        if os.environ.get("LOCAL_RANK", "0") == "0":  # a multi-process strategy's rank 1 re-runs this script
            out.write_text(json.dumps(done, indent=1))
        # What outlives a run (modules imported on the way) out of the collector's sight: DeepSpeed
        # calls gc.collect() whenever a ZeRO-3 Trainer ends, ~0.7 s each over the imports' objects.
        gc.collect()
        gc.freeze()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
