"""Real HTTP servers on 127.0.0.1 for the download tests: a plain file server with scripted faults, and a
stub Hugging Face hub (the contract huggingface_hub 2.4 needs: revision / tree API, HEAD, GET with Range).

Each runs ``http.server`` in a thread and records what it was asked and how many body bytes it sent."""

from __future__ import annotations

import hashlib
import json
import threading
import urllib.parse
from collections import defaultdict, deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any


@dataclass
class Served:
    """What a server saw: requests as (method, path, Range header) and body bytes sent per path."""

    requests: list[tuple[str, str, str | None]] = field(default_factory=list)
    sent: dict[str, int] = field(default_factory=lambda: defaultdict(int))


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # quiet
        pass

    def _body(self, path: str, data: bytes, extra: dict[str, str] | None = None, status_ok: int = 200,
              drop_after: int | None = None) -> None:
        """Send ``data`` (honouring Range); with ``drop_after`` close the connection after that many bytes."""
        rng = self.headers.get("Range")
        start = 0
        status = status_ok
        headers = dict(extra or {})
        if rng and rng.startswith("bytes="):
            start = int(rng[6:].split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        body = data[start:]
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        if drop_after is not None:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command == "HEAD":
            return
        out = body if drop_after is None else body[:drop_after]
        self.wfile.write(out)
        self.wfile.flush()
        self.server.served.sent[path] += len(out)
        if drop_after is not None:
            self.close_connection = True

    def _error(self, code: int, extra: dict[str, str] | None = None) -> None:
        self.send_response(code)
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", "0")
        self.end_headers()


class _FileHandler(_Handler):
    """GET PATH: the file's bytes; each path may hold a queue of faults consumed one per request:
    ``503``/``404`` (status), ``("drop", N)`` (close after N body bytes), ``("wrong", bytes)`` (that body)."""

    def do_GET(self) -> None:
        path = urllib.parse.urlparse(self.path).path
        self.server.served.requests.append(("GET", path, self.headers.get("Range")))
        faults = self.server.faults.get(path)
        fault = faults.popleft() if faults else None
        data = self.server.files.get(path)
        if data is None or fault == 404:
            return self._error(404)
        if isinstance(fault, int):
            return self._error(fault)
        if isinstance(fault, tuple) and fault[0] == "drop":
            return self._body(path, data, drop_after=fault[1])
        if isinstance(fault, tuple) and fault[0] == "wrong":
            return self._body(path, fault[1])
        return self._body(path, data)


@contextmanager
def _serving(handler: type, **state: Any) -> Iterator[tuple[str, Served]]:
    """(base URL, record) of a threaded server on 127.0.0.1 whose handler reads ``state`` off the server."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    for name, value in state.items():
        setattr(server, name, value)
    server.served = Served()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", server.served
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def file_server(files: dict[str, bytes], faults: dict[str, list] | None = None) -> Iterator[tuple[str, Served]]:
    """(base URL, record) of a server holding ``files`` (URL path -> bytes) with scripted ``faults``."""
    with _serving(_FileHandler, files=files, faults={k: deque(v) for k, v in (faults or {}).items()}) as served:
        yield served


# --- a stub Hugging Face hub --------------------------------------------------------------------------------


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest()


@dataclass
class StubRepo:
    commit: str
    files: dict[str, bytes]
    lfs: set[str] = field(default_factory=set)  # paths served as LFS files (ETag = sha256)
    wrong: dict[str, bytes] = field(default_factory=dict)  # path -> body sent instead (same size)
    token: str | None = None  # when set: a gated repo, answered 401 without `Authorization: Bearer TOKEN`

    def etag(self, path: str) -> str:
        data = self.files[path]
        return hashlib.sha256(data).hexdigest() if path in self.lfs else git_blob_sha1(data)


_ANSWERED = object()  # _repo already sent the answer (401)


class _HubHandler(_Handler):
    """GET /api/models/{id}/revision/{rev}, GET /api/models/{id}/tree/{commit}, HEAD/GET /{id}/resolve/{rev}/{path}."""

    def _repo(self, repo_id: str) -> StubRepo | None:
        repo = self.server.repos.get(repo_id)
        if repo is not None and repo.token and self.headers.get("Authorization") != f"Bearer {repo.token}":
            self._error(401, {"X-Error-Code": "GatedRepo", "X-Error-Message": "Access to this repo is restricted"})
            return _ANSWERED
        return repo

    def _json(self, obj) -> None:
        data = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _repo_at(self, repo_id: str, rev: str):
        """The repository at ``rev`` (main or its commit), or None once the error is answered."""
        repo = self._repo(repo_id)
        if repo is _ANSWERED:
            return None
        if repo is None:
            self._error(404, {"X-Error-Code": "RepoNotFound"})
            return None
        if rev not in ("main", repo.commit):
            self._error(404, {"X-Error-Code": "RevisionNotFound"})
            return None
        return repo

    def _api(self, path: str) -> None:
        rest = path[len("/api/models/"):]
        for marker in ("/revision/", "/tree/"):
            if marker in rest:
                repo_id, _, rev = rest.partition(marker)
                repo = self._repo_at(repo_id, rev)
                if repo is None:
                    return None
                if marker == "/revision/":
                    return self._json({"id": repo_id, "sha": repo.commit, "siblings": [
                        {"rfilename": p} for p in sorted(repo.files)]})
                entries = []
                for p, data in sorted(repo.files.items()):
                    entry = {"type": "file", "path": p, "size": len(data), "oid": git_blob_sha1(data)}
                    if p in repo.lfs:
                        entry["lfs"] = {"oid": repo.etag(p), "size": len(data), "pointerSize": 134}
                    entries.append(entry)
                return self._json(entries)
        return self._error(404)

    def _resolve(self, path: str) -> None:
        # /{org}/{name}/resolve/{rev}/{file} or /{name}/resolve/{rev}/{file}
        head, _, tail = path.partition("/resolve/")
        repo_id = head.lstrip("/")
        rev, _, file = tail.partition("/")
        rev, file = urllib.parse.unquote(rev), urllib.parse.unquote(file)
        repo = self._repo_at(repo_id, rev)
        if repo is None:
            return None
        if file not in repo.files:
            return self._error(404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": repo.commit})
        headers = {"X-Repo-Commit": repo.commit, "ETag": f'"{repo.etag(file)}"'}
        if file in repo.lfs:
            headers["X-Linked-Etag"] = f'"{repo.etag(file)}"'
            headers["X-Linked-Size"] = str(len(repo.files[file]))
        self._body(path, repo.wrong.get(file, repo.files[file]), headers)

    def _route(self) -> None:
        path = urllib.parse.urlparse(self.path).path
        self.server.served.requests.append((self.command, path, self.headers.get("Range")))
        if path.startswith("/api/models/"):
            return self._api(path)
        if "/resolve/" in path:
            return self._resolve(path)
        return self._error(404)

    do_GET = _route
    do_HEAD = _route


@contextmanager
def stub_hub(repos: dict[str, StubRepo]) -> Iterator[tuple[str, Served]]:
    """(HF_ENDPOINT, record) of a stub hub serving ``repos``."""
    with _serving(_HubHandler, repos=repos) as served:
        yield served


def folder_files(folder: Path, prefix: str = "") -> dict[str, bytes]:
    """Every file under ``folder`` as repo path -> bytes."""
    return {prefix + p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
