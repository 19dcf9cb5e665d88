"""Bad input fails before any training, with one clear message naming the file, task or key."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from safetensors.torch import save_file
import torch

import gainlora.run
from gainlora.run import CONF_DIR, main, run

ROOT = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("GAINLORA_DATA", ROOT / "data" / "CL_Benchmark"))
TINY = ["experiment=demo", "backbone=tiny_t5_test", "benchmark.num_tasks=1", "data.batch_size=16",
        "trainer.max_steps=2", "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1"]
DEMO = ["benchmark.n_train=32", "benchmark.n_test=8"]


def config(tmp_path: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=[*TINY, f"paths.runs_dir={tmp_path / 'runs'}", *overrides])


def superni_copy(tmp_path: Path, corrupt) -> Path:
    """A one-task SuperNI folder whose train.json was passed through ``corrupt``."""
    if not (SHARED / "SuperNI").is_dir():
        pytest.skip("the shared benchmark is not available (set GAINLORA_DATA)")
    task = "task363_sst2_polarity_classification"
    dest = tmp_path / "data" / "SuperNI" / task
    shutil.copytree(SHARED / "SuperNI" / task, dest)
    path = dest / "train.json"
    path.write_text(corrupt(path.read_text()))
    return tmp_path / "data"


def drop_key(key):
    def corrupt(text):
        obj = json.loads(text)
        del obj[key]
        return json.dumps(obj)
    return corrupt


def empty_instances(text):
    obj = json.loads(text)
    obj["Instances"] = []
    return json.dumps(obj)


SUPERNI = ["benchmark=superni", "benchmark.tasks=[task363_sst2_polarity_classification]"]
CASES = {
    # case: (overrides, corrupt train.json with, message fragment)
    "missing data directory": (SUPERNI + ["paths.data_dir=/nonexistent/CL_Benchmark"], None, "make data"),
    "missing task": (["benchmark=superni", "benchmark.tasks=[task999_nothing]"], "copy", "task999_nothing"),
    "malformed JSON": (SUPERNI, lambda t: t[:-40], "train.json: malformed JSON"),
    "missing key": (SUPERNI, drop_key("Instances"), "missing key 'Instances'"),
    "empty Instances": (SUPERNI, empty_instances, "'Instances' is empty"),
    "unknown reader": (["benchmark.reader=bogus"], None, "benchmark.reader=bogus: should be 'demo', 'superni', 'long' or 'custom'"),
    "unknown order": (["benchmark.order=9"], None, "benchmark.order=9: one of 1, 2, all"),
    "zero rank": (["lora.rank=0"], None, "lora.rank=0: should be greater than 0"),
    "endless generation": (["backbone.max_new_tokens=1000000000"], None,
                           "backbone.max_new_tokens=1000000000: should be less than or equal to 131072"),
    # accepted, then every test batch generated for hours
    "generation past the answer positions": (["backbone.max_new_tokens=131072"], None,
                                             "backbone.max_new_tokens=131072: at most 512 (an encoder-decoder's "
                                             "answer positions: its n_positions, else T5's pre-training length 512)"),
    "no backbone": (["backbone.tiny=null"], None, "backbone.name_or_path"),
    "indivisible global batch": (["data.global_batch_size=32", "data.batch_size=5"], None,
                                 "data.global_batch_size=32: a multiple of data.batch_size (5)"),
    # the derived accumulation replaced the given one silently
    "accumulation given and derived": (["data.global_batch_size=32", "trainer.accumulate_grad_batches=4"], None,
                                       "trainer.accumulate_grad_batches=4: 1 or 2 (data.global_batch_size=32 over "
                                       "data.batch_size 16 x 1 devices)"),
    # the message began "val_size=0.99 leaves ...", not naming the key
    "val split taking every training example": (["benchmark=custom", f"benchmark.tasks=[{ROOT}/examples/custom_tasks/"
                                                 "antonyms]", "benchmark.val_size=0.99"], None,
                                                "benchmark.val_size=0.99: smaller; it leaves no training data for task "
                                                "'antonyms' (36 train instances)"),
    "DeepSpeed on CPU": (["strategy=deepspeed_stage_2", "trainer.accelerator=cpu"], None,
                         "Lightning runs DeepSpeed on CUDA GPUs only"),
    "devices Lightning refuses": (["trainer.accelerator=cpu", "trainer.devices=[0,1]"], None,
                                  "trainer.devices=[0, 1]: lightning.Trainer refuses it: `devices` selected with"),
    # named no key: "trainer: lightning.Trainer refuses these settings: `Timer(duration='abc')` ..."
    "a time limit Lightning refuses": (["+trainer.max_time=abc"], None,
                                       "trainer.max_time=abc: lightning.Trainer refuses it: `Timer(duration='abc')`"),
    "missing single-task reference": (["metrics.single_task_run=/nonexistent/st"], None,
                                      "metrics.single_task_run=/nonexistent/st: /nonexistent/st/results.json: not found"),
    "rank above the backbone's width": (["lora.rank=100000"], None, "lora.rank=100000: at most 64 for this backbone"),
    # Lightning refused it only when the first task's fit started: a traceback
    "validation interval past an epoch": (["+trainer.val_check_interval=1000", "trainer.limit_val_batches=1.0"], None,
                                          "trainer.val_check_interval=1000: at most 2 (the training batches of an "
                                          "epoch of the smallest task)"),
    "known-missing file": (["benchmark=long", "benchmark.tasks=[yelp]", f"paths.data_dir={SHARED}"], None,
                           "yelp/test.json"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_refused_before_training(case, tmp_path):
    overrides, corrupt, fragment = CASES[case]
    overrides = list(overrides)
    if corrupt is not None:
        data = superni_copy(tmp_path, (lambda t: t) if corrupt == "copy" else corrupt)
        overrides.append(f"paths.data_dir={data}")
    if case == "known-missing file" and not (SHARED / "Long_Sequence").is_dir():
        pytest.skip("the shared benchmark is not available")
    if not any(o.startswith("benchmark=") for o in overrides):
        overrides += DEMO
    cfg = config(tmp_path, *overrides)
    with pytest.raises(ValueError) as err:
        run(cfg)
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "runs").exists(), "files written before the error"


@pytest.mark.parametrize("override, fragment", [("method=nosuch", "nosuch"), ("backbone=nosuch", "nosuch")])
def test_unknown_config_group_option_names_it(override, fragment, tmp_path):
    cmd = [sys.executable, "-m", "gainlora.run", *TINY, *DEMO, f"paths.runs_dir={tmp_path}", override]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.startswith(f"error: {override}: one of "), done.stderr


def test_a_value_a_debug_preset_set_is_named_as_its(tmp_path):
    """debug=cpu_tiny takes 2 tasks: on a one-task stream the line named benchmark.num_tasks=2, which the
    user never typed."""
    cmd = [sys.executable, "-m", "gainlora.run", "experiment=demo", "debug=cpu_tiny", "benchmark.tasks=[demo_colour]",
           f"paths.runs_dir={tmp_path}"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        "error: benchmark.num_tasks=2: 1 to 1 (the stream has demo_colour), or null for all (debug=cpu_tiny sets "
        "benchmark.num_tasks; override it on the command line)"], done.stderr
    assert not any(tmp_path.iterdir())


def test_entry_point_prints_one_line_error(tmp_path):
    cmd = [sys.executable, "-m", "gainlora.run", *TINY, *DEMO, f"paths.runs_dir={tmp_path}", "lora.rank=0"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == "error: lora.rank=0: should be greater than 0"


@pytest.mark.slow
def test_nan_loss_stops_the_task_and_keeps_finished_ones(tmp_path, monkeypatch, capsys):
    from gainlora.model.module import ContinualLM

    cfg = config(tmp_path, *DEMO, "benchmark.num_tasks=2", "run_id=poisoned")
    forward = ContinualLM.forward

    def poisoned(self, batch):  # an injected fault: the second task's loss turns NaN
        loss = forward(self, batch)
        return loss * float("nan") if self.current_task == 1 else loss

    monkeypatch.setattr(ContinualLM, "forward", poisoned)
    with pytest.raises(SystemExit) as done:
        main(cfg)  # the entry point: one line, exit code 2
    run_dir = tmp_path / "runs" / "demo" / "poisoned"
    assert done.value.code == 2
    assert re.fullmatch(rf"error: {run_dir}/results.json: non-finite loss \(nan\) in task 2 at step \d+; .*",
                        capsys.readouterr().err.strip().splitlines()[-1])
    assert (run_dir / "tasks" / "01-demo_colour" / "DONE").is_file()
    assert not (run_dir / "tasks" / "02-demo_parity").exists()
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"].startswith("failed: FloatingPointError") and len(results["matrix"]) == 1


@pytest.mark.slow
def test_resume_refuses_artifacts_of_another_shape(tmp_path):
    run(config(tmp_path, *DEMO, "run_id=shape", "benchmark.num_tasks=2", "trainer.max_steps=1"))
    branch = tmp_path / "runs" / "demo" / "shape" / "tasks" / "01-demo_colour" / "branch.safetensors"
    save_file({"encoder.block.0.layer.0.SelfAttention.q.A": torch.zeros(2, 2)}, str(branch))
    saved = (branch.parents[2] / "config.yaml").read_text()
    with pytest.raises(ValueError, match="01-demo_colour/branch.safetensors: does not match its checksum"):
        run(config(tmp_path, *DEMO, "run_id=shape", "benchmark.num_tasks=2", "trainer.max_steps=1", "resume=true"))
    # the failed resume left the run as it was (config.yaml was rewritten before the tasks were verified)
    assert (branch.parents[2] / "config.yaml").read_text() == saved


# -- refused before anything is written -----------------------------------------------------------------
@pytest.mark.parametrize("override, fragment", [
    ("generation.num_beams=0", "generation.num_beams=0: should be greater than 0"),
    ("backbone.max_new_tokens=0", "backbone.max_new_tokens=0: should be greater than 0"),
    ("benchmark.num_tasks=0", "benchmark.num_tasks=0: should be greater than 0 or null"),
    ("run_id=../escape", "run_id=../escape: a name"),
    ("lora.dropout=-0.5", "lora.dropout=-0.5: should be greater than or equal to 0"),
])
def test_refused_before_anything_is_written(override, fragment, tmp_path):
    with pytest.raises(ValueError, match=f"^{re.escape(fragment)}"):
        run(config(tmp_path, *DEMO, override))
    assert not (tmp_path / "runs").exists() and not (tmp_path / "escape").exists()


def test_unwritable_runs_dir_is_refused_before_the_backbone_loads(tmp_path, monkeypatch):
    import gainlora.build

    monkeypatch.setattr(gainlora.build, "load_backbone", lambda *a, **k: pytest.fail("backbone loaded"))
    (tmp_path / "file").write_text("")
    cfg = config(tmp_path, *DEMO, f"paths.runs_dir={tmp_path / 'file' / 'runs'}")
    with pytest.raises(ValueError, match=r"^paths.runs_dir=.*/file/runs: a writable directory"):
        run(cfg)


def test_a_cache_folder_that_cannot_be_one_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    import gainlora.build

    monkeypatch.setattr(gainlora.build, "load_backbone", lambda *a, **k: pytest.fail("backbone loaded"))
    (tmp_path / "file").write_text("")
    cfg = config(tmp_path, *DEMO, f"paths.cache_dir={tmp_path / 'file'}")
    with pytest.raises(ValueError, match=rf"^paths.cache_dir={re.escape(str(tmp_path / 'file'))}: a folder for the "
                                         r"tiny backbones \(.*file is not a directory\)"):
        run(cfg)
    assert not (tmp_path / "runs").exists()


def test_a_model_folder_without_weights_or_tokenizer_is_refused_before_anything_is_written(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text('{"model_type": "t5"}')
    cfg = config(tmp_path, *DEMO, "backbone.tiny=null", f"+backbone.name_or_path={tmp_path / 'model'}")
    with pytest.raises(ValueError, match=r"^backbone.name_or_path=.*/model: a model directory with its weights"):
        run(cfg)  # was from_pretrained's OSError traceback, after the run directory was made
    (tmp_path / "model" / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match=r"^backbone.name_or_path=.*/model: a model directory with its tokenizer"):
        run(cfg)  # T5's AutoTokenizer made a 104-token one: every word <unk>, a run without error or sense
    assert not (tmp_path / "runs").exists()


def test_a_backbone_without_q_and_v_projections_is_named() -> None:
    """An architecture whose attention has no q/v linears to adapt (an encoder-only model) is one
    line naming the key, not a ValueError traceback."""
    from types import SimpleNamespace

    from gainlora.build import check_rank

    with pytest.raises(ValueError, match=r"^backbone.name_or_path=org/bert: no q/v projections found in Linear"):
        check_rank(8, SimpleNamespace(model=torch.nn.Linear(4, 4), kind="causal"), "org/bert")


@pytest.mark.parametrize("lengths, line", [
    ((400, 16, 8), None),
    ((400, 16, 200), "backbone.max_new_tokens=200: at most 112 (the backbone's 512 positions less "
                     "backbone.max_source_length 400: the prompt and the answer share them)"),
    ((500, 16, 8), "backbone.max_target_length=16: at most 12 (the backbone's 512 positions"),
    ((512, 16, 8), "backbone.max_source_length=512: at most 511 (the backbone's 512 positions hold the prompt and "
                   "the answer)"),
])
def test_a_decoder_only_backbone_holds_prompt_and_answer_in_its_positions(lengths, line) -> None:
    from types import SimpleNamespace

    from gainlora.build import check_lengths

    backbone = SimpleNamespace(model=SimpleNamespace(config=SimpleNamespace(max_position_embeddings=512)),
                               kind="causal")
    cfg = dict(zip(("max_source_length", "max_target_length", "max_new_tokens"), lengths))
    if line is None:
        check_lengths(cfg, backbone)
        return
    with pytest.raises(ValueError, match=f"^{re.escape(line)}"):
        check_lengths(cfg, backbone)


@pytest.mark.parametrize("offline", ["1", ""])
def test_an_uncached_backbone_fails_fast_with_the_cpu_route(offline, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", offline)
    monkeypatch.setenv("HF_ENDPOINT", "https://127.0.0.1:9")  # nothing listens: as without network
    cfg = config(tmp_path, *DEMO, "backbone.tiny=null", "+backbone.name_or_path=gainlora-test/not-cached")
    started = time.time()
    with pytest.raises(ValueError, match=r"^backbone.name_or_path=gainlora-test/not-cached: not in the Hugging "
                                         r"Face cache .* debug=cpu_tiny"):
        run(cfg)
    assert time.time() - started < 5
    assert not (tmp_path / "runs").exists()


# -- loading runs nothing -------------------------------------------------------------------------------
class Payload:
    """Unpickling this creates the marker file: what a crafted run directory would smuggle in."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


CRAFTED = {
    "torch.load": lambda pickled, marker: {"f": str(pickled), "weights_only": False},
    "numpy.load": lambda pickled, marker: {"file": str(pickled), "allow_pickle": True},
    "os.system": lambda pickled, marker: {"command": f"touch {marker}"},
    "builtins.exec": lambda pickled, marker: {"source": f"open({str(marker)!r}, 'w')"},
}


def crafted_run(tmp_path: Path, target: str) -> tuple[Path, Path]:
    """A one-task run directory whose config.yaml names ``target`` as the method."""
    import pickle

    from omegaconf import OmegaConf

    marker, pickled = tmp_path / "marker", tmp_path / "payload.pkl"
    pickled.write_bytes(pickle.dumps(Payload(marker)))
    root = tmp_path / "runs" / "demo" / "crafted"
    cfg = config(tmp_path, *DEMO, "run_id=crafted")
    cfg.paths.run_dir = str(root)
    saved = OmegaConf.to_container(cfg, resolve=True)
    saved["method"] = {"_target_": target, **CRAFTED[target](pickled, marker)}
    root.mkdir(parents=True)
    (root / "config.yaml").write_text(OmegaConf.to_yaml(saved))
    (root / "results.json").write_text(json.dumps({"tasks": ["demo_colour"], "status": "interrupted"}))
    return root, marker


@pytest.mark.parametrize("target", list(CRAFTED))
def test_load_run_and_resume_run_nothing_a_config_names(target, tmp_path):
    import gainlora

    root, marker = crafted_run(tmp_path, target)
    with pytest.raises(ValueError, match=rf"config.yaml: method._target_={re.escape(target)}: not one of the project.s methods"):
        gainlora.load_run(root)
    with pytest.raises(ValueError, match=rf"config.yaml: method._target_={re.escape(target)}: not one of"):
        run(config(tmp_path, *DEMO, "run_id=crafted", "resume=true"))
    assert not marker.exists()


def test_load_run_names_a_model_folder_that_is_gone(tmp_path):
    """A run trained on a local model folder, since moved: load_run (predict, export) says so in one line
    (it was an OSError traceback from from_pretrained, which took the path for a hub name)."""
    import gainlora
    from omegaconf import OmegaConf

    root = tmp_path / "runs" / "demo" / "moved"
    root.mkdir(parents=True)
    cfg = config(tmp_path, *DEMO, "run_id=moved", "backbone.tiny=null", f"+backbone.name_or_path={tmp_path / 'gone'}")
    cfg.paths.run_dir = str(root)
    (root / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    (root / "results.json").write_text(json.dumps({"tasks": ["demo_colour"], "status": "finished"}))
    with pytest.raises(ValueError, match=rf"^{re.escape(str(root / 'config.yaml'))}: backbone.name_or_path="
                                         rf"{re.escape(str(tmp_path / 'gone'))}: a model directory"):
        gainlora.load_run(root)


def test_a_run_is_found_under_home(tmp_path, monkeypatch):
    """load_run("~/runs/...") (predict, export) reads the run under the home folder (was "not a run directory")."""
    from gainlora.api import read_run

    root = tmp_path / "runs" / "demo" / "r"
    root.mkdir(parents=True)
    (root / "config.yaml").write_text("seed: 0\n")
    (root / "results.json").write_text(json.dumps({"tasks": ["demo_colour"]}))
    monkeypatch.setenv("HOME", str(tmp_path))
    assert read_run("~/runs/demo/r")[0].root == root


def test_resume_of_a_crafted_run_from_the_command_line(tmp_path):
    root, marker = crafted_run(tmp_path, "os.system")
    cmd = [sys.executable, "-m", "gainlora.run", *TINY, *DEMO, f"paths.runs_dir={tmp_path / 'runs'}",
           "run_id=crafted", "resume=true"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(
        f"error: {root / 'config.yaml'}: method._target_=os.system: not one of the project's methods")
    assert not marker.exists()


# -- failures during the run: one line, exit code 2 -------------------------------------------------------
@pytest.mark.parametrize("wrapped", [False, True])
def test_disk_full_names_the_path(wrapped, tmp_path, monkeypatch, capsys):
    import errno

    import gainlora.run

    def full(path, text):
        if wrapped:  # as safetensors reports it: text only, no errno, no file name
            raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(gainlora.run, "write_text", full)
    with pytest.raises(SystemExit) as done:
        gainlora.run.main(config(tmp_path, *DEMO, "run_id=full"))
    assert done.value.code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    run_dir = tmp_path / "runs" / "demo" / "full"
    assert line == (f"error: {run_dir if wrapped else run_dir / 'config.yaml'}: no space left on device; "
                    "finished tasks are kept, free some space and resume with resume=true")


@pytest.mark.parametrize("args, fragment", [
    (["lora.rnak=4"], "error: lora.rnak=4: unknown key (a typo?); to add a new key use +lora.rnak=4"),
    (["experiment=demo", "method.lam=-1"], "error: method.lam=-1: unknown key"),
    (["method=nosuch"], "error: method=nosuch: one of clora, "),
    (["lora.rank=4", "lora.rank=["], "error: lora.rank=[: not an override Hydra can parse (no viable alternative at input '[')"),
    (["experiment=cpu_long", "benchmark.carve={yelp:train}"],
     "error: benchmark.carve={yelp:train}: benchmark.carve holds dbpedia; add one with +benchmark.carve.NAME=VALUE, "
     "drop one with ~benchmark.carve.NAME"),
    (["--config-name", "nosuch"], "error: --config-name: not supported; runs compose conf/config.yaml"),
    (["-cp=/x", "seed=1"], "error: -cp: not supported; runs compose conf/config.yaml"),
    (["-cd", "/nonexistent", "seed=1"], "error: -cd=/nonexistent: not a folder"),
    (["seed=1", "--config-dir"], "error: --config-dir=: not a folder"),
    # a config group set to null was Hydra's ValueError traceback
    (["logger=null"], "error: logger=null: one of csv, wandb (a config group takes an option's name)"),
    (["-m", "--cfg", "job", "seed=0,1"], "error: -m and --cfg: one of --multirun, --cfg, --info, --run, "
                                         "--shell-completion at a time"),
    # composed conf/config.yaml as an experiment: "In 'experiment/../conf/config': Could not find ..."
    (["experiment=../conf/config"], "error: experiment=../conf/config: one of cpu_long, custom_tasks, demo, "),
    # Hydra made it before main: a FileNotFoundError traceback, exit 1
    (["hydra.run.dir=/proc/gainlora"], "error: hydra.run.dir=/proc/gainlora: /proc cannot be written"),
    # read "Could not override 'recipe'. No match in the defaults list.; To append ..."
    (["recipe=t5_long"], "error: recipe=t5_long: recipe is not in the defaults list; add it with +recipe=NAME (one "
                         "of llama_superni, t5_long, t5_superni)"),
])
def test_a_bad_override_is_one_line_and_exit_2(args, fragment, monkeypatch, capsys) -> None:
    """Hydra's own override errors (before main runs) also end in one `error:` line, exit 2."""
    monkeypatch.setattr(sys, "argv", ["gainlora.run", *args])
    with pytest.raises(SystemExit) as stopped:
        gainlora.run.cli()
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and err.startswith(fragment) and err.count("\n") == 1, err


def test_an_error_line_is_one_line_whatever_the_message_carries(capsys) -> None:
    """A path or a library message with a line break still gives one ``error:`` line."""
    from gainlora.cli import error_line

    assert error_line("paths.runs_dir=/tmp/a\nb: a writable directory\r") == 2
    assert capsys.readouterr().err == "error: paths.runs_dir=/tmp/a\\nb: a writable directory\\r\n"


# -- a run directory whose config.yaml was edited to another method -----------------------------------------
def test_a_config_edited_to_another_method_is_refused(tmp_path, t5_backbone):
    """results.json names the method that trained the tasks: a config.yaml building another one is
    refused by load_run and by resume, and a gate file under a gate-free method is an error."""
    import functools

    import gainlora
    from gainlora.loop import check_shapes
    from gainlora.model.module import ContinualLM
    from omegaconf import OmegaConf

    root = tmp_path / "runs" / "demo" / "edited"
    root.mkdir(parents=True)
    cfg = config(tmp_path, *DEMO, "run_id=edited", "method=seqlora")
    cfg.paths.run_dir = str(root)
    (root / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    (root / "results.json").write_text(json.dumps({"tasks": ["demo_colour"], "method": "gainlora_inflora",
                                                   "status": "interrupted"}))
    with pytest.raises(ValueError, match=r"config.yaml: its method builds seqlora, but .*results.json says the run "
                                         r"trained gainlora_inflora"):
        gainlora.load_run(root)
    with pytest.raises(ValueError, match=r"config.yaml: its method builds seqlora, but"):
        run(config(tmp_path, *DEMO, "run_id=edited", "method=seqlora", "resume=true"))
    module = ContinualLM(t5_backbone(), rank=2, optimizer=functools.partial(torch.optim.AdamW, lr=1e-3))
    branch = {f"{name}.{part}": torch.zeros(shape) for name, layer in module.adapted.items()
              for part, shape in (("A", (2, layer.in_features)), ("B", (layer.out_features, 2)))}
    check_shapes(module, {"branch": branch, "gate": {}}, 0)
    with pytest.raises(ValueError, match=r"task 1 gate.safetensors: a gate, but this config's method has none"):
        check_shapes(module, {"branch": branch, "gate": {"G1": torch.zeros(3, 3)}}, 0)


@pytest.mark.parametrize("damage, fragment", [
    ("pickle", "UnpicklingError: Weights only load failed"),
    ("raw pickle", "RuntimeError: mmap can only be used with files saved with"),
    ("truncated", "RuntimeError: PytorchStreamReader failed"),
    ("folder", "IsADirectoryError"),
])
def test_an_unreadable_in_task_checkpoint_is_refused_without_running_it(damage, fragment, tmp_path):
    """A resumed task's last.ckpt is loaded as Lightning would (weights_only) before fit: a crafted
    pickle, a truncated file or a folder is one error naming it, and nothing in it runs."""
    import pickle
    from types import SimpleNamespace

    from gainlora.artifacts import RunDir
    from gainlora.loop import ContinualLoop

    run_dir, marker = RunDir(tmp_path / "run"), tmp_path / "marker"
    last = run_dir.checkpoint_dir(0, "a") / "last.ckpt"
    last.parent.mkdir(parents=True)
    torch.save({"state_dict": {"w": torch.ones(2)}, "loops": {}}, last)
    loop = SimpleNamespace(checkpoint={"every_n_train_steps": 2}, run_dir=run_dir, module=None)
    assert ContinualLoop.in_task_checkpoint(loop, 0, "a")[1] == last  # a sound one is used
    if damage == "pickle":  # torch's own format around a payload that runs a command when unpickled
        torch.save({"state_dict": Payload(marker)}, last)
    elif damage == "raw pickle":
        last.write_bytes(pickle.dumps({"state_dict": Payload(marker)}))
    elif damage == "truncated":
        last.write_bytes(last.read_bytes()[:200])
    else:
        last.unlink()
        last.mkdir()
    with pytest.raises(ValueError, match=rf"^{re.escape(str(last))}: not a readable checkpoint \({fragment}.*\); "
                                         r"delete it to restart task 1 from its beginning$"):
        ContinualLoop.in_task_checkpoint(loop, 0, "a")
    assert not marker.exists()


@pytest.mark.parametrize("alter, fragment", [
    (lambda t: t * float("nan"), "is not finite floating-point weights (torch.float32)"),
    (lambda t: t.to(torch.int64), "is not finite floating-point weights (torch.int64)"),
])
def test_restored_branches_must_be_finite_floats(alter, fragment, t5_backbone):
    """A branch file rewritten with its checksums recomputed still has to hold weights training writes."""
    import functools

    from gainlora.loop import check_shapes
    from gainlora.model.module import ContinualLM

    module = ContinualLM(t5_backbone(), rank=2, optimizer=functools.partial(torch.optim.AdamW, lr=1e-3))
    branch = {f"{name}.{part}": torch.ones(shape) for name, layer in module.adapted.items()
              for part, shape in (("A", (2, layer.in_features)), ("B", (layer.out_features, 2)))}
    check_shapes(module, {"branch": branch}, 0)
    first = sorted(branch)[0]
    with pytest.raises(ValueError, match=rf"^task 1 branch.safetensors: {re.escape(first)} {re.escape(fragment)}"):
        check_shapes(module, {"branch": {**branch, first: alter(branch[first])}}, 0)


@pytest.mark.parametrize("args, line", [
    (["-m", "lora.rank=4,0"], "error: lora.rank=0: should be greater than 0 (sweep job 2 of 2)"),
    (["lora.rank=4,0", "-m"], "error: lora.rank=0: should be greater than 0 (sweep job 2 of 2)"),  # flag last
    (["-m", "lora.rnak=2,4"], "error: lora.rnak=2: unknown key (a typo?); to add a new key use +lora.rnak=2"),
    (["-m", "seed=0,1", "method.depth=1,0"], "error: method.depth=0: should be greater than or equal to 1 "
                                              "(sweep job 2 of 4)"),
    (["-m", "run_id=same", "seed=0,1"], "error: run_id=same: one run directory per sweep job (jobs 1 and 2 would "
                                        "both write it); leave run_id unset or sweep it"),
    # Hydra's own interpolations resolve in the check as in the launched job (they failed with "HydraConfig
    # was not set" before): here both jobs' run_id is "demo".
    (["-m", "run_id=${hydra:runtime.choices.experiment}", "seed=0,1"],
     "error: run_id=demo: one run directory per sweep job (jobs 1 and 2 would both write it); leave run_id unset "
     "or sweep it"),
    (["-m", "lora.rank=interval(1,2)"], "error: lora.rank=interval(1,2): Can only enumerate CHOICE and RANGE sweeps, "
                                        "type is ValueType.INTERVAL_SWEEP; the basic sweeper takes choices (a,b,c) "
                                        "and range(start,stop)"),
    (["-m", "method=glob(nosuch*)"], "error: method=glob(nosuch*): matches none of method's options (clora, epi, "),
    (["-m", "method=glob(seqlora*)", "lora.rank=0"], "error: lora.rank=0: should be greater than 0 (sweep job 1 of 2)"),
    (["-m", "seed=range(0,0)"], "error: seed=range(0,0): a sweep of no values (an empty range?)"),
    (["-m", "seed=0,1", "hydra.sweep.dir=/proc/x/y"], "error: hydra.sweep.dir=/proc/x/y: /proc cannot be written "
                                                      "(No such file or directory)"),
])
def test_a_sweep_with_one_bad_job_fails_before_any_job_runs(args, line, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(sys, "argv", ["gainlora.run", *TINY, f"paths.runs_dir={tmp_path / 'runs'}", *args])
    monkeypatch.setattr(gainlora.run, "main", lambda: pytest.fail("a job was launched"))
    with pytest.raises(SystemExit) as stopped:
        gainlora.run.cli()
    err = capsys.readouterr().err.strip().splitlines()
    assert stopped.value.code == 2 and len(err) == 1 and err[0].startswith(line), err
    assert not (tmp_path / "runs").exists()


def test_a_restored_task_survives_an_unreadable_results_json(tmp_path) -> None:
    """results.json is rewritten from the verified tasks on resume: garbage in it costs one count."""
    from gainlora.artifacts import RunDir
    from gainlora.observers import ResultsWriter, TaskEnd

    (tmp_path / "results.json").write_text("{bad")
    writer = ResultsWriter(RunDir(tmp_path), module=object())
    writer.count_trainable(TaskEnd(0, tmp_path / "tasks" / "01-a", {"tasks": ["a"]}, restored=True))
    assert writer.trainable == {"a": None}


def test_each_run_of_one_process_logs_to_its_own_wandb_run(tmp_path, monkeypatch) -> None:
    """A multirun's jobs share one process: Lightning's finalize left the W&B run open and the next
    job's logger reused it (its metrics went into the first job's run, its folder had no wandb/)."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)
    for seed in (0, 1):
        run(config(tmp_path, *DEMO, "logger=wandb", f"run_id=s{seed}", f"seed={seed}", "trainer.max_steps=1"))
    for seed in (0, 1):
        run_dir = tmp_path / "runs" / "demo" / f"s{seed}"
        wandb_id = (run_dir / "wandb_id.txt").read_text().strip()
        assert list((run_dir / "wandb").glob(f"offline-run-*-{wandb_id}")), f"s{seed} logged to no W&B run of its own"


@pytest.mark.parametrize("args, line", [
    (["--repeats", "0"], "error: --repeats=0: a positive integer"),  # statistics' 'no median' traceback
    (["--threads", "0"], "error: --threads=0: a positive integer"),  # torch's set_num_threads traceback
    (["--warmup", "-1"], "error: --warmup=-1: an integer >= 0"),
    (["--variants", "gainlora_1,bogus"], "error: --variants=gainlora_1,bogus: a comma list of lora_1, "),  # KeyError
    (["--sections", "steps,"], "error: --sections=steps,: a comma list of steps, "),
    # found out when the first section's results were saved, minutes in
    (["--out", "/proc/gainlora/b.json"], "error: --out=/proc/gainlora/b.json: /proc cannot be written"),
])
def test_the_bench_refuses_bad_arguments_in_one_line(args, line, capsys, monkeypatch) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("run_bench", ROOT / "bench" / "run_bench.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "run_bench", bench)  # its dataclasses look their module up
    spec.loader.exec_module(bench)
    with pytest.raises(SystemExit) as stopped:
        bench.parse_args(args)
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and err.startswith(line) and err.count("\n") == 1, err


@pytest.mark.parametrize("script, args, line", [
    # the figures were written, and the baseline read, after the whole 15-task run: a traceback lost them
    ("fifteen_tasks.py", ["--out", "/proc/gainlora/f.json"], "error: --out=/proc/gainlora/f.json: /proc cannot be "
                                                             "written"),
    ("fifteen_tasks.py", ["--out", "{tmp}/f.json", "--baseline", "{tmp}/none.json"],
     "error: --baseline={tmp}/none.json: a JSON file an earlier --out wrote"),
    ("fifteen_tasks.py", ["--out", "{tmp}/f.json", "--baseline", "{tmp}/f.json"], None),  # f.json: written below
    ("gpu_check.py", ["--out", "/proc/gainlora/g.json"], "error: --out=/proc/gainlora/g.json: /proc cannot be written"),
    ("gpu_check.py", ["--bogus"], "error: --bogus: unknown arguments; see bench/gpu_check.py --help"),
])
def test_the_other_bench_scripts_check_their_arguments_first(script, args, line, tmp_path, capsys,
                                                             monkeypatch) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location(script[:-3], ROOT / "bench" / script)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, script[:-3], module)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "run", lambda *a, **k: pytest.fail("the run started"), raising=False)
    if line is None:  # a JSON file that is not an earlier --out
        (tmp_path / "f.json").write_text('{"summary": {}}')
        line = "error: --baseline={tmp}/f.json: not a JSON file an earlier --out wrote (needs label and summary."
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    try:
        code = module.main(args)
    except SystemExit as stopped:
        code = stopped.code
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(line.replace("{tmp}", str(tmp_path))) and err.count("\n") == 1, err
