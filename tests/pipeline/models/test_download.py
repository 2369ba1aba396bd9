"""Plain-URL downloads against a real HTTP server on 127.0.0.1: resume, digest check, retries, errors."""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from pipeline.models.download import DownloadError, RetryPolicy, fetch_file, read_stamp
from pipeline.models.manifest import FileSpec
from tests.pipeline.models.model_servers import file_server

DATA = os.urandom(3 * (1 << 20) + 12345)  # a few chunks, not a multiple of the chunk size
NO_WAIT = RetryPolicy(attempts=4, backoff_s=0.0, timeout_s=10)


def _spec(data: bytes = DATA, **kw) -> FileSpec:
    return FileSpec(name="ckpt.pth", size=len(data), sha256=hashlib.sha256(data).hexdigest(), path="m/ckpt.pth", **kw)


def _fetch(url: str, tmp_path, spec: FileSpec | None = None, policy: RetryPolicy = NO_WAIT, waits=None):
    return fetch_file(spec or _spec(), f"{url}/m/ckpt.pth", tmp_path, policy=policy, progress=False,
                      sleep=(waits.append if waits is not None else lambda s: None))


def test_an_interrupted_download_resumes_where_it_stopped_on_the_next_run(tmp_path) -> None:
    cut = 1_000_000
    with file_server({"/m/ckpt.pth": DATA}, {"/m/ckpt.pth": [("drop", cut)]}) as (url, served):
        with pytest.raises(DownloadError, match="run the same command again to resume") as err:
            _fetch(url, tmp_path, policy=RetryPolicy(attempts=1, backoff_s=0.0))
        assert "1000000 bytes are kept" in str(err.value)
        assert not (tmp_path / "ckpt.pth").exists()
        assert (tmp_path / "ckpt.pth.part").stat().st_size == cut
        got = _fetch(url, tmp_path)
    assert got.downloaded and (tmp_path / "ckpt.pth").read_bytes() == DATA
    assert served.requests == [("GET", "/m/ckpt.pth", None), ("GET", "/m/ckpt.pth", f"bytes={cut}-")]
    assert served.sent["/m/ckpt.pth"] == len(DATA)  # every byte sent once: the rerun asked for the rest only
    assert not (tmp_path / "ckpt.pth.part").exists()


def test_a_dropped_connection_is_resumed_within_the_same_run(tmp_path) -> None:
    with file_server({"/m/ckpt.pth": DATA}, {"/m/ckpt.pth": [("drop", 70_000), ("drop", 2_000_000)]}) as (url, served):
        _fetch(url, tmp_path)
    assert [r[2] for r in served.requests] == [None, "bytes=70000-", "bytes=2070000-"]
    assert served.sent["/m/ckpt.pth"] == len(DATA)
    assert (tmp_path / "ckpt.pth").read_bytes() == DATA


def test_a_wrong_body_is_caught_by_the_digest_and_kept_aside(tmp_path) -> None:
    wrong = bytes(reversed(DATA))  # the same size: only the digest can tell
    with file_server({"/m/ckpt.pth": DATA}, {"/m/ckpt.pth": [("wrong", wrong)]}) as (url, _):
        with pytest.raises(DownloadError, match="does not match the recorded sha256") as err:
            _fetch(url, tmp_path)
    assert "nothing was installed" in str(err.value)
    assert not (tmp_path / "ckpt.pth").exists() and not (tmp_path / "ckpt.pth.part").exists()
    assert (tmp_path / "ckpt.pth.rejected").read_bytes() == wrong
    assert read_stamp(tmp_path / "ckpt.pth") is None


def test_503_twice_then_200_succeeds_with_backoff(tmp_path) -> None:
    waits: list[float] = []
    policy = RetryPolicy(attempts=3, backoff_s=0.5, backoff_max_s=30)
    with file_server({"/m/ckpt.pth": DATA}, {"/m/ckpt.pth": [503, 503]}) as (url, served):
        got = _fetch(url, tmp_path, policy=policy, waits=waits)
    assert got.downloaded and got.sha256 == hashlib.sha256(DATA).hexdigest()
    assert len(served.requests) == 3 and waits == [0.5, 1.0]


def test_retries_are_bounded(tmp_path) -> None:
    with file_server({"/m/ckpt.pth": DATA}, {"/m/ckpt.pth": [503] * 5}) as (url, served):
        with pytest.raises(DownloadError, match="gave up after 3 attempts .HTTP 503"):
            _fetch(url, tmp_path, policy=RetryPolicy(attempts=3, backoff_s=0.0))
    assert len(served.requests) == 3


def test_404_is_not_retried(tmp_path) -> None:
    with file_server({}) as (url, served):
        with pytest.raises(DownloadError, match="ckpt.pth: HTTP 404 Not Found from http://127.0.0.1"):
            _fetch(url, tmp_path)
    assert len(served.requests) == 1


def test_a_server_offering_another_size_is_refused_before_writing(tmp_path) -> None:
    with file_server({"/m/ckpt.pth": DATA[:-1]}) as (url, _):
        with pytest.raises(DownloadError, match=f"offers {len(DATA) - 1} bytes, the recorded size is {len(DATA)}"):
            _fetch(url, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_second_call_checks_and_does_nothing(tmp_path) -> None:
    with file_server({"/m/ckpt.pth": DATA}) as (url, served):
        first = _fetch(url, tmp_path)
        second = _fetch(url, tmp_path)
    assert first.downloaded and not second.downloaded and len(served.requests) == 1
    stamp = json.loads((tmp_path / "ckpt.pth.verified.json").read_text())
    assert stamp["sha256"] == hashlib.sha256(DATA).hexdigest() and stamp["digest_source"] == "recorded"


def test_a_corrupted_file_in_place_is_set_aside_and_fetched_again(tmp_path) -> None:
    with file_server({"/m/ckpt.pth": DATA}) as (url, served):
        _fetch(url, tmp_path)
        with open(tmp_path / "ckpt.pth", "r+b") as f:  # flip one byte: the stamp's mtime no longer matches
            f.seek(5)
            f.write(bytes([DATA[5] ^ 1]))
        got = _fetch(url, tmp_path)
    assert got.downloaded and (tmp_path / "ckpt.pth").read_bytes() == DATA
    assert (tmp_path / "ckpt.pth.rejected").stat().st_size == len(DATA)
    assert len(served.requests) == 2


def test_without_a_recorded_digest_the_first_download_is_recorded_and_then_enforced(tmp_path) -> None:
    unknown = FileSpec(name="ckpt.pth", path="m/ckpt.pth")  # no size, no digest: what Salesforce publishes
    with file_server({"/m/ckpt.pth": DATA}) as (url, _):
        got = _fetch(url, tmp_path, spec=unknown)
    assert got.trusted_on_first_use
    assert read_stamp(tmp_path / "ckpt.pth")["digest_source"] == "trust on first use"
    (tmp_path / "ckpt.pth").unlink()
    with file_server({"/m/ckpt.pth": DATA[::-1]}) as (url, _):  # the mirror now serves something else
        with pytest.raises(DownloadError, match="the sha256 recorded on its first download"):
            _fetch(url, tmp_path, spec=unknown)
    assert not (tmp_path / "ckpt.pth").exists()
