"""Batch inference with a trained run: ``python -m gainlora.predict RUN INPUT.jsonl OUT.jsonl``
(``make predict RUN=... INPUT=... OUT=...``).

Each input line is a JSON object with either ``prompt`` (used as is) or ``input`` and optionally
``instruction``, rendered with the run's prompt template (``--prompt`` overrides it). Every output
line is the input object plus ``prediction``, in input order. Prompts are generated in batches of
similar length (sorted by token count, longest first, so padding is small and the memory peak
comes first), then put back in order. A progress bar runs on stderr and the throughput is printed
at the end. Every line is checked before anything is generated: a bad one stops with
``error: INPUT line N: ...`` and exit code 2.
"""
from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from gainlora.artifacts import ArtifactError, write_text
from gainlora.cli import ArgumentParser, error_line, positive_int, writable_file
from gainlora.data.benchmarks import long_sequence_prompt, superni_prompt
from gainlora.data.custom import jsonl_rows
from gainlora.data.demo import render_prompt
from gainlora.data.types import DataError, Example
from gainlora.schema import MAX_TOKENS
from gainlora.targets import ConfigError

PROMPTS: dict[str, Callable[[str, str], str]] = {"superni": superni_prompt, "long": long_sequence_prompt,
                                                 "demo": render_prompt}


@dataclass
class Throughput:
    examples: int
    seconds: float
    prompt_tokens: int
    batches: int

    def __str__(self) -> str:
        rate = self.examples / max(self.seconds, 1e-9)
        return (f"{self.examples} predictions in {self.seconds:.1f} s: {rate:.1f} examples/s, "
                f"{self.prompt_tokens / max(self.seconds, 1e-9):.0f} prompt tokens/s, {self.batches} batches")


def run_template(config) -> str:
    """The prompt template the run was trained with."""
    bench = config.get("benchmark", {})
    reader = bench.get("reader")
    return bench.get("prompt", "superni") if reader == "custom" else {"long": "long", "demo": "demo"}.get(
        reader, "superni")


def read_inputs(path: Path, template: Callable[[str, str], str]) -> list[tuple[dict[str, Any], str]]:
    """(row, prompt) for every non-blank line; a DataError names the first bad line."""
    if path.is_dir():  # "no such file" for a folder that exists misled
        raise DataError(f"{path}: a directory; give a JSONL file")
    if not path.is_file():  # /dev/null or a pipe read "no such file" too
        raise DataError(f"{path}: {'not a regular file' if path.exists() else 'no such file'}")
    rows = []
    for where, row in jsonl_rows(path):
        if "prediction" in row:
            raise DataError(f"{where}: has a 'prediction' field already (it would be overwritten)")
        if "prompt" in row:
            fields = ("prompt",)
        elif "input" in row:
            fields = ("instruction", "input") if "instruction" in row else ("input",)
        else:
            raise DataError(f"{where}: needs 'prompt', or 'input' (with an optional 'instruction')")
        for field in fields:
            if not isinstance(row[field], str):
                raise DataError(f"{where}: '{field}' must be a string, got {type(row[field]).__name__}")
        prompt = row["prompt"] if "prompt" in row else template(row.get("instruction", "").strip(), row["input"])
        rows.append((row, prompt))
    if not rows:
        raise DataError(f"{path}: no input lines")
    return rows


def length_buckets(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices in batches of similar length: sorted longest first (stable, so ties keep input order)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


@torch.no_grad()
def predict(trained, prompts: Sequence[str], *, batch_size: int = 32, progress: bool = True,
            **generation) -> tuple[list[str], Throughput]:
    """Answers for formatted prompts, in their order, generated in length-sorted batches."""
    module, collator = trained.module, trained.collator
    module.eval()
    lengths = [len(ids) for ids in collator.tokenizer(list(prompts), add_special_tokens=False)["input_ids"]]
    answers: list[str | None] = [None] * len(prompts)
    buckets = length_buckets(lengths, batch_size)
    start = time.perf_counter()
    with tqdm(total=len(prompts), desc="predicting", unit="ex", disable=not progress, file=sys.stderr) as bar:
        for bucket in buckets:
            items = [(0, Example(source=prompts[i], target="", references=("",)), "exact_match") for i in bucket]
            batch = {k: v.to(module.device) if isinstance(v, torch.Tensor) else v
                     for k, v in collator.eval_batch(items).items()}
            for i, answer in zip(bucket, module.generate(batch, **generation)):
                answers[i] = answer
            bar.update(len(bucket))
    stats = Throughput(len(prompts), time.perf_counter() - start, sum(lengths), len(buckets))
    return answers, stats  # type: ignore[return-value]


def write_predictions(path: str | Path, rows: Sequence[tuple[dict[str, Any], str]], answers: Sequence[str]) -> None:
    """Each input object plus ``prediction``, one per line, written atomically."""
    write_text(Path(path), "".join(json.dumps({**row, "prediction": answer}, ensure_ascii=False) + "\n"
                                   for (row, _), answer in zip(rows, answers)))


def predict_file(trained, input_path: str | Path, output_path: str | Path, *, batch_size: int = 32,
                 prompt: str | None = None, progress: bool = True, **generation) -> Throughput:
    """Read INPUT (JSONL), write OUTPUT (JSONL: each input object plus ``prediction``)."""
    template = prompt or run_template(trained.config)
    if template not in PROMPTS:
        raise DataError(f"prompt={template}: expected one of {', '.join(PROMPTS)}")
    rows = read_inputs(Path(input_path), PROMPTS[template])
    answers, stats = predict(trained, [p for _, p in rows], batch_size=batch_size, progress=progress, **generation)
    write_predictions(output_path, rows, answers)
    return stats


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m gainlora.predict", description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a run directory (runs/<experiment>/<run_id>) or the results.json it printed")
    parser.add_argument("input", help="JSONL: one object per line with 'prompt', or 'input' (+ 'instruction')")
    parser.add_argument("output", help="JSONL written: each input object plus 'prediction'")
    parser.add_argument("--batch-size", type=positive_int, default=32)
    parser.add_argument("--max-new-tokens", type=positive_int, default=None, help="default: the run's")
    parser.add_argument("--prompt", choices=PROMPTS, default=None,
                        help=f"template for 'input' lines: {', '.join(PROMPTS)} (default: the run's)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists (default: refuse)")
    args = parser.parse_args(argv)
    output = Path(args.output)
    for name in ("input", "output"):  # "-" is not stdin/stdout here: it was written as a file named "-"
        if getattr(args, name) == "-":
            return error_line(f"{name}=-: a file path (standard input and output are not read or written)")
    if (args.max_new_tokens or 0) > MAX_TOKENS:  # an answer that never ends generates for hours
        return error_line(f"--max-new-tokens={args.max_new_tokens}: at most {MAX_TOKENS}")
    try:
        from gainlora.api import load_run, read_run
        from gainlora.build import answer_limit

        run_dir, config, _ = read_run(args.run)
        template = args.prompt or run_template(config)
        rows = read_inputs(Path(args.input), PROMPTS[template])  # every line checked before the model loads
        unwritable = writable_file(output)
        if unwritable:
            return error_line(f"output={output}: {unwritable}")
        if output.resolve().is_relative_to(run_dir.root.resolve()):  # a run directory has one writer: the run
            return error_line(f"output={output}: inside the run directory {run_dir.root}; give a path outside it")
        if output.resolve() == Path(args.input).resolve():
            return error_line(f"output={output}: the input file itself; give another path (the input is kept)")
        if output.exists() and not args.overwrite:  # earlier predictions are kept unless asked
            return error_line(f"output={output}: exists; give another path, or --overwrite to replace it")
        trained = load_run(args.run)
        limit = answer_limit(trained.module.backbone.config, trained.module.kind, trained.collator.max_source_length)
        if args.max_new_tokens and limit is not None and args.max_new_tokens > limit:  # past its positions
            return error_line(f"--max-new-tokens={args.max_new_tokens}: at most {limit} for this run's backbone "
                              "(its positions, less the prompt's backbone.max_source_length for a decoder-only one)")
        generation = {"max_new_tokens": args.max_new_tokens} if args.max_new_tokens else {}
        answers, stats = predict(trained, [p for _, p in rows], batch_size=args.batch_size, **generation)
        write_predictions(output, rows, answers)
    except (DataError, ConfigError, ArtifactError, FileNotFoundError) as err:  # each names its file
        return error_line(str(err))
    print(stats)
    print(output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
