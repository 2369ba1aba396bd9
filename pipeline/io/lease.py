"""One driver per run folder: a lease file (``OUT/run.lease``) with its holder and a heartbeat.

Taking it locally is an exclusive create: the holder's record is written to a temporary file, then
hard-linked to the lease name, which fails if it exists. Of two drivers started together exactly
one wins, and nobody sees a half-written lease. pyarrow gives object stores no conditional write,
so there it is a documented best effort: look, write our lease if there is none (or a stale one),
wait ``settle_s`` and read it back; the last writer of a race keeps it and the other backs off.

A live holder refreshes ``heartbeat`` every ``heartbeat_s`` from a daemon thread. A lease whose
heartbeat is older than ``stale_s`` is taken over with a warning, and so is one held by a process
of this host that no longer exists, so a SIGKILLed driver never blocks the rerun that resumes it.
A heartbeat this host cannot judge (ahead of its clock, another host's clock being ahead, or not a
number) is aged by the lease file's modification time instead, which the storage sets.

Fencing: a holder that finds the lease gone or someone else's never writes it again; it is lost for
good (``ensure_held`` raises ``LeaseLost``). Every writer of the run folder checks ``LeaseFence``
(the holder's token) right before each publish, and each shard marker records that token, so a driver
that was paused past ``stale_s`` and taken over publishes nothing more.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import stat
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


class LeaseLost(RuntimeError):
    """This driver no longer holds the run folder's lease: it must publish nothing more."""


_MAX_PID = 2**31  # a pid os.kill accepts; anything larger is not a process of any host


def _parse(data: bytes) -> Holder | None:
    """The holder, or None for a record nobody could have written whole (torn by a crash, hand-edited)."""
    try:
        raw = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    if not isinstance(raw, dict):
        return None
    fields = {"host": str, "pid": int, "started_at": str, "heartbeat": (int, float), "token": str}
    if set(raw) != set(fields) or any(isinstance(raw[k], bool) or not isinstance(raw[k], t)
                                      for k, t in fields.items()):
        return None
    if not 0 < raw["pid"] < _MAX_PID:
        return None
    return Holder(**{**raw, "heartbeat": float(raw["heartbeat"])})


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
        self.lost: str | None = None  # why the lease was lost, once it is (never cleared)

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

    @property
    def fence(self) -> LeaseFence:
        """What writers elsewhere (actors) check before each publish."""
        return LeaseFence(self.fs, self.path, self.me.token)

    def ensure_held(self) -> None:
        """Raise LeaseLost once the heartbeat found the lease gone or taken (no I/O: cheap in a loop)."""
        if self.lost:
            raise LeaseLost(self.lost)

    def verify(self) -> None:
        """Read the lease now; raise LeaseLost unless it is still ours (before the driver's own writes)."""
        self.ensure_held()
        try:
            self.fence.check()
        except LeaseLost as err:
            # The heartbeat may find the same loss at this moment: stop it first, so that its warning (if any)
            # comes before the caller's error, which must be the driver's last line.
            self._halt_heartbeat()
            self.lost = self.lost or f"{self.uri}: this driver lost the run lease ({err})"
            raise LeaseLost(self.lost) from None

    def release(self) -> None:
        """Stop the heartbeat and remove the lease if it is still ours (idempotent)."""
        self._halt_heartbeat()
        try:
            current = self._read()
            if current is not None and current.token == self.me.token:
                self.fs.delete_file(self.path)
        except (OSError, UserError) as err:  # a lease that is not ours to clean up is left as it is
            log.warning("could not remove the run lease %s: %s", self.path, err)

    def __enter__(self) -> RunLease:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    # ---- internals ----------------------------------------------------------------------------
    def _halt_heartbeat(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _payload(self) -> bytes:
        return json.dumps(asdict(self.me)).encode()

    def _read(self) -> Holder | None:
        return read_holder(self.fs, self.path, self.uri)

    def _refuse_or_take_over(self, holder: Holder | None) -> None:
        """Raise if ``holder`` is live; warn when taking over a stale or dead one."""
        if holder is None:
            return
        now = time.time()
        if _dead_here(holder):
            print(f"warning: taking over {self.uri} from {holder.describe(now)}: the process is gone",
                  file=sys.stderr)
            return
        age, skew = self._age(holder, now)
        if age > self.stale_s:
            print(f"warning: taking over {self.uri} from {holder.describe(now)}: no heartbeat for over "
                  f"job.lease_stale_s={self.stale_s:g} s{skew}", file=sys.stderr)
            return
        raise UserError(
            f"output {self.uri} is in use by another run: {holder.describe(now)}{skew}; wait for it to end "
            f"(it is taken over after job.lease_stale_s={self.stale_s:g} s without a heartbeat)"
        )

    def _age(self, holder: Holder, now: float) -> tuple[float, str]:
        """Seconds since the holder's last beat, and a note when its own clock could not say.

        A heartbeat ahead of this host's clock (or not finite) is another host's clock talking: then the
        lease file's modification time, set by the storage at each beat, says when it last changed."""
        if math.isfinite(holder.heartbeat) and holder.heartbeat <= now + self.heartbeat_s:
            return holder.age(now), ""
        mtime = self.fs.get_file_info(self.path).mtime
        changed = mtime.timestamp() if mtime is not None else now
        return max(0.0, now - changed), (f" (its heartbeat {holder.heartbeat!r} is not on this host's clock: "
                                         f"aged by the lease file's last change, {max(0.0, now - changed):.0f} s ago)")

    def _acquire_local(self) -> None:
        for _ in range(3):  # a lease may vanish between our look and our create
            if self._create_exclusive():
                return
            holder = self._read()
            if holder is None and storage.exists(self.fs, self.path):
                print(f"warning: replacing the malformed run lease {self.path} (torn by a crash, or edited)",
                      file=sys.stderr)
            self._refuse_or_take_over(holder)
            self._take_over_local()
            if self._read_token() == self.me.token:
                return
        self._refuse_or_take_over(self._read())
        raise UserError(f"output {self.uri}: could not take the run lease ({self.path}); try again")

    def _create_exclusive(self) -> bool:
        """Publish our record under the lease name only if no lease exists (link fails on EEXIST)."""
        tmp = f"{self.path}.tmp-{self.me.token[:8]}"
        try:  # a full disk fails the write: the temporary file goes too
            with open(tmp, "wb") as handle:
                handle.write(self._payload())
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            if os.path.lexists(tmp):
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
            try:
                current = self._read()
            except (OSError, UserError) as err:  # unreadable: not provably ours; try again next beat
                log.warning("could not read the run lease %s: %s", self.path, err)
                continue
            if current is None or current.token != self.me.token:
                # Gone (another driver finished and released it) or taken: never write it again.
                whose = "removed" if current is None else f"taken over by {current.describe(time.time())}"
                lost = f"{self.uri}: this driver lost the run lease ({whose}); it publishes nothing more"
                log.error(lost)
                print(f"warning: {lost}", file=sys.stderr)
                self.lost = lost  # only now: the driver's error, raised on seeing it, must come after the warning
                return
            self.me.heartbeat = time.time()
            try:
                storage.write_atomic(self.fs, self.path, self._payload())
            except OSError as err:  # a missed beat is not fatal; stale_s spans several beats
                log.warning("could not refresh the run lease %s: %s", self.path, err)


def _is_regular(fs: pafs.FileSystem, path: str, uri: str) -> bool:
    """False when absent; raises UserError for a lease name that is not a plain file (a FIFO would block
    every open, a folder every read): the user has to remove it."""
    if storage.is_local(fs):
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            return False
        if stat.S_ISREG(mode):
            return True
    else:
        kind = fs.get_file_info(path).type
        if kind == pafs.FileType.NotFound:
            return False
        if kind == pafs.FileType.File:
            return True
    raise UserError(f"output {uri}: {path} is not a regular file; remove it if no driver runs on this output")


def read_holder(fs: pafs.FileSystem, path: str, uri: str) -> Holder | None:
    """The lease's holder; None when there is none or its record is torn or malformed."""
    if not _is_regular(fs, path, uri):
        return None
    try:
        return _parse(storage.read_bytes(fs, path))
    except FileNotFoundError:  # released between the two calls
        return None


@dataclass(frozen=True)
class LeaseFence:
    """The holder's token, as writers of the run folder (actors) carry it: check before each publish."""

    fs: pafs.FileSystem
    path: str  # the lease file
    token: str

    @classmethod
    def for_run(cls, fs: pafs.FileSystem, out: str, token: str) -> LeaseFence:
        return cls(fs, storage.join(out, LEASE_NAME), token)

    def check(self) -> None:
        """Raise LeaseLost unless the lease file still names this token."""
        try:
            holder = read_holder(self.fs, self.path, self.path)
        except (OSError, UserError) as err:
            raise LeaseLost(f"the run lease {self.path} cannot be read ({err}); publishing nothing") from None
        if holder is None or holder.token != self.token:
            whose = "no lease" if holder is None else f"the lease of host {holder.host} pid {holder.pid}"
            raise LeaseLost(f"the run folder now holds {whose}, not this driver's: publishing nothing")
