"""The on-disk cache of locally built backbones (``GAINLORA_CACHE``, ``paths.cache_dir``).

Each build is one folder named by a hash of its recipe, staged and renamed into place under a file
lock, so readers see nothing or a complete folder. ``tiny_spec.json`` records each other file's
sha256 when the build ends; a folder whose files no longer match (deleted, truncated, edited since)
is rebuilt rather than loaded as a wrong model or failing deep inside ``from_pretrained``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock

from gainlora.artifacts import ArtifactError, atomic_dir

log = logging.getLogger(__name__)

META = "tiny_spec.json"  # the build's record; its "sha256" maps every other file to its digest


def default_cache_dir() -> Path:
    return Path(os.environ.get("GAINLORA_CACHE") or Path.home() / ".cache" / "gainlora")


def cache_root(cache_dir: str | Path | None) -> Path:
    """``cache_dir``, or the default when it is unset or empty (``GAINLORA_CACHE=`` exported empty
    must not mean the working directory)."""
    return Path(cache_dir).expanduser() if cache_dir else default_cache_dir()


def _sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def entry_problem(entry: Path) -> str | None:
    """Why a cached build cannot be used as it is, or None when every recorded file matches."""
    try:
        recorded = json.loads((entry / META).read_text()).get("sha256")
    except (OSError, ValueError, AttributeError) as err:
        return f"{META} unreadable ({type(err).__name__})"
    if not isinstance(recorded, dict) or not recorded:
        return f"{META} records no checksums (built by an older version)"
    for name, digest in recorded.items():
        file = entry / str(name)
        if "/" in str(name) or not file.is_file():
            return f"{name} is missing"
        if _sha256(file) != digest:
            return f"{name} does not match its checksum (truncated or edited)"
    return None


def cached_build(final: Path, build: Callable[[Path], None]) -> Path:
    """``final``, made by ``build(folder)`` (which writes META) unless a sound copy is there."""
    if entry_problem(final) is None:
        return final
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(final.parent / f".{final.name}.lock"):  # one builder; the others wait, then reuse
            problem = entry_problem(final)
            if problem is None:  # another process built it while we waited
                return final
            if final.exists():
                log.warning("rebuilding %s: %s", final, problem)
            with atomic_dir(final) as tmp:
                build(tmp)
                meta = json.loads((tmp / META).read_text())
                meta["sha256"] = {p.name: _sha256(p) for p in sorted(tmp.iterdir()) if p.is_file() and p.name != META}
                (tmp / META).write_text(json.dumps(meta, indent=2) + "\n")
    except OSError as err:  # the cache folder is a file, or cannot be written
        raise ArtifactError(f"{final}: cannot be built there ({err.strerror or err}: {err.filename or final.parent}); "
                            "set GAINLORA_CACHE (paths.cache_dir) to a writable folder") from None
    return final
