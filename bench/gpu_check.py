"""`make gpu-check`: the checks that need one CUDA GPU, in one script, writing one JSON.

1. bench: a training step and greedy generation in bf16 (autocast) with random weights at the
   T5-Large shape (24+24 layers, d 1024) and at the Llama-2-7B width (d 4096, d_ff 11008, 32 heads,
   vocab 32000) with 8 of its 32 layers (time and memory per layer scale linearly), for one plain
   LoRA branch and GainLoRA with 15 branches, and the peak CUDA memory of both;
2. a 2-task continual run on a T5-Large-shaped tiny-vocabulary backbone (random init), single GPU;
3. single-GPU DeepSpeed runs on the demo backbone, ZeRO-2 and ZeRO-3 (each task's engine torn down
   and the module handed over whole; tested on CPU processes only so far).
4. FSDP (strategy=fsdp, gainlora/fsdp.py) on one GPU, bf16-mixed: the CPU test covers two processes
   over gloo; this checks the CUDA path (fully_shard on a cuda mesh, NCCL, autocast) finishes.

Without CUDA it prints one line, writes {"skipped": ...} and exits 0. Budget: under 8 minutes on
one GPU (each step has its own timeout; the whole is checked against the budget at the end).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from gainlora.cli import ArgumentParser, error_line, writable_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
BUDGET_S = 480
T5_LARGE_TINY = ["backbone=tiny_t5", "+backbone.tiny_overrides.d_model=1024", "+backbone.tiny_overrides.d_ff=4096",
                 "+backbone.tiny_overrides.layers=24", "+backbone.tiny_overrides.heads=16"]
DEMO_2 = ["experiment=demo", "benchmark.num_tasks=2", "benchmark.n_train=256", "benchmark.n_test=64",
          "trainer.max_steps=40", "trainer.accelerator=gpu", "trainer.devices=1", "trainer.enable_progress_bar=false"]


def bench(out: dict) -> None:
    import run_bench as rb

    shapes = [
        rb.Arch("t5_large", "seq2seq", "t5-test",
                dict(d_model=1024, d_kv=64, d_ff=4096, num_layers=24, num_decoder_layers=24, num_heads=16,
                     vocab_size=32128),
                batch=8, source=512, target=50, new_tokens=16, label="T5-Large shape"),
        rb.Arch("llama7b_8layers", "causal", "llama-test",
                dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=8, num_attention_heads=32,
                     num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096),
                batch=2, source=1024, target=50, new_tokens=16, label="Llama-2-7B width, 8 of 32 layers"),
    ]
    settings = rb.Settings("cuda", "bf16", threads=4, warmup=2, repeats=5, quick=False)
    variants = [rb.VARIANT_BY_NAME["lora_1"], rb.VARIANT_BY_NAME["gainlora_15"]]
    for arch in shapes:
        torch.cuda.reset_peak_memory_stats()
        out["bench"][arch.name] = {"label": arch.label, "steps": rb.bench_steps(arch, settings, variants),
                                   "peak_cuda_gib_all_variants": torch.cuda.max_memory_allocated() / 2**30}
        torch.cuda.empty_cache()


def run(name: str, args: list[str], runs_dir: Path, timeout: int) -> dict:
    """One gainlora.run in a subprocess: exit code, wall time, scores, the last stderr line."""
    started = time.time()
    cmd = [sys.executable, "-m", "gainlora.run", *args, f"paths.runs_dir={runs_dir}", f"run_id={name}"]
    try:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": f"timeout after {timeout} s", "args": args}
    record = {"exit": done.returncode, "seconds": round(time.time() - started, 1), "args": args,
              "stderr_tail": done.stderr.strip().splitlines()[-1:]}
    results = [Path(line) for line in done.stdout.splitlines() if line.endswith("results.json")]
    if done.returncode == 0 and results and results[-1].is_file():
        data = json.loads(results[-1].read_text())
        record.update(status=data["status"], AP=data["AP"], matrix=data["matrix"])
    return record


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="bench/gpu_check.py", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpu_check.json"))
    parser.add_argument("--runs-dir", default="/tmp/gainlora-gpu-check")
    args = parser.parse_args(argv)
    out_path = Path(args.out)
    for flag, path in (("--out", out_path), ("--runs-dir", Path(args.runs_dir) / "probe")):
        unwritable = writable_file(path)  # checked before minutes of GPU work, not when the first result is saved
        if unwritable:
            return error_line(f"{flag}={path if flag == '--out' else args.runs_dir}: {unwritable}")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if not torch.cuda.is_available():
        print("gpu-check: no CUDA device; skipped")
        out_path.write_text(json.dumps({"skipped": "no CUDA device"}) + "\n")
        return 0
    started = time.time()
    out: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "bench": {}, "runs": {}}

    def save() -> None:  # partial results survive a failure further on
        out["seconds"] = round(time.time() - started, 1)
        out_path.write_text(json.dumps(out, indent=1) + "\n")

    try:
        bench(out)
    except Exception as err:  # the runs below still say something
        out["bench_error"] = f"{type(err).__name__}: {err}"[:1000]
    save()
    runs_dir = Path(args.runs_dir) / time.strftime("%Y%m%d-%H%M%S")
    plans = {
        "t5_large_shape_2_tasks": [*DEMO_2, *T5_LARGE_TINY, "data.batch_size=16"],
        "zero2_single_gpu": [*DEMO_2, "strategy=deepspeed_stage_2", "trainer.precision=bf16-mixed"],
        "zero3_single_gpu": [*DEMO_2, "strategy=deepspeed_stage_3", "trainer.precision=bf16-mixed"],
        "fsdp_single_gpu": [*DEMO_2, "strategy=fsdp", "trainer.precision=bf16-mixed"],
    }
    for name, run_args in plans.items():
        out["runs"][name] = run(name, run_args, runs_dir, timeout=180)
        save()
    out["within_budget"] = time.time() - started <= BUDGET_S
    save()
    print(json.dumps({k: v for k, v in out.items() if k != "bench"}, indent=1))
    print(out_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
