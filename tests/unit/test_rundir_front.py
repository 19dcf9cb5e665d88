"""Run-directory claims (gainlora.rundir): one writer per directory, with the holder named and a
killed holder's lock recovered; resume only of an existing run, the latest modified unfinished one
by default; directories that hold another run, or tasks without a config, are never reused; a
saved config naming foreign code is refused; a failed start leaves nothing behind."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from filelock import FileLock
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from gainlora.artifacts import ArtifactError
from gainlora.rundir import HOLDER, LOCK, claim_run_dir
from gainlora.run import CONF_DIR
from gainlora.schema import ConfigError

SRC = Path(__file__).resolve().parents[2] / "src"


def cfg_of(tmp_path: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=["experiment=demo", f"paths.runs_dir={tmp_path}", *overrides])


def saved_run(tmp_path: Path, run_id: str, status: str | None = None, *overrides: str) -> Path:
    """A run directory as a run leaves it: config.yaml (and results.json with ``status``)."""
    root = tmp_path / "demo" / run_id
    root.mkdir(parents=True)
    cfg = cfg_of(tmp_path, f"run_id={run_id}", *overrides)
    cfg.paths.run_dir = str(root)
    (root / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    if status is not None:
        (root / "results.json").write_text(json.dumps({"status": status}))
    return root


def hold_lock(root: Path) -> subprocess.Popen:
    """Another process holding the run's lock (as a running run does)."""
    code = ("import sys, time; from pathlib import Path; from gainlora.rundir import RunLock; "
            "lock = RunLock(Path(sys.argv[1])); lock.acquire(); print('held', flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(root)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(SRC)})
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_fresh_run_dir_is_created_locked_and_released(tmp_path):
    with claim_run_dir(cfg := cfg_of(tmp_path, "run_id=r")) as run_dir:
        assert run_dir.root == tmp_path / "demo" / "r" and cfg.paths.run_dir == str(run_dir.root)
        holder = json.loads((run_dir.root / HOLDER).read_text())
        assert holder["pid"] == os.getpid()
        run_dir.config.write_text("x: 1\n")
    assert not (run_dir.root / HOLDER).exists()
    FileLock(run_dir.root / LOCK).acquire(timeout=0)  # released with the claim


def test_a_second_writer_is_refused_naming_the_holder_and_a_killed_holder_is_recovered(tmp_path):
    root = tmp_path / "demo" / "busy"
    root.mkdir(parents=True)
    proc = hold_lock(root)
    try:
        with pytest.raises(ConfigError, match=rf"{root}: in use by pid {proc.pid} on host \S+ since "):
            with claim_run_dir(cfg_of(tmp_path, "run_id=busy")):
                pytest.fail("claimed a directory another process holds")
    finally:
        os.kill(proc.pid, signal.SIGKILL)  # no chance to release: the OS drops its lock
        proc.wait()
    assert (root / LOCK).exists() and (root / HOLDER).exists()  # what the killed process left
    with claim_run_dir(cfg_of(tmp_path, "run_id=busy")) as run_dir:
        assert json.loads((run_dir.root / HOLDER).read_text())["pid"] == os.getpid()


def test_a_directory_holding_a_run_is_refused_without_resume(tmp_path):
    saved_run(tmp_path, "done", "finished")
    with pytest.raises(ConfigError, match="^run_id=done: a new name: .* already holds a run"):
        with claim_run_dir(cfg_of(tmp_path, "run_id=done")):
            pass


@pytest.mark.parametrize("resume", ["false", "true"])
def test_tasks_without_a_config_are_never_reused(tmp_path, resume):
    (tmp_path / "demo" / "orphan" / "tasks" / "01-demo_colour").mkdir(parents=True)
    fragment = "holds tasks but no config.yaml" if resume == "false" else "resume=true needs an existing run"
    with pytest.raises(ConfigError, match=fragment):
        with claim_run_dir(cfg_of(tmp_path, "run_id=orphan", f"resume={resume}")):
            pass
    assert (tmp_path / "demo" / "orphan" / "tasks" / "01-demo_colour").is_dir()


def test_resume_of_a_missing_run_is_an_error_and_creates_nothing(tmp_path):
    with pytest.raises(ConfigError, match="^run_id=nosuch: resume=true needs an existing run"):
        with claim_run_dir(cfg_of(tmp_path, "run_id=nosuch", "resume=true")):
            pass
    assert not (tmp_path / "demo").exists()


def test_resume_without_run_id_takes_the_most_recently_modified_unfinished_run(tmp_path, capsys):
    now = time.time()
    for name, status, age in [("a-finished", "finished", 0), ("b-newest", "running", 10),
                              ("c-older", "interrupted", 500), ("d-nostatus", None, 1000)]:
        root = saved_run(tmp_path, name, status)
        for path in [root, *root.iterdir()]:
            os.utime(path, (now - age, now - age))
    (tmp_path / "demo" / "e-noconfig").mkdir()  # newest, but not a run
    with claim_run_dir(cfg := cfg_of(tmp_path, "resume=true")) as run_dir:
        assert run_dir.root.name == "b-newest" == cfg.run_id  # not the last by name (d-nostatus)
    assert "resuming" in capsys.readouterr().out and "b-newest" in run_dir.root.name


def test_resume_without_run_id_and_nothing_unfinished_is_an_error(tmp_path):
    saved_run(tmp_path, "a", "finished")
    with pytest.raises(ConfigError, match="^resume=true: needs an unfinished run under"):
        with claim_run_dir(cfg_of(tmp_path, "resume=true")):
            pass


def test_resume_refuses_another_config(tmp_path):
    saved_run(tmp_path, "r", "interrupted", "lora.rank=4")
    with pytest.raises(ConfigError, match="differing keys: lora.rank: 4 -> 8"):
        with claim_run_dir(cfg_of(tmp_path, "run_id=r", "resume=true")):
            pass


@pytest.mark.parametrize("target", ["torch.load", "numpy.load", "os.system"])
def test_resume_refuses_a_saved_config_naming_foreign_code(tmp_path, target):
    root = saved_run(tmp_path, "crafted", "interrupted")
    saved = OmegaConf.load(root / "config.yaml")
    saved.method = {"_target_": target, "command": f"touch {tmp_path / 'marker'}"}
    (root / "config.yaml").write_text(OmegaConf.to_yaml(saved))
    with pytest.raises(ConfigError, match=f"config.yaml: method._target_={target}: not one of the project's methods"):
        with claim_run_dir(cfg_of(tmp_path, "run_id=crafted", "resume=true")):
            pass
    assert not (tmp_path / "marker").exists()


@pytest.mark.parametrize("text, fragment", [
    ("- a\n- b\n", "config.yaml: not a run config (a mapping of sections)"),
    ("evil: !!python/object/apply:os.system [\"touch {marker}\"]\n", "config.yaml: not a readable config"),
    ("lora: {rank: 8\n", "config.yaml: not a readable config"),
    (b"\x7fELF\x02\x01\x00\xff\xfe", "config.yaml: not a readable config"),
    ("", "config.yaml: exp_name=<missing>: required"),
    ("a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(f"{c}: &{c} [" + ", ".join([f"*{p}"] * 9) + "]\n" for p, c in
     zip("abcdefgh", "bcdefghi")), "config.yaml: not a readable config (a YAML alias"),  # it filled memory
    ("seed: ${oc.env:HOME}\n", "config.yaml: not a readable config (an interpolation"),
])
def test_resume_refuses_a_saved_config_that_is_no_run_config(tmp_path, text, fragment):
    root = saved_run(tmp_path, "r", "interrupted")
    marker = tmp_path / "marker"
    if isinstance(text, bytes):
        (root / "config.yaml").write_bytes(text)
    else:
        (root / "config.yaml").write_text(text.replace("{marker}", str(marker)))
    with pytest.raises(ConfigError, match=f"^{re.escape(str(root / fragment))}"):
        with claim_run_dir(cfg_of(tmp_path, "run_id=r", "resume=true")):
            pass
    assert not marker.exists()


def test_a_lock_that_cannot_be_taken_names_its_path(tmp_path):
    root = saved_run(tmp_path, "r", "interrupted")
    (root / LOCK).mkdir()
    with pytest.raises(ArtifactError, match=f"^{re.escape(str(root / LOCK))}: not a file; move it away"):
        with claim_run_dir(cfg_of(tmp_path, "run_id=r", "resume=true")):  # was blamed on paths.runs_dir
            pass
    assert (root / LOCK).is_dir()


def test_a_failed_start_leaves_no_directory(tmp_path):
    with pytest.raises(RuntimeError):
        with claim_run_dir(cfg_of(tmp_path, "run_id=short")):
            raise RuntimeError("backbone failed to load")
    assert not (tmp_path / "demo").exists()  # nor the parents it created


def test_an_unwritable_runs_dir_is_refused(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match=rf"^paths.runs_dir={tmp_path}/file/runs: a writable directory"):
        with claim_run_dir(cfg_of(tmp_path, f"paths.runs_dir={tmp_path}/file/runs", "run_id=x")):
            pass


def test_resume_refuses_changed_task_data_and_another_code_version(tmp_path):
    """A custom task's file edited under the same path, or another gainlora version, is not resumed."""
    from gainlora.build import derive_batching
    from gainlora.data.tasks import load_stream
    from gainlora.rundir import record_inputs

    task = tmp_path / "data" / "t1"
    task.mkdir(parents=True)

    def write(output: str) -> None:
        rows = "".join(json.dumps({"instruction": "Copy.", "input": f"w{i}", "output": output}) + "\n" for i in range(6))
        (task / "train.jsonl").write_text(rows)
        (task / "test.jsonl").write_text(rows)

    def started(*extra: str):
        cfg = cfg_of(tmp_path, "benchmark=custom", f"benchmark.tasks=[{task}]", "run_id=r", *extra)
        derive_batching(cfg)
        record_inputs(cfg, load_stream(cfg.benchmark, seed=cfg.seed))
        return cfg

    write("a")
    with claim_run_dir(cfg := started()) as run_dir:
        run_dir.config.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    write("b")
    with pytest.raises(ConfigError, match=r"^resume=true: the data .*; task t1's examples changed since"):
        with claim_run_dir(started("resume=true")):
            pass
    write("a")
    with claim_run_dir(started("resume=true")):  # the same data again: resumes
        pass
    saved = OmegaConf.load(run_dir.config)
    saved.derived.code_version = "0.0.1"
    run_dir.config.write_text(OmegaConf.to_yaml(saved))
    with pytest.raises(ConfigError, match=r"^resume=true: the gainlora version that made .* \(0\.0\.1\)"):
        with claim_run_dir(started("resume=true")):
            pass


@pytest.mark.parametrize("damage, reason", [
    (lambda p: p.write_bytes(b"garbage\x00\xff\n"), "'utf-8' codec can't decode byte 0xff"),
    (lambda p: p.mkdir(), "Is a directory"),
    (lambda p: p.write_text("a,b\n1,2\n3,4,5\n"), "line 3 is longer than the header"),  # e.g. a link to /etc/passwd
])
def test_resume_refuses_a_metrics_file_it_cannot_append_to(tmp_path, damage, reason):
    """metrics.csv is read back and rewritten on resume: damaged, it is named before anything is restored
    (it was a traceback after the finished tasks had been re-announced, and results.json said failed)."""
    root = saved_run(tmp_path, "r", "interrupted")
    damage(root / "metrics.csv")
    with pytest.raises(ArtifactError, match=rf"^{re.escape(str(root / 'metrics.csv'))}: not a readable metrics file "
                                            rf"\({re.escape(reason)}.*\); move it away to continue"):
        with claim_run_dir(cfg_of(tmp_path, "run_id=r", "resume=true")):
            pytest.fail("claimed")
    assert json.loads((root / "results.json").read_text()) == {"status": "interrupted"}


def test_a_numeric_experiment_name_is_a_folder_name(tmp_path):
    """exp_name=123 passes as a name; it was a TypeError traceback joining it to the runs folder."""
    with claim_run_dir(cfg_of(tmp_path, "exp_name=123", "run_id=456")) as run_dir:
        assert run_dir.root == tmp_path / "123" / "456"


def test_a_runs_folder_under_home_is_expanded(tmp_path, monkeypatch):
    """GAINLORA_RUNS='~/runs' (quoted, so no shell expands it): the run goes under the home folder; it made a
    folder named '~' in the working directory, with stray folders under the home one."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    with claim_run_dir(cfg_of(tmp_path, "paths.runs_dir='~/runs'", "run_id=r")) as run_dir:
        assert run_dir.root == tmp_path / "home" / "runs" / "demo" / "r" and run_dir.root.is_dir()
    assert not (tmp_path / "~").exists()


def test_runs_started_in_the_same_second_get_folders_of_their_own(tmp_path, monkeypatch):
    """A generated id is created exclusively: another run that makes the same <stamp> folder between
    this run choosing it and creating it (two runs started together) leaves this one <stamp>-2; a
    check-then-create took the other run's folder and then failed on its lock."""
    import gainlora.rundir as rundir

    resolve = rundir.resolve_run_dir

    def raced(cfg):  # the other run creates the chosen folder first
        chosen = resolve(cfg)
        chosen.root.mkdir(parents=True)
        return chosen

    monkeypatch.setattr(rundir, "resolve_run_dir", raced)
    with claim_run_dir(cfg_of(tmp_path)) as run_dir:
        stamp = sorted(p.name for p in (tmp_path / "demo").iterdir())[0]
        assert run_dir.root == tmp_path / "demo" / f"{stamp}-2"
        assert not (tmp_path / "demo" / stamp / LOCK).exists()
    assert not run_dir.root.exists()  # nothing of a run was written: no trace


def test_runs_dir_at_the_filesystem_root_or_among_the_code_is_refused(tmp_path):
    from gainlora.rundir import CODE_DIR

    for runs, accepted in (("/", "a folder for runs, not the filesystem root"),
                           (str(CODE_DIR / "gainlora"), f"a folder outside {CODE_DIR}")):
        with pytest.raises(ConfigError, match=f"^paths.runs_dir={re.escape(runs)}: {re.escape(accepted)}"):
            with claim_run_dir(cfg_of(tmp_path, f"paths.runs_dir={runs}", "run_id=hostile")):
                pytest.fail("claimed")
        assert not (Path(runs) / "demo").exists()


def test_a_new_run_never_writes_into_a_folder_holding_other_files(tmp_path):
    root = tmp_path / "demo" / "mine"
    root.mkdir(parents=True)
    (root / "notes.txt").write_text("kept")
    with pytest.raises(ConfigError, match=rf"^run_id=mine: a new name: {re.escape(str(root))} holds other files "
                                          r"\(notes.txt\), not a run"):
        with claim_run_dir(cfg_of(tmp_path, "run_id=mine")):
            pytest.fail("claimed")
    assert sorted(p.name for p in root.iterdir()) == [LOCK, "notes.txt"]  # only the lock was added
    (root / "notes.txt").unlink()
    with claim_run_dir(cfg_of(tmp_path, "run_id=mine")):  # what a run killed before its config leaves: reused
        pass


@pytest.mark.parametrize("name, kind", [("results.json", "file"), ("predictions.json", "file"), ("plots", "folder")])
def test_resume_refuses_a_rewritten_file_of_the_wrong_kind(tmp_path, name, kind):
    """results.json, predictions.json and plots/ are written again on resume: of the wrong kind, they are
    named before anything is restored (a folder as results.json was a traceback after the restore)."""
    root = saved_run(tmp_path, "r")
    path = root / name
    if kind == "file":
        path.mkdir()
    else:
        path.write_text("x")
    with pytest.raises(ArtifactError, match=f"^{re.escape(str(path))}: not a {kind}; move it away to resume"):
        with claim_run_dir(cfg_of(tmp_path, "run_id=r", "resume=true")):
            pytest.fail("claimed")


@pytest.mark.parametrize("name", ["tasks", "checkpoints"])
def test_resume_refuses_a_written_folder_that_is_a_link(tmp_path, name):
    """tasks/ and checkpoints/ are written into on resume: as a link to another run's folder, the resume
    would add task folders or checkpoints to that run."""
    other = saved_run(tmp_path, "other") / name
    other.mkdir()
    link = saved_run(tmp_path, "r") / name
    link.symlink_to(other)
    with pytest.raises(ArtifactError, match=f"^{re.escape(str(link))}: a link, not this run's own folder"):
        with claim_run_dir(cfg_of(tmp_path, "run_id=r", "resume=true")):
            pytest.fail("claimed")
    assert list(other.iterdir()) == []


@pytest.mark.timeout(60)
def test_a_fifo_in_place_of_a_run_file_is_named_never_read(tmp_path):
    """Opening a FIFO blocks until a writer comes: results.json, metrics.csv or .lock.json as one made a
    resume (with or without run_id) or a second writer hang for ever."""
    root = saved_run(tmp_path, "r")
    os.mkfifo(root / "results.json")
    with pytest.raises(ArtifactError, match=f"^{re.escape(str(root / 'results.json'))}: not a file"):
        with claim_run_dir(cfg_of(tmp_path, "resume=true")):  # looks at every run's status first
            pytest.fail("claimed")
    (root / "results.json").unlink()
    os.mkfifo(root / "metrics.csv")
    with pytest.raises(ArtifactError, match=f"^{re.escape(str(root / 'metrics.csv'))}: not a readable metrics file"):
        with claim_run_dir(cfg_of(tmp_path, "run_id=r", "resume=true")):
            pytest.fail("claimed")
    (root / "metrics.csv").unlink()
    holder = hold_lock(root)
    try:
        (root / HOLDER).unlink()
        os.mkfifo(root / HOLDER)
        with pytest.raises(ConfigError, match="in use by another process"):
            with claim_run_dir(cfg_of(tmp_path, "run_id=r", "resume=true")):
                pytest.fail("claimed")
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("resume", [False, True])
def test_a_run_id_naming_a_file_is_refused_by_its_key(tmp_path, resume):
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "f").write_text("kept")
    accepted = "resume=true needs an existing run" if resume else "a new name: .* is a file, not a run directory"
    with pytest.raises(ConfigError, match=f"^run_id=f: {accepted}"):  # was paths.runs_dir=...: File exists
        with claim_run_dir(cfg_of(tmp_path, "run_id=f", f"resume={str(resume).lower()}")):
            pytest.fail("claimed")
    assert (tmp_path / "demo" / "f").read_text() == "kept"
