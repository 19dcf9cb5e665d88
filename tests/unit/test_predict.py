"""Batch inference: length-bucketed batches give the one-at-a-time answers in input order; bad
input lines are named by line number before anything loads; the CLI end to end on a fresh run."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf

from gainlora.data.collate import Collator
from gainlora.data.demo import make_demo_task
from gainlora.predict import length_buckets, main, predict, predict_file
from test_invariants import TASKS, gated_model


def test_length_buckets_sort_longest_first_and_keep_ties_in_order() -> None:
    assert length_buckets([3, 9, 1, 9, 5], 2) == [[1, 3], [4, 0], [2]]
    assert length_buckets([], 4) == []


@pytest.mark.parametrize("kind", ["t5", "llama"])
def test_bucketed_predictions_equal_one_at_a_time_in_input_order(kind, t5_backbone, llama_backbone, tmp_path,
                                                                 monkeypatch) -> None:
    backbone = (t5_backbone if kind == "t5" else llama_backbone)()
    module = gated_model(backbone)  # two gated branches: each answer depends on its own input
    collator = Collator(backbone.tokenizer, backbone.kind, 128, 8)
    trained = SimpleNamespace(module=module, collator=collator,
                              config=OmegaConf.create({"benchmark": {"reader": "demo"}}))
    # Lengths out of input order (padding words), so that sorting moves every batch's examples.
    examples = [replace(e, source=e.source + " ok" * pad) for e, pad in zip(
        (e for name in TASKS for e in make_demo_task(name, n_train=0, n_val=0, n_test=3).test),
        (0, 6, 2, 9, 4, 1, 8, 3, 7))]
    prompts = [e.source for e in examples]
    widths: list[int] = []
    generate = module.generate
    monkeypatch.setattr(module, "generate", lambda batch, **kw: widths.append(
        batch["attention_mask"].sum(1).tolist()) or generate(batch, **kw))
    answers, stats = predict(trained, prompts, batch_size=4, progress=False)
    monkeypatch.undo()
    single = [module.generate(collator.eval_batch([(0, e, "rougeL")]))[0] for e in examples]
    assert answers == single
    assert len(set(single)) > 1  # the inputs do get different answers
    assert stats.examples == len(prompts) and stats.batches == 3
    assert all(min(a) >= max(b) for a, b in zip(widths, widths[1:]))  # batches of decreasing lengths
    # The file front end: rows back in input order with their own fields, plus the prediction.
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in enumerate(prompts)))
    predict_file(trained, source, tmp_path / "out.jsonl", batch_size=4, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == list(range(len(prompts))) and [r["prediction"] for r in rows] == single


def test_load_run_s_model_predicts_as_make_predict_does(t5_backbone, tmp_path, monkeypatch, capsys) -> None:
    """``load_run(...).generate`` and ``.predict_file``: the same length-bucketed batches, answers in input
    order, and the progress bar and throughput line of ``make predict`` (generate used fixed slices)."""
    from gainlora.api import TrainedModel

    backbone = t5_backbone()
    module = gated_model(backbone)
    collator = Collator(backbone.tokenizer, backbone.kind, 128, 8)
    trained = TrainedModel(module=module, method=None, collator=collator, tasks=["demo_colour"],
                           config=OmegaConf.create({"benchmark": {"reader": "demo"}}))
    examples = [replace(e, source=e.source + " ok" * pad) for e, pad in zip(
        (e for name in TASKS for e in make_demo_task(name, n_train=0, n_val=0, n_test=2).test), (0, 6, 2, 9, 4, 1))]
    prompts = [e.source for e in examples]
    widths: list[int] = []
    generate = module.generate
    monkeypatch.setattr(module, "generate", lambda batch, **kw: widths.append(
        batch["attention_mask"].sum(1).tolist()) or generate(batch, **kw))
    answers = trained.generate(prompts, batch_size=4)
    monkeypatch.undo()
    assert answers == [module.generate(collator.eval_batch([(0, e, "rougeL")]))[0] for e in examples]
    assert len(widths) == 2 and min(widths[0]) >= max(widths[1])  # longest first, not input slices
    assert "predicting" not in capsys.readouterr().err  # no bar unless asked
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    stats = trained.predict_file(source, out, batch_size=4)
    err = capsys.readouterr().err
    assert "predicting" in err and "100%" in err and err.rstrip().endswith(str(stats))
    assert f"{len(prompts)} predictions in" in str(stats) and "examples/s" in str(stats)
    assert [json.loads(line)["prediction"] for line in out.read_text().splitlines()] == answers


def fake_run(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("benchmark:\n  reader: demo\n")
    (run / "results.json").write_text('{"tasks": ["demo_colour"]}')
    return run


@pytest.mark.parametrize("lines, fragment", [
    (['{"input": "a"}', '{"input": "b"', '{"input": "c"}'], "line 2: not valid JSON"),
    (['{"input": "a"}', '', '["x"]'], "line 3: expected a JSON object, got list"),
    (['{"input": "a"}', '{"text": "b"}'], "line 2: needs 'prompt', or 'input' (with an optional 'instruction')"),
    (['{"prompt": 7}'], "line 1: 'prompt' must be a string, got int"),
    (['{"input": "a", "instruction": null}'], "line 1: 'instruction' must be a string, got NoneType"),
    (['{"input": "a", "prediction": "x"}'], "line 1: has a 'prediction' field already"),
    ([''], "no input lines"),
    (['[' * 100_000 + ']' * 100_000], "line 1: nested too deeply to read"),
    (['{"input": "\\ud800 x"}'], "line 1: not valid Unicode ('\\ud800' is a lone surrogate)"),
])
def test_bad_lines_are_named_before_anything_loads(tmp_path, capsys, lines, fragment) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(lines) + "\n")
    assert main([str(fake_run(tmp_path)), str(source), str(tmp_path / "out.jsonl")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {source}") and fragment in err[0], err
    assert not (tmp_path / "out.jsonl").exists()


def test_bad_arguments_are_named(tmp_path, capsys) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text('{"input": "a"}\n')
    run = fake_run(tmp_path)
    assert main([str(tmp_path / "nowhere"), str(source), str(tmp_path / "o")]) == 2
    assert main([str(run), str(tmp_path / "missing.jsonl"), str(tmp_path / "o")]) == 2
    assert main([str(run), str(tmp_path), str(tmp_path / "o")]) == 2  # was "no such file"
    assert main([str(run), str(source), str(tmp_path)]) == 2  # a directory
    assert main([str(run), str(source), "/proc/gainlora/o.jsonl"]) == 2  # checked before the model loads
    assert main([str(run), str(source), str(source)]) == 2
    assert main([str(run), str(source), str(run / "preds.jsonl")]) == 2  # a run directory has one writer
    assert not (run / "preds.jsonl").exists()
    (tmp_path / "old.jsonl").write_text("earlier predictions\n")
    assert main([str(run), str(source), str(tmp_path / "old.jsonl")]) == 2  # was replaced without a word
    assert (tmp_path / "old.jsonl").read_text() == "earlier predictions\n"
    assert main([str(run), str(source), str(tmp_path / "o"), "--max-new-tokens", "1000000000"]) == 2
    assert main([str(run), str(source), "-"]) == 2 and not Path("-").exists()
    assert main([str(run), "-", str(tmp_path / "o")]) == 2
    assert main([str(run), "/dev/null", str(tmp_path / "o")]) == 2  # was "no such file"
    for args in (["--batch-size", "0"], ["--batch-size", "abc"], ["--prompt", "chat"], ["--bogus"], []):
        with pytest.raises(SystemExit) as stopped:  # argparse's own errors, in the same one-line form
            main([str(run), str(source), *(["o"] if args else []), *args])
        assert stopped.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {tmp_path / 'nowhere'}: not a run directory (needs config.yaml and results.json)",
        f"error: {tmp_path / 'missing.jsonl'}: no such file",
        f"error: {tmp_path}: a directory; give a JSONL file",
        f"error: output={tmp_path}: a directory; give a file path",
        "error: output=/proc/gainlora/o.jsonl: /proc cannot be written (No such file or directory)",
        f"error: output={source}: the input file itself; give another path (the input is kept)",
        f"error: output={run / 'preds.jsonl'}: inside the run directory {run}; give a path outside it",
        f"error: output={tmp_path / 'old.jsonl'}: exists; give another path, or --overwrite to replace it",
        "error: --max-new-tokens=1000000000: at most 131072",
        "error: output=-: a file path (standard input and output are not read or written)",
        "error: input=-: a file path (standard input and output are not read or written)",
        "error: /dev/null: not a regular file",
        "error: --batch-size=0: a positive integer",
        "error: --batch-size=abc: a positive integer",
        "error: --prompt=chat: expected one of superni, long, demo",
        "error: --bogus: unknown arguments; see python -m gainlora.predict --help",
        "error: output: required; see python -m gainlora.predict --help"]


@pytest.mark.parametrize("damage, fragment", [
    (lambda run: (run / "config.yaml").write_text("a: [unclosed\n"), "config.yaml: not a readable config"),
    (lambda run: (run / "config.yaml").write_text("- 1\n"), "config.yaml: not a run config"),
    (lambda run: (run / "results.json").write_text("{bad"), "results.json: not a run's results"),
    (lambda run: (run / "results.json").write_text('{"tasks": "a"}'), "results.json: not a run's results"),
])
def test_a_damaged_run_directory_is_named(tmp_path, capsys, damage, fragment) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text('{"input": "a"}\n')
    damage(run := fake_run(tmp_path))
    assert main([str(run), str(source), str(tmp_path / "o.jsonl")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {run}/") and fragment in err[0], err


@pytest.mark.slow
def test_cli_on_a_fresh_run(tmp_path, capsys) -> None:
    from hydra import compose, initialize_config_dir

    from gainlora.run import CONF_DIR, run

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        run(compose("config", overrides=[
            "experiment=demo", "backbone=tiny_t5_test", "benchmark.num_tasks=2", "benchmark.n_train=32",
            "benchmark.n_test=8", "data.batch_size=16", "trainer.max_steps=2", "trainer.enable_progress_bar=false",
            f"paths.runs_dir={tmp_path}", "run_id=r"]))
    source, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    rows = [{"id": "a", "instruction": "Name the colour.", "input": "the sky at noon"},
            {"id": "b", "input": "12"},
            {"id": "c", "prompt": "Definition: Is it even? Input: 7 Output:"}]
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    capsys.readouterr()
    assert main([str(tmp_path / "demo" / "r"), str(source), str(out), "--batch-size", "2"]) == 0
    done = capsys.readouterr()
    assert "predicting" in done.err and "100%" in done.err  # the progress bar
    lines = done.out.strip().splitlines()
    assert lines[-1] == str(out) and "3 predictions in" in lines[-2] and "examples/s" in lines[-2]
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in written] == ["a", "b", "c"]
    assert all(isinstance(r["prediction"], str) and r.items() >= rows[i].items() for i, r in enumerate(written))
    assert main([str(tmp_path / "demo" / "r"), str(source), str(out), "--overwrite"]) == 0  # asked: replaced
    capsys.readouterr()
    assert main([str(tmp_path / "demo" / "r"), str(source), str(tmp_path / "o2.jsonl"), "--max-new-tokens", "600"]) == 2
    assert capsys.readouterr().err.strip() == ("error: --max-new-tokens=600: at most 512 for this run's backbone (its "
                                               "positions, less the prompt's backbone.max_source_length for a "
                                               "decoder-only one)")
    assert [json.loads(line) for line in out.read_text().splitlines()] == written


def test_make_predict_keeps_a_path_with_a_space_whole(tmp_path) -> None:
    """``make predict`` passes RUN, INPUT and OUT quoted (a space split them into extra arguments).
    A dry run (-n) prints the command; a stamped fake venv keeps make from planning a reinstall."""
    import shutil
    import subprocess

    if shutil.which("make") is None:
        pytest.skip("no make")
    (tmp_path / "venv").mkdir()
    (tmp_path / "venv" / ".installed").touch()
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(["make", "-n", "-C", str(root), f"VENV={tmp_path / 'venv'}", "predict",
                           "RUN=runs/demo/a", "INPUT=my in.jsonl", "OUT=my out.jsonl"],
                          capture_output=True, text=True, timeout=60)
    assert 'gainlora.predict "runs/demo/a" "my in.jsonl" "my out.jsonl"' in done.stdout, done.stdout
