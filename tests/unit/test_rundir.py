"""The run directory: atomic writes that follow the umask, verified task folders, leftovers of a
kill removed, and a metrics.csv that a kill never leaves empty or truncated."""
from __future__ import annotations

import csv
import json
import os
import re
import stat
from pathlib import Path

import pytest
import torch

from gainlora.artifacts import ArtifactError, RunDir, atomic_write, sha256, write_json
from gainlora.csv_logger import RunCSVLogger, read_rows


@pytest.fixture
def with_umask():
    old = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


FILES = {"branch": {"q.A": torch.randn(4, 8), "q.B": torch.zeros(8, 4)}, "gate": {"G1": torch.ones(2, 3)},
         "memory": {"m": torch.eye(3, dtype=torch.float64)}}


def save(run_dir: RunDir, task: int = 0, name: str = "a") -> Path:
    return run_dir.save_task(task, name, FILES, {"task": task, "row": [50.0]},
                             extra_json={"predictions.json": [{"prediction": "x"}]})


@pytest.mark.parametrize("mask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o002, 0o664, 0o775)])
def test_written_files_and_task_folders_follow_the_umask(mask, file_mode, dir_mode, with_umask, tmp_path) -> None:
    with_umask(mask)
    run_dir = RunDir(tmp_path)
    write_json(run_dir.results, {"a": 1})
    folder = save(run_dir)
    assert mode(run_dir.results) == file_mode
    assert mode(folder) == dir_mode
    assert {p.name: mode(p) for p in folder.iterdir()} == dict.fromkeys(
        ["branch.safetensors", "gate.safetensors", "memory.safetensors", "predictions.json", "meta.json", "DONE"],
        file_mode)


def test_a_saved_task_loads_back_verified(tmp_path) -> None:
    run_dir = RunDir(tmp_path)
    save(run_dir)
    files, meta = run_dir.load_task(0, "a")
    assert set(files) == {"branch", "gate", "memory"} and meta["row"] == [50.0]
    assert torch.equal(files["memory"]["m"], FILES["memory"]["m"])
    assert set(meta["sha256"]) == {"branch.safetensors", "gate.safetensors", "memory.safetensors", "predictions.json"}


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-8])


def edit_meta(path: Path) -> None:
    path.write_text(path.read_text().replace("50.0", "99.0"))


@pytest.mark.parametrize("damage, file, message", [
    (truncate, "branch.safetensors", "branch.safetensors: does not match its checksum"),
    (truncate, "gate.safetensors", "gate.safetensors: does not match its checksum"),
    (Path.unlink, "memory.safetensors", "memory.safetensors: missing from a finished task"),
    (Path.unlink, "meta.json", "meta.json: missing from a finished task"),
    (edit_meta, "meta.json", "meta.json: does not match the checksum in"),
    (lambda p: p.write_text(""), "DONE", "DONE: holds no checksum"),
    (Path.unlink, "predictions.json", "predictions.json: missing from a finished task"),
    (lambda p: p.unlink() or p.mkdir(), "DONE", "DONE: not a file; delete"),
])
def test_a_damaged_task_folder_is_refused_naming_the_file(damage, file, message, tmp_path) -> None:
    run_dir = RunDir(tmp_path)
    folder = save(run_dir)
    damage(folder / file)
    with pytest.raises(ArtifactError) as err:
        run_dir.load_task(0, "a")
    assert message in str(err.value) and str(folder / file) in str(err.value) and "\n" not in str(err.value)


def rechecksummed(folder: Path, meta: object) -> None:
    """Write ``meta`` as meta.json and DONE with its checksum: damage that the checksums alone miss."""
    (folder / "meta.json").write_text(meta if isinstance(meta, str) else json.dumps(meta))
    (folder / "DONE").write_text(sha256(folder / "meta.json") + "\n")


def not_safetensors(meta: dict, path: Path) -> dict:
    """Replace ``path`` with bytes that are no safetensors file; meta with its new checksum."""
    path.write_bytes(b"\xff" * 8 + b"{")
    return {**meta, "sha256": {**meta["sha256"], path.name: sha256(path)}}


@pytest.mark.parametrize("edit, message", [
    (lambda meta, folder: "{not json", "meta.json: not a task's meta.json"),
    (lambda meta, folder: [], "meta.json: not a task's meta.json"),
    (lambda meta, folder: {**meta, "sha256": ["branch.safetensors"]}, "meta.json: not a task's meta.json"),
    (lambda meta, folder: {**meta, "row": "x"}, "meta.json: not a task's meta.json"),
    (lambda meta, folder: {**meta, "sha256": {"../outside.safetensors": "0" * 64}}, "meta.json: not a task's meta.json"),
    (lambda meta, folder: {**meta, "row": [float("nan")]}, "meta.json: not a task's meta.json"),  # JSON's NaN
    (lambda meta, folder: {**meta, "steps": "lots"}, "meta.json: not a task's meta.json"),  # was a TypeError
    (lambda meta, folder: {**meta, "wall_time_s": float("inf")}, "meta.json: not a task's meta.json"),
    (lambda meta, folder: not_safetensors(meta, folder / "branch.safetensors"),
     "branch.safetensors: not a readable safetensors file"),
])
def test_a_rechecksummed_task_folder_is_still_refused(edit, message, tmp_path) -> None:
    run_dir = RunDir(tmp_path)
    folder = save(run_dir)
    meta = json.loads((folder / "meta.json").read_text())
    rechecksummed(folder, edit(meta, folder))
    with pytest.raises(ArtifactError, match=re.escape(message)) as err:
        run_dir.load_task(0, "a")
    assert str(folder) in str(err.value) and "\n" not in str(err.value)


def test_leftovers_of_a_kill_are_removed(tmp_path) -> None:
    run_dir = RunDir(tmp_path)
    folder = save(run_dir)
    leftovers = [tmp_path / ".results.json.abc.tmp", tmp_path / "plots" / ".matrix.png.x.tmp",
                 folder / ".meta.json.y.tmp", tmp_path / "checkpoints" / "02-b" / ".last.ckpt.z.tmp"]
    for path in leftovers:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("half")
    staging = tmp_path / "tasks" / ".02-b.q.staging"
    staging.mkdir()
    (staging / "branch.safetensors").write_text("half")
    keep = tmp_path / ".hidden_user_file"
    keep.write_text("mine")
    links = [tmp_path / "tasks" / ".03-c.r.staging", tmp_path / ".metrics.csv.s.tmp"]  # removed, never followed
    links[0].symlink_to(folder, target_is_directory=True)
    links[1].symlink_to(keep)
    assert sorted(run_dir.clean_leftovers()) == sorted([*leftovers, staging, *links])
    assert not any(p.exists() or p.is_symlink() for p in [*leftovers, staging, *links]) and keep.exists()
    run_dir.load_task(0, "a")  # the finished task is untouched, the linked folder included


def test_a_failed_write_keeps_the_old_file(tmp_path) -> None:
    path = tmp_path / "results.json"
    path.write_text("old")

    def boom(tmp: Path) -> None:
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, boom)
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_metrics_csv_survives_a_kill_while_a_new_key_rewrites_it(tmp_path, monkeypatch) -> None:
    """Lightning rewrites metrics.csv in place when a key appears; a kill then left it empty. Here
    the new file is written aside: dying mid-write leaves the old rows."""
    logger = RunCSVLogger(str(tmp_path))
    logger.log_metrics({"train/loss": 1.0}, step=0)
    logger.save()
    before = (tmp_path / "metrics.csv").read_text()
    logger.log_metrics({"train/loss": 0.5, "cl/task": 1}, step=1)  # a new key: the header changes

    real_writerows = csv.DictWriter.writerows

    def die_midway(self, rows):
        real_writerows(self, rows)
        raise KeyboardInterrupt  # the kill, half-way through the write

    monkeypatch.setattr(csv.DictWriter, "writerows", die_midway)
    with pytest.raises(KeyboardInterrupt):
        logger.save()
    monkeypatch.undo()
    assert (tmp_path / "metrics.csv").read_text() == before
    assert not list(tmp_path.glob(".*.tmp"))
    logger = RunCSVLogger(str(tmp_path))  # a resumed run appends to the old rows
    logger.log_metrics({"cl/task": 1, "cl/AP": 3.0}, step=0)
    logger.save()
    rows = read_rows(tmp_path / "metrics.csv")
    assert [r["train/loss"] for r in rows] == ["1.0", ""] and rows[1]["cl/AP"] == "3.0"


BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [" + ", ".join([f"*{p}"] * 9) + "]\n" for p, c in zip("abcdefgh", "bcdefghi"))


@pytest.mark.parametrize("text, message", [
    (BOMB, "not a readable config (a YAML alias"),  # 9**9 strings once expanded: it filled memory
    ("a: x\nb: ${a}${a}${a}\n", "not a readable config (an interpolation ${a}${a}${a}"),
    ("a:\n  - {b: '${oc.env:HOME}'}\n", "not a readable config (an interpolation ${oc.env:HOME}"),
    ("a: 1\n" + "#" * (5 << 20), "not a readable config (over 4 MiB)"),
    ("- 1\n", "not a run config (a mapping of sections)"),
])
def test_read_config_takes_what_a_run_writes_only(text, message, tmp_path) -> None:
    from omegaconf import OmegaConf

    from gainlora.artifacts import read_config

    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(ArtifactError, match=re.escape(f"{path}: {message}")):
        read_config(path)
    saved = OmegaConf.create({"a": [1, 2], "b": {"c": "x"}})
    saved.d = saved.a  # the same list twice: OmegaConf writes it twice, without an alias
    path.write_text(OmegaConf.to_yaml(saved, resolve=True))
    assert read_config(path) == saved
