"""The run directory (docs/architecture.md, "Run directory"), written atomically and verified on reading.

Every file is written to a temporary name in its own directory and renamed into place, and a task
directory counts as finished only once its DONE marker exists, so a crash never leaves a
half-written artifact that looks complete. DONE is the last thing a task writes: it holds the
sha256 of the task's meta.json, which holds the sha256 of every other file of the task, so a
truncated, edited or deleted file is caught when the task is restored. Tensors are safetensors and
metadata JSON: nothing is ever unpickled. Files and folders follow the user's umask (tempfile makes
them private), so a team sharing a cluster can read each other's runs.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file
from torch import Tensor

DONE = "DONE"
META = "meta.json"
TMP_SUFFIX = ".tmp"  # temporary files and staging folders: removed by RunDir.clean_leftovers
STAGING_SUFFIX = ".staging"


class ArtifactError(ValueError):
    """A saved artifact is missing, corrupted or does not fit the model being rebuilt; names the file."""


def umask() -> int:
    current = os.umask(0o022)  # reading the umask means setting it: put it straight back
    os.umask(current)
    return current


def atomic_write(path: Path | str, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` and rename tmp onto ``path`` (mode 0o666 & ~umask, as open() would give)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """A staging folder next to ``final`` that replaces it when the block succeeds (mode 0o777 & ~umask)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=STAGING_SUFFIX, dir=final.parent))
    try:
        yield staging
        staging.chmod(0o777 & ~umask())
        if final.exists():  # an unfinished leftover of a crashed attempt
            shutil.rmtree(final)
        os.replace(staging, final)
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def write_json(path: Path, obj) -> Path:
    return atomic_write(path, lambda p: p.write_text(json.dumps(obj, indent=2, allow_nan=False) + "\n"))


def write_text(path: Path, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text))


def write_tensors(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> Path:
    # Own storage per entry: safetensors refuses tensors that share memory (q and v share a memory).
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    return atomic_write(path, lambda p: save_file(tensors, str(p), metadata=metadata))


def read_tensors(path: Path) -> dict[str, Tensor]:
    return load_file(str(path))


MAX_CONFIG_BYTES = 4 << 20  # a run's config.yaml is a few KiB; a custom stream's inline tasks stay far below


def read_config(path: Path) -> DictConfig:
    """A run's config.yaml as data, as ``OmegaConf.to_yaml(resolve=True)`` writes it: no YAML aliases
    and no ``${...}`` interpolations, which a crafted file could nest into a billion-laughs expansion
    that fills memory when loaded or resolved. ``ArtifactError`` names the file otherwise."""
    def refuse(why: str) -> ArtifactError:
        return ArtifactError(f"{path}: not a readable config ({why})")

    try:
        if not path.is_file():  # a FIFO would block the read for ever
            raise refuse("not a regular file")
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise refuse(f"over {MAX_CONFIG_BYTES >> 20} MiB")
        text = path.read_text()
        if any(isinstance(event, yaml.AliasEvent) for event in yaml.parse(text, Loader=yaml.SafeLoader)):
            raise refuse("a YAML alias (*name); a run never writes one")
        cfg = OmegaConf.load(io.StringIO(text))
    except ArtifactError:
        raise
    except Exception as err:  # noqa: BLE001 - OS, decoding, yaml's and OmegaConf's own errors
        raise refuse((str(err).splitlines() or [type(err).__name__])[0][:160]) from None
    if not isinstance(cfg, DictConfig):
        raise ArtifactError(f"{path}: not a run config (a mapping of sections)")
    stack: list = [OmegaConf.to_container(cfg, resolve=False)]  # interpolations stay "${...}" strings
    while stack:
        node = stack.pop()
        for value in node.values() if isinstance(node, dict) else node:
            if isinstance(value, (dict, list)):
                stack.append(value)
            elif isinstance(value, str) and "${" in value:
                raise refuse(f"an interpolation {value[:80]}; a run saves its config resolved")
    return cfg


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def meta_is_valid(meta: dict) -> bool:
    """A task's meta.json as ``save_task`` writes it (JSON without NaN): plain file names only, so a
    crafted one cannot make the run read files outside the task; numbers the resume adds up."""
    files, row = meta.get("sha256"), meta.get("row", [])
    steps, wall = meta.get("steps", 0), meta.get("wall_time_s", 0.0)
    return (isinstance(files, dict) and all(isinstance(f, str) and isinstance(d, str) and Path(f).name == f
                                            and f not in ("", ".", "..") for f, d in files.items())
            and isinstance(row, list) and all(v is None or type(v) in (int, float) and math.isfinite(v) for v in row)
            and type(steps) is int and steps >= 0 and type(wall) in (int, float) and 0 <= wall < math.inf)


class RunDir:
    """``runs/<experiment>/<run_id>/`` with config.yaml, results.json, metrics.csv, tasks/, plots/."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    @property
    def results(self) -> Path:
        return self.root / "results.json"

    def saved(self, key: str):
        """``key`` of results.json as last written; None when there is none or it cannot be read (a
        file that is not a regular one is never opened: a FIFO would block the read)."""
        if not self.results.is_file():
            return None
        try:
            return json.loads(self.results.read_text()).get(key)
        except (OSError, ValueError, AttributeError):
            return None

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    @property
    def predictions(self) -> Path:
        return self.root / "predictions.json"

    @property
    def metrics_csv(self) -> Path:
        return self.root / "metrics.csv"

    def checkpoint_dir(self, task: int, name: str) -> Path:
        """Lightning checkpoints of an unfinished task (resume inside a task)."""
        return self.root / "checkpoints" / f"{task + 1:02d}-{name}"

    def task_dir(self, task: int, name: str) -> Path:
        return self.root / "tasks" / f"{task + 1:02d}-{name}"

    def is_done(self, task: int, name: str) -> bool:
        done = self.task_dir(task, name) / DONE
        if done.exists() and not done.is_file():  # never written so: retraining would replace the folder
            raise ArtifactError(f"{done}: not a file; delete {done.parent} to train the task again")
        return done.is_file()

    def save_task(self, task: int, name: str, files: dict[str, dict[str, Tensor]], meta: dict,
                  extra_json: dict[str, object] | None = None) -> Path:
        """Write a finished task's tensors (one safetensors file per key), ``extra_json`` files (e.g.
        predictions.json) and meta.json with every file's sha256, then DONE with meta.json's sha256.

        Files go into a staging folder that is renamed into place, so an interrupted save leaves no
        partial task directory behind.
        """
        final = self.task_dir(task, name)
        with atomic_dir(final) as staging:
            for stem, tensors in files.items():
                if tensors:
                    write_tensors(staging / f"{stem}.safetensors", tensors)
            for filename, obj in (extra_json or {}).items():
                write_json(staging / filename, obj)
            checksums = {p.name: sha256(p) for p in sorted(staging.iterdir())}
            write_json(staging / META, {**meta, "sha256": checksums})
            write_text(staging / DONE, sha256(staging / META) + "\n")
        return final

    def verified_task(self, task: int, name: str) -> tuple[Path, dict]:
        """A finished task's folder and meta, after checking every checksum; ArtifactError names the
        first file that is missing or differs from what was written."""
        folder = self.task_dir(task, name)
        done, meta_path = folder / DONE, folder / META
        if not self.is_done(task, name):
            raise ArtifactError(f"{done}: missing; the task is not finished")
        with open(done, "rb") as file:  # a sha256 line: a huge file is not read whole
            recorded = file.read(128).decode("ascii", "replace").strip()
        if not recorded:
            raise ArtifactError(f"{done}: holds no checksum of {META} (written by an older version, or emptied); "
                                "the task cannot be verified: delete its folder to train it again")
        if not meta_path.is_file():
            raise ArtifactError(f"{meta_path}: missing from a finished task; delete {folder} to train it again")
        if sha256(meta_path) != recorded:
            raise ArtifactError(f"{meta_path}: does not match the checksum in {done} (edited or corrupted); "
                                f"delete {folder} to train the task again")
        try:
            meta = json.loads(meta_path.read_text())
        except (ValueError, UnicodeDecodeError):
            meta = None
        if not (isinstance(meta, dict) and meta_is_valid(meta)):
            raise ArtifactError(f"{meta_path}: not a task's meta.json (an object with its finite scores under 'row', "
                                "its steps and wall time, and its files' checksums under 'sha256'); delete "
                                f"{folder} to train the task again")
        files = meta["sha256"]
        for filename, digest in files.items():
            path = folder / filename
            if not path.is_file():
                raise ArtifactError(f"{path}: missing from a finished task; delete {folder} to train it again")
            if sha256(path) != digest:
                raise ArtifactError(f"{path}: does not match its checksum in {meta_path} (truncated or edited); "
                                    f"delete {folder} to train the task again")
        return folder, meta

    def load_task(self, task: int, name: str) -> tuple[dict[str, dict[str, Tensor]], dict]:
        """A finished task's tensors by file stem and its meta, verified (see :meth:`verified_task`)."""
        folder, meta = self.verified_task(task, name)
        files = {}
        for filename in sorted(meta["sha256"]):
            if filename.endswith(".safetensors"):
                try:
                    files[Path(filename).stem] = read_tensors(folder / filename)
                except Exception as err:  # noqa: BLE001 - safetensors' own error types
                    raise ArtifactError(f"{folder / filename}: not a readable safetensors file ({err}); delete "
                                        f"{folder} to train the task again") from None
        return files, meta

    def clean_leftovers(self) -> list[Path]:
        """Remove the temporary files and staging folders an interrupted write left behind."""
        removed = []
        for folder in (self.root, self.plots, self.root / "tasks", *self.root.glob("tasks/*"),
                       *self.root.glob("checkpoints/*")):
            for path in folder.glob(".*"):
                if path.name.endswith((TMP_SUFFIX, STAGING_SUFFIX)) and path.is_symlink():
                    path.unlink()  # never written so; not followed (rmtree refuses a link: a traceback)
                elif path.name.endswith(TMP_SUFFIX) and path.is_file():
                    path.unlink()
                elif path.name.endswith(STAGING_SUFFIX) and path.is_dir():
                    shutil.rmtree(path)
                else:
                    continue
                removed.append(path)
        return removed
