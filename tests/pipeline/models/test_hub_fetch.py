"""Hub repositories against a stub hub on 127.0.0.1: tokens, a pinned commit the hub no longer has, refs/main.

In-process, with huggingface_hub's import-time settings (endpoint, offline) patched for the test's duration:
the endpoint is the stub, so nothing leaves the machine."""

from __future__ import annotations

import socket

import pytest

from pipeline.errors import UserError
from pipeline.models.download import DownloadError
from pipeline.models.hub_fetch import fetch_repo, read_ref, repo_dir, write_ref
from pipeline.models.manifest import FileSpec, HubRepo
from tests.pipeline.models.model_servers import StubRepo, stub_hub
from tests.pipeline.models.released_files import file_entry

FILES = {"config.json": b'{"model_type": "bert"}', "model.safetensors": bytes(range(256)) * 40}
COMMIT = "a" * 40


def _repo(revision: str = COMMIT) -> HubRepo:
    files = {p: FileSpec(p, **file_entry(d, p.endswith(".safetensors"))) for p, d in FILES.items()}
    return HubRepo("org/model", revision, files)


@pytest.fixture
def hub(monkeypatch):
    """A stub hub, online, every other host refused; yields (repos dict to fill, endpoint, record)."""
    from huggingface_hub import constants

    real = socket.getaddrinfo

    def local_only(host, *args, **kwargs):
        if host not in ("127.0.0.1", "localhost"):
            raise OSError(f"the test tried to reach {host}")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", local_only)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)  # no agent-registry request
    repos: dict[str, StubRepo] = {}
    with stub_hub(repos) as (endpoint, served):
        yield repos, endpoint, served


def _fetch(tmp_path, repo: HubRepo, endpoint: str, **kw):
    return fetch_repo(repo, cache_dir=tmp_path / "hub", stamps_dir=tmp_path / "verified", progress=False,
                      endpoint=endpoint, sleep=lambda s: None, **kw)


def test_a_gated_repo_needs_the_token_and_gets_it(hub, tmp_path) -> None:
    repos, endpoint, served = hub
    repos["org/model"] = StubRepo(COMMIT, dict(FILES), {"model.safetensors"}, token="s3cret")
    with pytest.raises(DownloadError, match=r"org/model: gated or private; log in \(`hf auth login`\) or set HF_TOKEN"):
        _fetch(tmp_path, _repo(), endpoint)
    got = _fetch(tmp_path, _repo(), endpoint, token="s3cret")
    assert served.sent["/org/model/resolve/" + COMMIT + "/model.safetensors"] == len(FILES["model.safetensors"])
    assert got.downloaded and (got.snapshot / "model.safetensors").read_bytes() == FILES["model.safetensors"]


def test_a_pinned_commit_the_hub_lost_falls_back_to_main_and_the_digests_decide(hub, tmp_path) -> None:
    repos, endpoint, _ = hub
    repos["org/model"] = StubRepo(COMMIT, dict(FILES), {"model.safetensors"})
    got = _fetch(tmp_path, _repo(revision="b" * 40), endpoint)
    assert got.commit == COMMIT and got.notes == [f"pinned commit {'b' * 12} not found; fetched main and checked "
                                                  "every digest"]
    assert read_ref("org/model", "main", tmp_path / "hub") == COMMIT
    repos.clear()  # a second call finds it through refs/main, without asking the hub
    again = _fetch(tmp_path, _repo(revision="b" * 40), endpoint)
    assert not again.downloaded and again.commit == COMMIT


def test_refs_main_is_pointed_at_the_verified_commit_and_says_so(hub, tmp_path) -> None:
    repos, endpoint, _ = hub
    repos["org/model"] = StubRepo(COMMIT, dict(FILES), {"model.safetensors"})
    write_ref("org/model", "main", "c" * 40, tmp_path / "hub")  # another tool left main elsewhere
    got = _fetch(tmp_path, _repo(), endpoint)
    assert got.notes == [f"refs/main moved from {'c' * 12} to the verified {COMMIT[:12]}"]
    assert (repo_dir("org/model", tmp_path / "hub") / "refs" / "main").read_text() == COMMIT
    with pytest.raises(UserError, match="the config pins revision"):
        _fetch(tmp_path, _repo(), endpoint, refs=("d" * 40,))  # a config pinned to another commit than the table
