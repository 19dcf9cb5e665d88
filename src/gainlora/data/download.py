"""Download CL_Benchmark from the GainLoRA repository at a pinned commit, checking every file's git blob id.

    python -m gainlora.data.download --dest DIR [--base-url URL] [--only SuperNI|Long_Sequence]

``DIR`` becomes the CL_Benchmark folder itself (``DIR/SuperNI/...``, ``DIR/Long_Sequence/...``), the folder that
``GAINLORA_DATA`` points at. The expected ids come from ``blobs.txt`` beside this module (a copy of the benchmark's
``BLOBS.txt``): ``git hash-object FILE`` gives the same id, so a file on disk is either verified or refused.
"""
from __future__ import annotations

import argparse
import hashlib
import http.client
import os
import socket
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

COMMIT = "a47edf47953917dc0146b97a8a2583cdba2a5a99"
DEFAULT_BASE_URL = f"https://raw.githubusercontent.com/liangyanshuo/gainlora/{COMMIT}/"
MANIFEST_PREFIX = "CL_Benchmark/"
GROUP_NAMES = ("SuperNI", "Long_Sequence")
_CHUNK = 1 << 20


@dataclass(frozen=True)
class ManifestEntry:
    """One upstream file: its git blob id and its path in the repository (``CL_Benchmark/...``)."""

    blob: str
    path: str

    @property
    def relative(self) -> str:
        """Path inside the CL_Benchmark folder, i.e. below ``dest``."""
        return self.path.removeprefix(MANIFEST_PREFIX)


@dataclass
class DownloadReport:
    downloaded: list[str] = field(default_factory=list)
    copied: list[str] = field(default_factory=list)  # same blob as a file already fetched (dev.json == test.json)
    skipped: list[str] = field(default_factory=list)  # already present with the right id
    failed: dict[str, str] = field(default_factory=dict)  # path -> reason

    @property
    def ok(self) -> bool:
        return not self.failed

    def summary(self) -> str:
        lines = [
            f"{len(self.downloaded)} downloaded, {len(self.copied)} copied from identical files, "
            f"{len(self.skipped)} already present, {len(self.failed)} failed"
        ]
        lines += [f"  FAILED {path}: {reason}" for path, reason in self.failed.items()]
        return "\n".join(lines)


class DownloadError(RuntimeError):
    """A file could not be fetched or did not match its blob id."""


class Unreachable(RuntimeError):
    """The server cannot be reached at all: no file can come, so the download stops at once."""


# ---------------------------------------------------------------------------------------------- hashing


def git_blob_id(data: bytes) -> str:
    """What ``git hash-object`` prints: sha1 over ``b"blob <size>\\0"`` + content."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def file_blob_id(path: str | os.PathLike[str]) -> str:
    """``git_blob_id`` of a file, read in chunks."""
    path = Path(path)
    digest = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------- manifest


def parse_manifest(text: str) -> list[ManifestEntry]:
    """Lines of ``<40-hex blob>  CL_Benchmark/<path>`` (the format of ``git ls-tree``'s id and path)."""
    entries = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.split(maxsplit=1)
        if len(parts) != 2 or len(parts[0]) != 40 or not parts[1].startswith(MANIFEST_PREFIX):
            raise ValueError(f"manifest line {number} is not '<blob id>  {MANIFEST_PREFIX}<path>': {line!r}")
        blob, path = parts[0].lower(), parts[1].strip()
        int(blob, 16)  # raises on a non-hex id
        if ".." in Path(path).parts:
            raise ValueError(f"manifest line {number}: path leaves the benchmark folder: {path!r}")
        entries.append(ManifestEntry(blob, path))
    return entries


def default_manifest() -> list[ManifestEntry]:
    """The 105 upstream files at ``COMMIT`` (package data ``blobs.txt``)."""
    return parse_manifest(resources.files("gainlora.data").joinpath("blobs.txt").read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------------------- download


def _is_transient(err: Exception) -> bool:
    if isinstance(err, urllib.error.HTTPError):
        return err.code == 429 or err.code >= 500
    return isinstance(err, urllib.error.URLError | TimeoutError | ConnectionError | http.client.HTTPException)


def _fetch(url: str, *, retries: int, retry_wait: float, timeout: float) -> bytes:
    """GET ``url``, retrying server errors and dropped connections ``retries`` times."""
    for attempt in range(retries + 1):
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                return response.read()
        except Exception as err:  # noqa: BLE001 - sorted into transient and final just below
            if not _is_transient(err) or attempt == retries:
                is_http = isinstance(err, urllib.error.HTTPError)
                detail = f"HTTP {err.code}" if is_http else f"{type(err).__name__}: {err}"
                tries = f" after {attempt + 1} attempts" if attempt else ""
                raise DownloadError(f"cannot fetch {url}{tries}: {detail}") from err
            time.sleep(retry_wait * (attempt + 1))
    raise AssertionError("unreachable")


def check_reachable(base_url: str, timeout: float = 3.0) -> None:
    """One short connection to the server before any download: without network this fails in
    seconds instead of after minutes of per-file retries."""
    parts = urllib.parse.urlsplit(base_url)
    if parts.scheme not in ("http", "https"):
        return
    proxy = urllib.request.getproxies().get(parts.scheme)
    target = urllib.parse.urlsplit(proxy) if proxy else parts
    port = target.port or (443 if target.scheme == "https" else 80)
    try:
        socket.create_connection((target.hostname, port), timeout=timeout).close()
    except OSError as err:
        raise Unreachable(f"{target.hostname}:{port}: cannot connect within {timeout:g} s ({err.strerror or err}); "
                            "`make data` needs network access to it; on a machine without network, copy a "
                            "CL_Benchmark folder here and point GAINLORA_DATA at it") from None


def _write_atomic(target: Path, data: bytes) -> None:
    """Write through a temporary file in the same folder, so a reader never sees a partial file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
        os.replace(temp, target)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def _select(entries: Iterable[ManifestEntry], only: str | None) -> list[ManifestEntry]:
    if only is None:
        return list(entries)
    if only not in GROUP_NAMES:
        raise ValueError(f"only must be one of {', '.join(GROUP_NAMES)}, got {only!r}")
    return [e for e in entries if e.relative.split("/", 1)[0] == only]


def download_benchmark(
    dest: str | os.PathLike[str],
    base_url: str = DEFAULT_BASE_URL,
    only: str | None = None,
    progress: bool = True,
    *,
    manifest: Sequence[ManifestEntry] | None = None,
    retries: int = 2,
    retry_wait: float = 1.0,
    timeout: float = 60.0,
) -> DownloadReport:
    """Fetch every manifest file into ``dest`` (the CL_Benchmark folder); never raises for one bad file.

    ``base_url`` + the manifest path (``CL_Benchmark/...``) is each file's URL. A file already in ``dest`` with
    the right blob id is skipped; one with a wrong id is replaced, or removed if no good copy can be fetched,
    so that ``dest`` only ever holds verified files. ``report.ok`` says whether everything is in place.
    """
    dest = Path(dest)
    base_url = base_url if base_url.endswith("/") else base_url + "/"
    entries = _select(default_manifest() if manifest is None else manifest, only)
    report = DownloadReport()
    verified: dict[str, Path] = {}  # blob id -> a verified file in dest holding it

    def say(message: str) -> None:
        if progress:
            print(message, file=sys.stderr, flush=True)

    reachable = False
    for number, entry in enumerate(entries, start=1):
        target = dest / entry.relative
        prefix = f"[{number}/{len(entries)}] {entry.relative}"
        stale = ""
        if target.is_file():
            actual = file_blob_id(target)
            if actual == entry.blob:
                report.skipped.append(entry.relative)
                verified.setdefault(entry.blob, target)
                say(f"{prefix}: present")
                continue
            stale = f"; the existing file (blob {actual}) was removed"

        try:
            if entry.blob in verified:
                data = verified[entry.blob].read_bytes()
                bucket = report.copied
            else:
                if not reachable:  # Unreachable leaves the loop: no file can come
                    check_reachable(base_url)
                    reachable = True
                url = base_url + urllib.parse.quote(entry.path)
                data = _fetch(url, retries=retries, retry_wait=retry_wait, timeout=timeout)
                bucket = report.downloaded
            actual = git_blob_id(data)
            if actual != entry.blob:
                raise DownloadError(f"corrupted download refused: expected blob {entry.blob}, got {actual}")
            _write_atomic(target, data)
        except (DownloadError, OSError) as err:
            target.unlink(missing_ok=True)  # a file that does not match its id must not be read later
            report.failed[entry.relative] = f"{err}{stale}"
            say(f"{prefix}: FAILED: {err}{stale}")
            continue
        bucket.append(entry.relative)
        verified[entry.blob] = target
        say(f"{prefix}: {'copied' if bucket is report.copied else 'downloaded'} ({len(data):,} bytes)")

    say(report.summary())
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gainlora.data.download",
        description=f"Download CL_Benchmark (liangyanshuo/gainlora at {COMMIT[:10]}), checking git blob ids.",
    )
    parser.add_argument("--dest", required=True, help="the CL_Benchmark folder to fill (point GAINLORA_DATA at it)")
    parser.add_argument("--base-url", default=DEFAULT_BASE_URL, help="URL prefix for the manifest paths")
    parser.add_argument("--only", choices=GROUP_NAMES, help="fetch one benchmark only")
    args = parser.parse_args(argv)
    try:
        report = download_benchmark(args.dest, base_url=args.base_url, only=args.only, progress=True)
    except Unreachable as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if report.ok:
        print(f"benchmark ready in {Path(args.dest).resolve()}; export GAINLORA_DATA={Path(args.dest).resolve()}")
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
