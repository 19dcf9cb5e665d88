"""``make data``: a real download over HTTP from a local server, checked against the git blob ids.

The server on 127.0.0.1 serves copies of a few shared benchmark files laid out as ``CL_Benchmark/...``, so the
test also proves that the manifest ids match the real files. Needs GAINLORA_DATA; the hashing tests do not.
"""
from __future__ import annotations

import http.server
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from gainlora.data.download import (
    ManifestEntry,
    default_manifest,
    download_benchmark,
    file_blob_id,
    git_blob_id,
    main,
    parse_manifest,
)

GOOD = [
    "Long_Sequence/cb/labels.json",
    "Long_Sequence/cb/dev.json",
    "Long_Sequence/cb/test.json",  # same blob as dev.json: taken from the verified local copy
    "SuperNI/task1590_diplomacy_text_generation/test.json",
]
CORRUPT = "Long_Sequence/copa/labels.json"
FLAKY = "Long_Sequence/rte/labels.json"  # the server answers 503 to its first request
UNSERVED = "Long_Sequence/wic/labels.json"


# ------------------------------------------------------------------------------------- hashing (no data)


def test_git_blob_id_matches_git() -> None:
    # `git hash-object` of an empty file and of "hello\n".
    assert git_blob_id(b"") == "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391"
    assert git_blob_id(b"hello\n") == "ce013625030ba8dba906f756967f9e9ca394464a"


def test_file_blob_id_streams_the_same_id(tmp_path: Path) -> None:
    data = bytes(range(256)) * 9000  # spans several read chunks
    (tmp_path / "f").write_bytes(data)
    assert file_blob_id(tmp_path / "f") == git_blob_id(data)


def test_manifest_is_the_pinned_upstream_listing() -> None:
    entries = default_manifest()
    assert len(entries) == 105
    assert all(e.path.startswith("CL_Benchmark/") and len(e.blob) == 40 for e in entries)
    by_path = {e.relative: e.blob for e in entries}
    assert by_path["Long_Sequence/yahoo/train.json"] == "b1b4857f3be1d1ae37155333406bc6b491acbe79"
    assert by_path["Long_Sequence/cb/dev.json"] == by_path["Long_Sequence/cb/test.json"]


@pytest.mark.parametrize(
    "line", ["abc CL_Benchmark/x.json", "z" * 40 + "  CL_Benchmark/x.json", "a" * 40 + "  other/x.json",
             "a" * 40 + "  CL_Benchmark/../x.json"]
)
def test_manifest_rejects_bad_lines(line: str) -> None:
    with pytest.raises(ValueError):
        parse_manifest(line)


# ------------------------------------------------------------------------------------- local server


@pytest.fixture(scope="module")
def shared() -> Path:
    value = os.environ.get("GAINLORA_DATA")
    if not value or not (Path(value) / "Long_Sequence").is_dir():
        pytest.skip("GAINLORA_DATA is not set to a CL_Benchmark copy; the download test serves its files")
    return Path(value)


class _Server:
    """Static files under ``root`` on an ephemeral port; records requests and can fail a path once."""

    def __init__(self, root: Path) -> None:
        self.requests: list[str] = []
        self.fail_once: set[str] = set()
        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
                super().__init__(*args, directory=str(root), **kwargs)

            def do_GET(self) -> None:
                server.requests.append(self.path)
                if self.path in server.fail_once:
                    server.fail_once.discard(self.path)
                    self.send_error(503, "try again")
                    return
                super().do_GET()

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def __enter__(self) -> _Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()

    def fetched(self, relative: str) -> int:
        return self.requests.count(f"/CL_Benchmark/{relative}")


@pytest.fixture
def server(tmp_path: Path, shared: Path) -> Iterator[_Server]:
    root = tmp_path / "served"
    for relative in [*GOOD, CORRUPT, FLAKY]:
        target = root / "CL_Benchmark" / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes((shared / relative).read_bytes())
    corrupt = root / "CL_Benchmark" / CORRUPT
    corrupt.write_bytes(corrupt.read_bytes().replace(b"A", b"C", 1))
    with _Server(root) as running:
        yield running


def _manifest(*relatives: str) -> list[ManifestEntry]:
    wanted = set(relatives)
    return [e for e in default_manifest() if e.relative in wanted]


def test_download_verifies_every_file(
    server: _Server, shared: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dest = tmp_path / "dest"
    server.fail_once.add(f"/CL_Benchmark/{FLAKY}")
    manifest = _manifest(*GOOD, CORRUPT, FLAKY, UNSERVED)
    assert len(manifest) == 7

    report = download_benchmark(dest, base_url=server.url, manifest=manifest, retry_wait=0)

    for relative in [*GOOD, FLAKY]:
        assert (dest / relative).read_bytes() == (shared / relative).read_bytes(), relative
    assert sorted(report.downloaded) == sorted([*GOOD[:2], GOOD[3], FLAKY])
    assert report.copied == ["Long_Sequence/cb/test.json"] and server.fetched("Long_Sequence/cb/test.json") == 0
    assert server.fetched(FLAKY) == 2  # the 503 was retried

    assert not report.ok and set(report.failed) == {CORRUPT, UNSERVED}
    expected_blob = next(e.blob for e in manifest if e.relative == CORRUPT)
    actual_blob = git_blob_id((tmp_path / "served" / "CL_Benchmark" / CORRUPT).read_bytes())
    assert expected_blob in report.failed[CORRUPT] and actual_blob in report.failed[CORRUPT]
    assert "HTTP 404" in report.failed[UNSERVED] and server.fetched(UNSERVED) == 1  # a 404 is not retried
    assert not (dest / CORRUPT).exists() and not (dest / UNSERVED).exists()
    assert not list(dest.rglob("*.part"))  # no temporary files left behind

    err = capsys.readouterr().err
    assert f"{CORRUPT}: FAILED: corrupted download refused: expected blob {expected_blob}, got {actual_blob}" in err
    assert "4 downloaded, 1 copied from identical files, 0 already present, 2 failed" in err


def test_second_run_skips_verified_files_and_replaces_bad_ones(server: _Server, tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    manifest = _manifest(*GOOD)
    assert download_benchmark(dest, base_url=server.url, manifest=manifest, progress=False).ok
    before = len(server.requests)

    again = download_benchmark(dest, base_url=server.url, manifest=manifest, progress=False)
    assert again.ok and sorted(again.skipped) == sorted(GOOD) and not again.downloaded
    assert len(server.requests) == before  # nothing fetched

    damaged = dest / GOOD[0]
    good_bytes = damaged.read_bytes()
    damaged.write_bytes(b"[]")  # a stale or truncated file is not trusted
    third = download_benchmark(dest, base_url=server.url, manifest=manifest, progress=False)
    assert third.ok and third.downloaded == [GOOD[0]] and damaged.read_bytes() == good_bytes


def test_stale_file_with_no_good_copy_is_removed(server: _Server, tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    (dest / CORRUPT).parent.mkdir(parents=True)
    (dest / CORRUPT).write_bytes(b"old")
    report = download_benchmark(dest, base_url=server.url, manifest=_manifest(CORRUPT), progress=False)
    assert set(report.failed) == {CORRUPT} and "was removed" in report.failed[CORRUPT]
    assert not (dest / CORRUPT).exists()


def test_cli_downloads_a_whole_benchmark(shared: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Serve the whole shared SuperNI folder (12 MB, every file present) through a symlink.
    root = tmp_path / "served"
    root.mkdir()
    (root / "CL_Benchmark").symlink_to(shared.resolve(), target_is_directory=True)
    dest = tmp_path / "CL_Benchmark"
    with _Server(root) as running:
        assert main(["--dest", str(dest), "--base-url", running.url.rstrip("/"), "--only", "SuperNI"]) == 0
    files = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*.json"))
    assert len(files) == 45 and all(f.startswith("SuperNI/") for f in files)
    assert all((dest / f).read_bytes() == (shared / f).read_bytes() for f in files)
    assert "export GAINLORA_DATA=" in capsys.readouterr().out

    empty = tmp_path / "empty"
    empty.mkdir()
    with _Server(empty) as running:  # every file 404s: the exit code says so
        assert main(["--dest", str(tmp_path / "other"), "--base-url", running.url, "--only", "SuperNI"]) == 1


def test_no_network_fails_in_seconds_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import time

    started = time.time()  # port 9 on localhost: nothing listens, as when the host cannot be reached
    assert main(["--dest", str(tmp_path / "d"), "--base-url", "http://127.0.0.1:9/", "--only", "SuperNI"]) == 2
    assert time.time() - started < 5
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: 127.0.0.1:9: cannot connect within 3 s") and len(err) == 1
    assert not list((tmp_path / "d").rglob("*.json"))
