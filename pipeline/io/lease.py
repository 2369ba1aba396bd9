"""One driver per run folder: a lease file (``OUT/run.lease``) with its holder and a heartbeat.

Taking it locally is an exclusive create: the holder's record is written to a temporary file, then
hard-linked to the lease name, which fails if it exists. Of two drivers started together exactly
one wins, and nobody sees a half-written lease. pyarrow gives object stores no conditional write,
so there it is a documented best effort: look, write our lease if there is none (or a stale one),
wait ``settle_s`` and read it back; the last writer of a race keeps it and the other backs off.

A live holder refreshes ``heartbeat`` every ``heartbeat_s`` from a daemon thread. A lease whose
heartbeat is older than ``stale_s`` is taken over with a warning, and so is one held by a process
of this host that no longer exists, so a SIGKILLed driver never blocks the rerun that resumes it.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

import pyarrow.fs as pafs

from pipeline.errors import UserError
from pipeline.io import storage

LEASE_NAME = "run.lease"

log = logging.getLogger(__name__)


@dataclass
class Holder:
    host: str
    pid: int
    started_at: str  # ISO time, for people
    heartbeat: float  # Unix time of the last refresh
    token: str  # tells two holders apart even with the same host and pid

    def age(self, now: float) -> float:
        return max(0.0, now - self.heartbeat)

    def describe(self, now: float) -> str:
        return f"host {self.host} pid {self.pid} (started {self.started_at}, heartbeat {self.age(now):.0f} s ago)"


def _parse(data: bytes) -> Holder | None:
    try:
        return Holder(**json.loads(data))
    except (ValueError, TypeError):
        return None  # a lease torn by a crash mid-write counts as no lease


def _dead_here(holder: Holder) -> bool:
    """The holder ran on this host and its process is gone."""
    if holder.host != socket.gethostname():
        return False
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class RunLease:
    def __init__(self, fs: pafs.FileSystem, out: str, uri: str, heartbeat_s: float, stale_s: float,
                 settle_s: float = 1.0) -> None:
        self.fs, self.uri = fs, uri
        self.path = storage.join(out, LEASE_NAME)
        self.heartbeat_s, self.stale_s, self.settle_s = heartbeat_s, stale_s, settle_s
        self.me = Holder(socket.gethostname(), os.getpid(), datetime.now(timezone.utc).isoformat(timespec="seconds"),
                         time.time(), uuid.uuid4().hex)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- taking and giving back ---------------------------------------------------------------
    def acquire(self) -> RunLease:
        """Take the lease or raise UserError naming the live holder."""
        self.fs.create_dir(self.path.rsplit("/", 1)[0], recursive=True)
        if storage.is_local(self.fs):
            self._acquire_local()
        else:
            self._acquire_remote()
        self._thread = threading.Thread(target=self._beat, name="run-lease-heartbeat", daemon=True)
        self._thread.start()
        return self

    def release(self) -> None:
        """Stop the heartbeat and remove the lease if it is still ours (idempotent)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        current = self._read()
        if current is not None and current.token == self.me.token:
            try:
                self.fs.delete_file(self.path)
            except OSError as err:
                log.warning("could not remove the run lease %s: %s", self.path, err)

    def __enter__(self) -> RunLease:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    # ---- internals ----------------------------------------------------------------------------
    def _payload(self) -> bytes:
        return json.dumps(asdict(self.me)).encode()

    def _read(self) -> Holder | None:
        try:
            return _parse(storage.read_bytes(self.fs, self.path)) if storage.exists(self.fs, self.path) else None
        except FileNotFoundError:  # released between the two calls
            return None

    def _refuse_or_take_over(self, holder: Holder | None) -> None:
        """Raise if ``holder`` is live; warn when taking over a stale or dead one."""
        if holder is None:
            return
        now = time.time()
        if _dead_here(holder):
            print(f"warning: taking over {self.uri} from {holder.describe(now)}: the process is gone",
                  file=sys.stderr)
            return
        if holder.age(now) > self.stale_s:
            print(f"warning: taking over {self.uri} from {holder.describe(now)}: no heartbeat for over "
                  f"job.lease_stale_s={self.stale_s:g} s", file=sys.stderr)
            return
        raise UserError(
            f"output {self.uri} is in use by another run: {holder.describe(now)}; wait for it to end "
            f"(it is taken over after job.lease_stale_s={self.stale_s:g} s without a heartbeat)"
        )

    def _acquire_local(self) -> None:
        for _ in range(3):  # a lease may vanish between our look and our create
            if self._create_exclusive():
                return
            self._refuse_or_take_over(self._read())
            self._take_over_local()
            if self._read_token() == self.me.token:
                return
        self._refuse_or_take_over(self._read())
        raise UserError(f"output {self.uri}: could not take the run lease ({self.path}); try again")

    def _create_exclusive(self) -> bool:
        """Publish our record under the lease name only if no lease exists (link fails on EEXIST)."""
        tmp = f"{self.path}.tmp-{self.me.token[:8]}"
        with open(tmp, "wb") as handle:
            handle.write(self._payload())
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)

    def _take_over_local(self) -> None:
        """Replace a stale lease; of two drivers taking over at once, the later rename wins."""
        storage.write_atomic(self.fs, self.path, self._payload())
        time.sleep(min(self.settle_s, 0.2))

    def _read_token(self) -> str | None:
        holder = self._read()
        return holder.token if holder else None

    def _acquire_remote(self) -> None:
        self._refuse_or_take_over(self._read())
        storage.write_atomic(self.fs, self.path, self._payload())
        time.sleep(self.settle_s)  # let a concurrent writer's upload land, then see who is last
        holder = self._read()
        if holder is None or holder.token != self.me.token:
            self._refuse_or_take_over(holder)
            raise UserError(f"output {self.uri}: another driver took the run lease at the same time; try again")

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            current = self._read()
            if current is not None and current.token != self.me.token:
                log.error("lost the run lease of %s to %s", self.uri, current.describe(time.time()))
                print(f"warning: {self.uri}: another driver took over the run lease "
                      f"({current.describe(time.time())})", file=sys.stderr)
                return
            self.me.heartbeat = time.time()
            try:
                storage.write_atomic(self.fs, self.path, self._payload())
            except OSError as err:  # a missed beat is not fatal; stale_s spans several beats
                log.warning("could not refresh the run lease %s: %s", self.path, err)
