"""The cpu_long experiment's pipeline, shortened: real Long Sequence data, a tiny T5 pre-trained on
benchmark text (gainlora.model.pretrain) and cached, its three tasks. The full run's figures are in the
README; this checks that the pieces connect, what the pre-training reads, and the error path."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DATA = Path(os.environ.get("GAINLORA_DATA", ROOT / "data" / "CL_Benchmark"))

pytestmark = [pytest.mark.slow, pytest.mark.data,
              pytest.mark.skipif(not (DATA / "Long_Sequence").is_dir(), reason="no CL_Benchmark data")]

# The experiment with debug-sized caps; the backbone keeps the text preset but smaller and shorter
# pre-trained, on one task's text, so that it builds in seconds.
SHORT = ["experiment=cpu_long", f"paths.data_dir={DATA}", "benchmark.max_train_per_task=32",
         "benchmark.max_eval_per_task=16", "trainer.max_steps=3",
         "data.batch_size=8", "trainer.enable_progress_bar=false", "backbone.text_corpus.tasks=[sst2]",
         "backbone.tiny_overrides={d_model: 32, d_ff: 64, heads: 2, vocab_size: 1000, pretrain_steps: 3,"
         " pretrain_batch: 4, pretrain_warmup: 1}"]


# The README's SeqLoRA comparison.
SEQLORA = ["method=seqlora"]


def launch(tmp: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "gainlora.run", *SHORT, f"paths.runs_dir={tmp / 'runs'}",
           f"paths.cache_dir={tmp / 'cache'}", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def short_run(tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("cpu_long")
    done = launch(tmp, "run_id=r1")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return Path(done.stdout.strip().splitlines()[-1]), tmp


def test_runs_on_the_real_tasks_with_a_text_pretrained_backbone(short_run) -> None:
    results_path, tmp = short_run
    results = json.loads(results_path.read_text())
    assert results["status"] == "finished" and results["method"] == "gainlora_inflora"
    # the stream's order (docs/cpu_long.md: the agnews gate leaks less onto sst2 before dbpedia)
    assert results["tasks"] == ["sst2", "agnews", "dbpedia"] and results["metric"] == "exact_match"
    # dbpedia has no train.json in the shared copy: the config carves all three splits from test.json
    assert any("dbpedia: train, validation and test carved from test.json" in n for n in results["notes"])
    assert len(results["matrix"]) == 3 and all(v is not None for v in results["matrix"][2])
    assert (results_path.parent / "plots" / "forgetting.png").stat().st_size > 1000
    # The backbone came from the text builder, pre-trained on the corpus the config names.
    (built,) = (tmp / "cache").glob("t5-text-*")
    assert Path(results["backbone"]) == built
    meta = json.loads((built / "tiny_spec.json").read_text())
    assert meta["corpus"]["tasks"] == ["sst2"] and meta["spec"]["pretrain_steps"] == 3
    assert meta["corpus_texts"] > 1000  # sst2's 2,000 train inputs (the shortest dropped)


def test_the_cached_backbone_is_reused_and_keyed_on_the_recipe(short_run) -> None:
    from gainlora.model.pretrain import build_text_backbone

    _, tmp = short_run
    (built,) = (tmp / "cache").glob("t5-text-*")
    stamp = {p: p.stat().st_mtime_ns for p in built.iterdir()}
    corpus = {"data_dir": str(DATA), "benchmark": "long", "tasks": ["sst2"]}
    overrides = {"d_model": 32, "d_ff": 64, "heads": 2, "vocab_size": 1000, "pretrain_steps": 3,
                 "pretrain_batch": 4, "pretrain_warmup": 1}
    assert build_text_backbone("t5-text", corpus, tmp / "cache", overrides) == built  # no rebuild
    assert {p: p.stat().st_mtime_ns for p in built.iterdir()} == stamp
    # Another corpus or recipe is another directory (checked by name, without building it).
    from gainlora.model.pretrain import TextCorpus, resolve_text_spec, text_backbone_dir

    spec = resolve_text_spec("t5-text", overrides)
    other = text_backbone_dir(spec, TextCorpus(str(DATA), "long", ("sst2", "cb")), tmp / "cache")
    longer = text_backbone_dir(resolve_text_spec(spec, {"pretrain_steps": 4}), TextCorpus.from_config(corpus),
                               tmp / "cache")
    assert len({built, other, longer}) == 3


def test_a_missing_corpus_file_is_one_error_line_before_anything_is_written(tmp_path) -> None:
    # yahoo's train.json is one of the files absent from the shared copy
    done = launch(tmp_path, "backbone.text_corpus.tasks=[sst2,yahoo]")
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("error: backbone.text_corpus: ") and "yahoo/train.json" in lines[-1]
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "runs").exists() and not list((tmp_path / "cache").glob("t5-text-*"))


def test_the_seqlora_comparison_is_the_same_run_but_the_method() -> None:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from gainlora.run import CONF_DIR
    from gainlora.schema import validate_config

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        gain = compose("config", overrides=["experiment=cpu_long"])
        seq = compose("config", overrides=["experiment=cpu_long", *SEQLORA])
    for cfg in (gain, seq):
        validate_config(cfg, machine=False)
    assert gain.method._target_.endswith("GainLoRA") and seq.method._target_.endswith("SeqLoRA")
    rest = [{k: v for k, v in OmegaConf.to_container(c).items() if k != "method"} for c in (gain, seq)]
    assert rest[0] == rest[1]


def test_the_experiment_pretrains_on_train_files_the_shared_copy_has() -> None:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from gainlora.model.pretrain import TextCorpus
    from gainlora.run import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=cpu_long", f"paths.data_dir={DATA}"])
    corpus = TextCorpus.from_config(OmegaConf.to_container(cfg.backbone.text_corpus, resolve=True))
    files = corpus.files()  # raises DataError when one is absent
    assert files and all(f.name == "train.json" for f in files)
    # news and reviews only (README: sst2's features); sst2 is both in the stream and in the corpus
    assert set(corpus.tasks) == {"agnews", "amazon", "sst2", "yelp", "imdb"}
