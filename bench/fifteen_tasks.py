"""`make bench`, 15-task section: a whole continual run of the 15 SuperNI order-1 tasks on the tiny T5
with capped data, through the entry point (``gainlora.run.run``), timed per task.

After task t every seen task is evaluated (120 task evaluations in 15 tasks), so evaluation grows
with t while training should not (the fused branches): per task it records the fit's and the
test's wall and CPU time (``Callback.setup`` to ``teardown``), the task's wall time and its peak
RSS (VmHWM, reset after each task through /proc/self/clear_refs). CPU time is reported beside wall
time because the machine may be shared: with one thread it counts this process's work only.

Runs against any checkout of the package (``PYTHONPATH=<checkout>/src``) to compare versions:
    OMP_NUM_THREADS=1 python bench/fifteen_tasks.py --out /tmp/fifteen.json
``--runs-dir DIR`` keeps the run directory (every task's predictions.json), so two versions'
predictions can be compared file by file (docs/benchmarks.md, "15 tasks: evaluation").
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir

import gainlora.run as entry
from gainlora.cli import ArgumentParser, error_line, writable_file
from gainlora.observers import TaskObserver

# Capped to about 45 s of CPU time (one thread; longer in wall time on a busy machine): 16 test
# examples per task (1,920 generations over the run), 32 training examples and 8 steps per task.
OVERRIDES = ["experiment=tiny_superni", "benchmark.num_tasks=15", "benchmark.max_train_per_task=32",
             "benchmark.max_eval_per_task=16", "trainer.max_steps=8", "data.batch_size=8",
             "data.eval_batch_size=16", "trainer.enable_progress_bar=false", "checkpoint.every_n_epochs=0"]


def peak_rss_mib(reset: bool) -> float | None:
    """This process's peak resident memory since the last reset (Linux), else None."""
    try:
        status = Path("/proc/self/status").read_text()
        peak = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")) / 1024
        if reset:
            Path("/proc/self/clear_refs").write_text("5")
        return peak
    except (OSError, StopIteration, ValueError):
        return None


class Clock(L.Callback):
    """Wall and CPU seconds of each fit and test, from setup to teardown, and the padded tokens the
    fit trained on (tasks differ in text length: time per token is comparable across them)."""

    def __init__(self, stages: list[dict]) -> None:
        self.stages = stages

    def setup(self, trainer, pl_module, stage: str) -> None:
        self.start = (time.perf_counter(), time.process_time())
        self.tokens = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self.tokens += batch["input_ids"].numel() + (batch["labels"].numel() if pl_module.kind == "seq2seq" else 0)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        wall, cpu = time.perf_counter() - self.start[0], time.process_time() - self.start[1]
        self.stages.append({"stage": stage, "wall_s": wall, "cpu_s": cpu, "tokens": self.tokens})


class TaskClock(TaskObserver):
    """A task-end observer: each task's wall and CPU time (from the previous task's end) and peak RSS."""

    def __init__(self, tasks: list[dict]) -> None:
        self.tasks = tasks
        self.last = (time.perf_counter(), time.process_time())
        peak_rss_mib(reset=True)

    def on_task_end(self, end) -> None:
        now = (time.perf_counter(), time.process_time())
        self.tasks.append({"task": end.task, "wall_s": now[0] - self.last[0], "cpu_s": now[1] - self.last[1],
                           "peak_rss_mib": peak_rss_mib(reset=True)})
        self.last = (time.perf_counter(), time.process_time())


def run(runs_dir: str, extra: list[str]) -> dict:
    """One 15-task run; per task: fit, test, whole task."""
    stages: list[dict] = []
    tasks: list[dict] = []
    make_factory, make_observers = entry.trainer_factory, entry.logger_observers

    def factory(cfg, run_dir, loggers):
        make = make_factory(cfg, run_dir, loggers)
        return lambda task, callbacks, scale=1: make(task, [*callbacks, Clock(stages)], scale)

    entry.trainer_factory = factory  # instrumenting the entry point as it is, in any checkout
    entry.logger_observers = lambda loggers: [*make_observers(loggers), TaskClock(tasks)]
    try:
        with initialize_config_dir(config_dir=str(entry.CONF_DIR), version_base="1.3"):
            cfg = compose("config", overrides=[*OVERRIDES, f"paths.runs_dir={runs_dir}", "run_id=fifteen", *extra])
        start = time.perf_counter(), time.process_time()
        with contextlib.redirect_stdout(sys.stderr):
            results = entry.run(cfg)
        total = time.perf_counter() - start[0], time.process_time() - start[1]
    finally:
        entry.trainer_factory, entry.logger_observers = make_factory, make_observers
    fits = [s for s in stages if s["stage"] == "fit"]
    tests = [s for s in stages if s["stage"] == "test"]
    eval_examples = [int(cfg.benchmark.max_eval_per_task) * (t + 1) for t in range(len(tests))]
    per_task = [{**task, "fit_wall_s": f["wall_s"], "fit_cpu_s": f["cpu_s"], "fit_tokens": f["tokens"],
                 "eval_wall_s": e["wall_s"],
                 "eval_cpu_s": e["cpu_s"], "eval_examples": n}
                for task, f, e, n in zip(tasks, fits, tests, eval_examples)]
    return {"per_task": per_task, "total_wall_s": total[0], "total_cpu_s": total[1], "matrix": results["matrix"],
            "overrides": [*OVERRIDES, *extra]}


def summarize(result: dict) -> dict:
    tasks = result["per_task"]
    first, last = tasks[0], tasks[-1]
    per_example = lambda t, k: t[k] / t["eval_examples"]  # noqa: E731
    eval_wall = sum(t["eval_wall_s"] for t in tasks)
    eval_cpu = sum(t["eval_cpu_s"] for t in tasks)
    return {
        "tasks": len(tasks),
        "fit_last_over_first_wall": last["fit_wall_s"] / first["fit_wall_s"],
        "fit_last_over_first_cpu": last["fit_cpu_s"] / first["fit_cpu_s"],
        "fit_per_token_last_over_first_cpu": (last["fit_cpu_s"] / last["fit_tokens"])
        / (first["fit_cpu_s"] / first["fit_tokens"]),
        "eval_last_over_first_wall": last["eval_wall_s"] / first["eval_wall_s"],
        "eval_per_example_last_over_first_cpu": per_example(last, "eval_cpu_s") / per_example(first, "eval_cpu_s"),
        "task_last_over_first_wall": last["wall_s"] / first["wall_s"],
        "eval_share_wall": eval_wall / sum(t["wall_s"] for t in tasks),
        "eval_share_cpu": eval_cpu / sum(t["cpu_s"] for t in tasks),
        "eval_wall_s": eval_wall, "eval_cpu_s": eval_cpu,
        "fit_wall_s": sum(t["fit_wall_s"] for t in tasks), "fit_cpu_s": sum(t["fit_cpu_s"] for t in tasks),
        "run_wall_s": sum(t["wall_s"] for t in tasks), "run_cpu_s": sum(t["cpu_s"] for t in tasks),
        "peak_rss_mib": [t["peak_rss_mib"] for t in tasks],
    }


def markdown(summary: dict, baseline: dict | None = None) -> str:
    s = summary
    rows = [("training (fit), wall", f"{s['fit_last_over_first_wall']:.2f}", "<= 1.15"),
            ("training (fit), CPU", f"{s['fit_last_over_first_cpu']:.2f}", "<= 1.15"),
            ("training (fit) per trained token, CPU", f"{s['fit_per_token_last_over_first_cpu']:.2f}", "<= 1.15"),
            ("evaluation per example, CPU", f"{s['eval_per_example_last_over_first_cpu']:.2f}", "(flat)"),
            ("evaluation, wall (15 tasks vs 1 evaluated)", f"{s['eval_last_over_first_wall']:.2f}", "(grows)"),
            ("whole task, wall", f"{s['task_last_over_first_wall']:.2f}", "-")]
    lines = ["### 15 tasks, tiny T5, capped data (SuperNI order 1)", "",
             "| task 15 / task 1 | ratio | goal |", "|---|---:|---:|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    lines += ["", f"Evaluation share of the run: {100 * s['eval_share_wall']:.0f}% of wall time, "
              f"{100 * s['eval_share_cpu']:.0f}% of CPU time (evaluation {s['eval_wall_s']:.1f} s wall, "
              f"{s['eval_cpu_s']:.1f} s CPU; training {s['fit_wall_s']:.1f} s wall; run {s['run_wall_s']:.1f} s wall).",
              "", "Peak RSS per task (MiB): " + ", ".join("-" if p is None else f"{p:.0f}" for p in s["peak_rss_mib"])]
    if baseline is not None:
        b = baseline["summary"]
        lines += ["", f"Evaluation time against {baseline['label']} (same settings, stored in "
                  f"bench/fifteen_baseline.json, measured on the development machine): "
                  f"{b['eval_cpu_s']:.1f} s CPU then, {s['eval_cpu_s']:.1f} s now: "
                  f"**{b['eval_cpu_s'] / s['eval_cpu_s']:.2f}x** faster (goal >= 1.5x; wall "
                  f"{b['eval_wall_s']:.1f} s then, {s['eval_wall_s']:.1f} s now)."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="bench/fifteen_tasks.py", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="JSON with every task's figures and the summary")
    p.add_argument("--baseline", default=None, help="an earlier --out JSON to compare evaluation time with")
    p.add_argument("--label", default="this checkout", help="what was measured (recorded in the JSON)")
    p.add_argument("--runs-dir", default=None,
                   help="keep the run here (each task's predictions.json, to compare versions); default: a temp dir")
    p.add_argument("overrides", nargs="*", help="more config overrides, e.g. benchmark.data_dir=...")
    args = p.parse_args(argv)
    unwritable = writable_file(Path(args.out))
    if unwritable:  # checked before the 15-task run, not when its figures are written
        return error_line(f"--out={args.out}: {unwritable}")
    try:
        baseline = json.loads(Path(args.baseline).read_text()) if args.baseline else None
    except (OSError, ValueError) as err:  # it was read after the run: a traceback that lost the figures
        return error_line(f"--baseline={args.baseline}: a JSON file an earlier --out wrote ({err})")
    if baseline is not None and not (isinstance(baseline, dict) and "label" in baseline and isinstance(
            baseline.get("summary"), dict) and {"eval_cpu_s", "eval_wall_s"} <= set(baseline["summary"])):
        return error_line(f"--baseline={args.baseline}: not a JSON file an earlier --out wrote (needs label and "
                          "summary.eval_cpu_s, summary.eval_wall_s)")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    with contextlib.ExitStack() as stack:
        runs = args.runs_dir or stack.enter_context(tempfile.TemporaryDirectory(prefix="gainlora-fifteen-"))
        result = run(runs, args.overrides)
    result["summary"] = summarize(result)
    result["label"] = args.label
    with contextlib.suppress(OSError):
        result["loadavg_end"] = os.getloadavg()
    result["markdown"] = markdown(result["summary"], baseline)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(result["markdown"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
