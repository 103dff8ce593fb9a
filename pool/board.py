"""The shared health board: what one process learns about a server, every process on the host
knows, so an outage is discovered once, not once per worker.

A small file under ``/dev/shm`` (or the temp directory), mapped into every process that uses it,
holds one slot per server: its state (up, down, refused), since when, the next probe's time, the
last error (already redacted), an outage counter (``epoch``), its role and timeline, and its lag.
"The same server" is the same host, port, database and user (a hash of them, never the
password), so pools with different endpoint lists share what they have in common. A header
counter changes with every write: the hot path reads those eight bytes from the mapping and
compares them with the last value it saw, with no system call; only a change makes a process
read the slots (``Pool._sync_board``). Each process's connections stay its own: the board
carries state, never connections.

Who writes what:
- Evidence goes on the board: a failed connect or probe (down), a refusal, a successful probe
  (up). A statement or ping past its deadline goes on it as suspect (down, but maybe one slow
  query): a process that needs the server probes it and waits that probe's grace, and the first
  probe that does not answer within it makes it plain down, so the others fail fast. A lost
  session is only a hint: it makes the process that saw it probe at once, and that probe's
  result goes on the board.
- One prober per outage: a process probes a down server only while it holds the server's probe
  lease, a non-blocking lock on a byte range of the file (an OFD lock: per open file, released
  by the kernel if the holder dies). The others wait for the board to say up. A holder that is
  alive but does not attend its probe (stopped, frozen, starved) keeps the lease, so once the
  board's next-probe time plus connect_timeout has passed with no word from it, whoever comes
  next probes without the lease (``Pool._probe_abandoned``).
- One monitor per server and host: a time-limited lease in the slot (renewed each round), so an
  idle process-mode worker cannot hold it forever; the lag and role it measures go on the board.

Safe by construction: slots are read with a sequence lock (a reader retries while a write is
half done; one left half done by a writer killed inside it is started over by the next process
that takes the write lock: ``Board._torn``); a down entry nobody refreshed for ``EXPIRY`` seconds is ignored, so a leftover file
cannot keep a server down (and any probe's result overwrites it); a slot nobody wrote for
``EVICT_AFTER`` goes to a newcomer when the board is full (servers come and go: every
redeploy on new ports), and a process whose slot was taken that way finds its server by key,
or claims another slot at its next write, but never reads another server's entry; a wrong
magic, version, size or
boot (the times are ``CLOCK_MONOTONIC``) makes the first process rebuild the file; a file that
cannot be created or mapped (read-only filesystem) means per-process state, with one warning.
Files are created 0600 and one not owned by this user, or open to others, is refused. No lock
is waited for without a deadline (a holder may be a stopped process), and none is left held by a
signal handler's exception (``Board._exclusively``).

It also keeps one slot per process (its pid and a JSON summary of its pools, published about
once a second), held by a lock for the process's life: any worker can report every worker
(``Pool.stats(scope="host")``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import mmap
import os
import struct
import tempfile
import threading
import time
from typing import Any, Callable

import fcntl

log = logging.getLogger("pool")
monotonic = time.monotonic

MAGIC = b"POOLBRD\x03"
SLOTS, SLOT_SIZE = 64, 256
PROCS, PROC_SIZE = 128, 4096
HEADER_SIZE = 128
SEQ_AT = 64  # the header's change counter (8-aligned: read as one word)
FILE_SIZE = HEADER_SIZE + SLOTS * SLOT_SIZE + PROCS * PROC_SIZE
EXPIRY = 10.0  # a down entry not refreshed for this long is ignored
MONITOR_LEASE = 3.0  # seconds a monitor lease lasts without renewal
WRITE_WAIT = 0.1  # a write waits this long at most for another process's (microseconds-long) one
BUSY_BACKOFF = 1.0  # after such a wait failed, writes do not wait for this long
INIT_WAIT = 2.0  # opening waits this long at most for another process setting the file up
STATUS_FRESH = 3.0  # a monitor's figures (role, lag) older than this are not taken from the board
EVICT_AFTER = 60.0  # a full board gives a newcomer the slot nobody wrote for longest, if this long

NONE, UP, DOWN, REFUSED = 0, 1, 2, 3
SUSPECT = 1  # flags: down on indirect evidence only (a statement past its deadline)
FAILED_FAST = 2  # flags: the last failure came at once (refused, reset), not after a deadline
STATES = {UP: "up", DOWN: "down", REFUSED: "refused"}
CODES = {v: k for k, v in STATES.items()}

_HEADER = struct.Struct("<8sIIIII16s")  # magic, slots, slot size, procs, proc size, file size, boot
# seq, key, state, recovery (0 unknown, 1 in recovery, 2 primary), flags (SUSPECT, FAILED_FAST),
# epoch, changed, updated, retry_at, failures, timeline, replay, reach (a replica: the furthest
# WAL it holds, received or replayed), lag_s, lag_bytes, lag_at (when the monitor's answer was
# read), asked (when its question was sent: monitor.py), monitor pid, floor (a replica: the
# timeline it is on at least; 0 unknown), monitor until, error length; then the error's bytes.
_SLOT = struct.Struct("<Q16sBBBxIdddIIQQdQddIIdH")
_FIELDS = ("seq", "key", "state", "recovery", "flags", "epoch", "changed", "updated", "retry_at",
           "failures", "timeline", "replay", "reach", "lag_s", "lag_bytes", "lag_at", "asked",
           "monitor_pid", "floor", "monitor_until", "error_len")
_UPDATED = _FIELDS.index("updated")
ERROR_MAX = SLOT_SIZE - _SLOT.size
_PROC = struct.Struct("<QIIdI")  # seq, pid, reserved, updated, payload length
PAYLOAD_MAX = PROC_SIZE - _PROC.size

# Lock ranges live far beyond the end of the file (POSIX lets locks cover bytes that do not
# exist), so they never overlap the data and need no bytes of their own.
_INIT_LOCK = 1 << 40
_WRITE_LOCK = _INIT_LOCK + 1
_LEASE_LOCK = _INIT_LOCK + 1024
_PROC_LOCK = _INIT_LOCK + 4096
_OFD = hasattr(fcntl, "F_OFD_SETLK")  # Linux; elsewhere POSIX record locks (one fd per process)
_FLOCK = struct.Struct("hhqqi4x")


class Slot:
    """One server's place on the board, as a process knows it: its key (the hash of host, port,
    database and user) and the index it was last found at. The index can change under it: a
    full board gives a slot nobody wrote for a while to another server, and the server's next
    writer claims a new one (``Board._locate``)."""

    __slots__ = ("key", "index")

    def __init__(self, key: bytes, index: int | None) -> None:
        self.key = key
        self.index = index

    def __repr__(self) -> str:
        return f"Slot({self.key.hex()[:8]}, {self.index})"


class Entry:
    """One slot as read: plain values, already checked for sanity."""

    __slots__ = ("seq", "state", "recovery", "flags", "epoch", "changed", "updated", "retry_at",
                 "failures", "timeline", "replay", "reach", "lag_s", "lag_bytes", "lag_at",
                 "asked", "monitor_pid", "floor", "monitor_until", "error")

    def __init__(self, values: tuple, error: str) -> None:
        for name, value in zip(_FIELDS, values):
            if name not in ("key", "error_len"):
                setattr(self, name, value)
        self.error = error or None

    def fresh(self, now: float) -> bool:
        """Is a down or refused entry recent enough to believe? (Up needs no refreshing.)"""
        return self.state == UP or now - self.updated < EXPIRY


def _lock(fd: int, start: int, kind: int) -> bool:
    """Lock (or unlock) one byte at ``start``; False if another holder has it (non-blocking)."""
    if _OFD:
        try:
            fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _FLOCK.pack(kind, os.SEEK_SET, start, 1, 0))
            return True
        except (BlockingIOError, PermissionError):
            return False
    try:
        fcntl.lockf(fd, kind | (0 if kind == fcntl.LOCK_UN else fcntl.LOCK_NB), 1, start)
        return True
    except (BlockingIOError, PermissionError):
        return False


def _lock_within(fd: int, start: int, seconds: float) -> bool:
    """Lock one byte at ``start``, waiting at most ``seconds`` (a holder may be a process that
    is stopped, or one an interrupt made forget to unlock): False if that was not enough."""
    deadline = monotonic() + seconds
    pause = 0.0002
    while not _lock(fd, start, fcntl.F_WRLCK):
        if monotonic() >= deadline:
            return False
        time.sleep(pause)
        pause = min(pause * 2, 0.005)
    return True


def _locked_by_other(fd: int, start: int) -> bool:
    if _OFD:
        answer = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, start, 1, 0))
        return _FLOCK.unpack(answer)[0] != fcntl.F_UNLCK
    return False  # POSIX locks cannot be tested for other processes' holders portably


def _boot_id() -> bytes:
    """What makes CLOCK_MONOTONIC comparable: the same boot."""
    try:
        with open("/proc/sys/kernel/random/boot_id", "rb") as f:
            return hashlib.blake2b(f.read().strip(), digest_size=16).digest()
    except OSError:
        return b"\0" * 16


def default_path(name: str) -> str:
    """Where the board called ``name`` lives: a path as given, else in ``$POOL_BOARD_DIR``, else
    under /dev/shm (memory) or the temp directory; one file per user, name and layout (two
    versions of the library never map one file: board._rebuild)."""
    if os.sep in name:
        return name
    base = os.environ.get("POOL_BOARD_DIR") or (
        "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir())
    safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in name)[:64] or "default"
    return os.path.join(base, f"pool-board-{os.getuid()}-{safe}-v{MAGIC[-1]}")


class Board:
    """One process's view of one board file. Shared by every pool of the process that names the
    same board (``Board.open``), because POSIX record locks, where OFD locks are missing, would be
    dropped by closing any second descriptor of the file."""

    _open: dict[str, "Board"] = {}
    _open_lock = threading.Lock()

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()  # threads of this process, around multi-step writes
        self._leases: dict[int, int] = {}  # slot -> id of the pool probing it, in this process
        self._published: dict[int, dict] = {}  # pool id -> its last summary
        self._attach()

    # -- opening ------------------------------------------------------------------------------

    @classmethod
    def open(cls, name: str) -> "Board | None":
        """The board ``name`` (or path), created if need be; None (one warning) if impossible."""
        path = default_path(name)
        with cls._open_lock:
            board = cls._open.get(path)
            if board is not None and board.pid == os.getpid():
                return board
            try:
                board = cls(path)
            except (OSError, ValueError) as exc:
                log.warning("pool: no shared health board at %s (%s); each process keeps its own "
                            "view of the servers", path, exc)
                return None
            cls._open[path] = board
            return board

    def _attach(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
        try:
            st = os.fstat(fd)
            if st.st_uid != os.getuid() or st.st_mode & 0o077:
                raise ValueError(f"{self.path} is not private to this user (owner or mode): refused")
            try:
                if not _lock_within(fd, _INIT_LOCK, INIT_WAIT):
                    raise OSError(f"another process has held its set-up lock for {INIT_WAIT:g}s")
                if not self._valid(fd):
                    self._rebuild(fd)
            finally:
                _lock(fd, _INIT_LOCK, fcntl.F_UNLCK)  # unlocking what we do not hold is a no-op
            self.map = mmap.mmap(fd, FILE_SIZE)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        self.pid = os.getpid()
        self.seq_view = memoryview(self.map)[SEQ_AT:SEQ_AT + 8].cast("Q")  # what the hot path reads
        self.proc = self._claim_process_slot()

    @staticmethod
    def _expected_header() -> bytes:
        return _HEADER.pack(MAGIC, SLOTS, SLOT_SIZE, PROCS, PROC_SIZE, FILE_SIZE, _boot_id())

    def _valid(self, fd: int) -> bool:
        if os.fstat(fd).st_size < FILE_SIZE:  # (longer: another layout's once, never shrunk)
            return False
        return os.pread(fd, _HEADER.size, 0) == self._expected_header()

    def _rebuild(self, fd: int) -> None:
        """A new, short, corrupt or other-boot file: start it over (the init lock is held), in
        place and never shorter. A process that has the file mapped dies of SIGBUS when it
        touches a page past the file's end, and it may be one of another layout (a path given
        to two versions of the library; default paths carry the layout's version) or of this
        one (a corrupt header). (A file an operator truncates by hand under them cannot be
        guarded against.)"""
        size = os.fstat(fd).st_size
        if size:
            log.warning("pool: rebuilding the shared health board %s (stale or corrupt)", self.path)
        if size < FILE_SIZE:
            os.ftruncate(fd, FILE_SIZE)  # (grown: a mapping of fewer pages is unaffected)
        os.pwrite(fd, bytes(FILE_SIZE), 0)
        os.pwrite(fd, self._expected_header(), 0)

    def after_fork_in_child(self) -> None:
        """An OFD lock belongs to the open file, which parent and child now share: the child must
        open the file again, so its leases and process slot are its own."""
        try:
            os.close(self.fd)  # the parent's descriptor stays open: its locks are unaffected
        except OSError:
            pass
        self._lock = threading.Lock()
        self._leases = {}
        self._published = {}
        try:
            self._attach()
        except (OSError, ValueError) as exc:
            log.warning("pool: could not reopen the shared health board in a child (%s)", exc)
            self.seq_view = (0,)
            self.proc = None

    # -- endpoint slots -----------------------------------------------------------------------

    @staticmethod
    def key(identity: str) -> bytes:
        return hashlib.blake2b(identity.encode(), digest_size=16, person=b"pool-board").digest()

    def slot_for(self, identity: str) -> Slot:
        """The slot of this server, claimed if it has none yet (its index is None while the
        board is full of servers that others still write about: its next write tries again)."""
        slot = Slot(self.key(identity), None)
        self._exclusively(self._locate, slot, True)
        return slot

    def _find(self, key: bytes) -> int | None:
        for i in range(SLOTS):
            at = self._slot_at(i) + 8
            if self.map[at:at + 16] == key:
                return i
        return None

    def _locate(self, slot: Slot, claim: bool) -> int | None:
        """The index of ``slot`` now (the write lock held if ``claim``): where it was, or where
        its key is now, or, if ``claim``, a free slot or the one nobody wrote for longest
        (``EVICT_AFTER`` at least, and nobody probing it), started over for this key."""
        i = slot.index
        if i is not None and self.map[self._slot_at(i) + 8:self._slot_at(i) + 24] == slot.key:
            return i
        i = slot.index = self._find(slot.key)
        if i is not None or not claim:
            return i
        now, best, oldest = monotonic(), None, math.inf
        mine = set(self._leases)
        for j in range(SLOTS):
            at = self._slot_at(j)
            unleased = j not in mine and not _locked_by_other(self.fd, _LEASE_LOCK + j)
            if self.map[at + 8:at + 24] == b"\0" * 16 or self._torn(j) and unleased:
                best = j  # (a torn slot's key may be torn too: nobody would ever find it;
                break     # but while its probe lease is held, its holder still needs it)
            updated = _SLOT.unpack_from(self.map, at)[_UPDATED]
            if updated < oldest and now - updated >= EVICT_AFTER and unleased:
                best, oldest = j, updated
        if best is None:
            if not self._full_said:
                self._full_said = True
                log.warning("pool: the shared health board %s is full (%d servers written in the "
                            "last %gs); a server without a slot is watched by each process alone",
                            self.path, SLOTS, EVICT_AFTER)
            return None
        self._write(best, blank=True, key=slot.key)
        slot.index = best
        return best

    _full_said = False

    @staticmethod
    def _slot_at(i: int) -> int:
        return HEADER_SIZE + i * SLOT_SIZE

    def _torn(self, i: int) -> bool:
        """Only with the write lock held: is slot i left half written? Every write of a slot is
        made with that lock held, from its odd sequence number to the even one that ends it,
        and the kernel frees the lock of a process that dies. So whoever holds the lock and
        finds a sequence number odd knows that no write is in progress: its writer was killed
        (or interrupted by a signal handler's exception) inside one, and no reader will ever
        take the slot (it waits for an even number). No timeout or pid is needed to tell it
        from a slow writer: a writer that is alive but stopped inside a write keeps the lock,
        so its slot is never taken from it. The slot's fields may be half old and half new (a
        monitor lease that never ends, a time that is not a number): a writer that takes it
        over keeps only its key and starts the rest over (``_write``)."""
        return bool(self.map[self._slot_at(i)] & 1)

    def read(self, slot: Slot) -> Entry | None:
        """The slot as one consistent snapshot (a sequence lock: retry while a write is half
        done), or None if it holds nothing usable, or nothing about this server."""
        i = self._locate(slot, False)
        if i is None:
            return None
        at = self._slot_at(i)
        for _ in range(100):
            raw = self.map[at:at + SLOT_SIZE]
            values = _SLOT.unpack_from(raw)
            if values[0] & 1 or struct.unpack_from("<Q", self.map, at)[0] != values[0]:
                continue  # a writer is inside, or finished between our two reads
            if values[1] != slot.key:
                return None  # just given to another server: this one has no news there
            error = raw[_SLOT.size:_SLOT.size + min(values[-1], ERROR_MAX)].decode("utf-8", "replace")
            entry = Entry(values, error)
            if entry.state not in (NONE, UP, DOWN, REFUSED) or not all(
                    math.isfinite(t) for t in (entry.changed, entry.updated, entry.retry_at)):
                return None  # garbage: ignore (a rebuild is the next process's to do)
            return entry
        return None

    def write(self, slot: Slot, **fields: Any) -> int:
        """Change some fields of a slot (claimed again if another server has it now); returns
        the slot's new sequence number (its current one if the write had to be skipped: the
        board full, or ``_exclusively``)."""
        seq = self._exclusively(self._write_slot, slot, fields)
        if seq is None:
            entry = self.read(slot)
            return entry.seq if entry is not None else 0
        return seq

    def _write_slot(self, slot: Slot, fields: dict) -> int | None:
        i = self._locate(slot, True)
        return None if i is None else self._write(i, **fields)

    def _write(self, i: int, blank: bool = False, **fields: Any) -> int:
        """Write fields of slot i (the write lock held); ``blank``: every other field zeroed,
        for a slot given to another server (its sequence goes on, so no reader mistakes the
        new entry for one it has applied)."""
        at = self._slot_at(i)
        raw = bytearray(self.map[at:at + SLOT_SIZE])
        if blank:
            raw[8:] = bytes(SLOT_SIZE - 8)
        elif raw[0] & 1:  # torn by a writer that never finished (_torn): keep only its key
            raw[24:] = bytes(SLOT_SIZE - 24)
        values = list(_SLOT.unpack_from(raw))
        error = fields.pop("error", None)
        for name, value in fields.items():
            values[_FIELDS.index(name)] = value
        values[_UPDATED] = monotonic()
        seq = (values[0] | 1) + 1  # even again when done; odd (below) while writing
        if error is not None:
            data = error.encode("utf-8", "replace")[:ERROR_MAX]
            values[-1] = len(data)
            raw[_SLOT.size:_SLOT.size + ERROR_MAX] = data.ljust(ERROR_MAX, b"\0")
        struct.pack_into("<Q", self.map, at, values[0] | 1)  # readers: a write is in progress
        values[0] = seq
        _SLOT.pack_into(raw, 0, *values)
        self.map[at + 8:at + SLOT_SIZE] = raw[8:]
        struct.pack_into("<Q", self.map, at, seq)
        self.seq_view[0] = (self.seq_view[0] + 1) & 0xFFFFFFFFFFFFFFFF  # tell every reader
        return seq

    def _exclusively(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn`` with the board's write lock held, against this process's threads (``_lock``)
        and every other process (a byte lock of the file). None, and one warning, if the byte
        lock stays taken for WRITE_WAIT (its holder is stopped, say): the board then misses
        this write, and nobody waits forever; for a second after that, writes try the lock once
        and do not wait, so a lock left held by a stopped process costs one wait, not one per
        write. Safe against an interrupt anywhere (a signal handler's exception): the C-level
        ``with`` leaves no gap between taking the thread lock and releasing it on the way out,
        and the byte lock is taken inside the ``try`` whose ``finally`` releases it."""
        with self._lock:
            try:
                wait = 0.0 if monotonic() < self._busy_until else WRITE_WAIT
                if not _lock_within(self.fd, _WRITE_LOCK, wait):
                    self._busy_until = monotonic() + BUSY_BACKOFF
                    if not self._busy_said:
                        self._busy_said = True
                        log.warning("pool: the shared health board %s stayed locked by another "
                                    "process for %gs; skipping a write", self.path, WRITE_WAIT)
                    return None
                self._busy_until = 0.0
                return fn(*args, **kwargs)
            finally:
                _lock(self.fd, _WRITE_LOCK, fcntl.F_UNLCK)

    _busy_said = False
    _busy_until = 0.0

    # -- leases -------------------------------------------------------------------------------

    def try_lease(self, slot: Slot, owner: int) -> bool:
        """The probe lease of a server's slot, for the pool ``owner`` (its id): non-blocking.
        A server without a slot (a full board) has no lease to share: it is probed here."""
        with self._lock:
            i = self._locate(slot, False)
            if i is None:
                return True
            holder = self._leases.get(i)
            if holder is not None:
                return holder == owner
            if not _lock(self.fd, _LEASE_LOCK + i, fcntl.F_WRLCK):
                return False
            self._leases[i] = owner
            return True

    def release_lease(self, slot: Slot, owner: int) -> None:
        with self._lock:
            i = self._locate(slot, False)  # a leased slot is never given away: still there
            if i is not None and self._leases.get(i) == owner:
                del self._leases[i]
                _lock(self.fd, _LEASE_LOCK + i, fcntl.F_UNLCK)

    def take_monitor(self, slot: Slot, now: float) -> bool:
        """The monitor lease of a server's slot for this process: free, expired or already
        ours. A server without a slot (a full board) is monitored here."""
        entry = self.read(slot)
        if entry is None:  # no room for it (monitored here), or a slot no reader takes
            return slot.index is None or bool(self._exclusively(self._claim_monitor, slot, now))
        mine = entry.monitor_pid == self.pid
        if not mine and entry.monitor_until > now:
            return False
        if mine and entry.monitor_until - now > MONITOR_LEASE / 2:
            return True  # renewed recently enough: no write needed
        return bool(self._exclusively(self._claim_monitor, slot, now))

    def _claim_monitor(self, slot: Slot, now: float) -> bool:
        entry = self.read(slot)
        if entry is None:
            # Its key is there but no reader takes it: torn by a writer that died inside a
            # write (_torn), or garbage. Nobody else would ever monitor it: start it over.
            if slot.index is None:
                return False
            self._write(slot.index, blank=True, key=slot.key, monitor_pid=self.pid,
                        monitor_until=now + MONITOR_LEASE)
            return True
        if entry.monitor_pid not in (0, self.pid) and entry.monitor_until > now:
            return False
        self._write(slot.index, monitor_pid=self.pid, monitor_until=now + MONITOR_LEASE)
        return True

    # -- process slots ------------------------------------------------------------------------

    def _claim_process_slot(self) -> int | None:
        for j in range(PROCS):
            if _lock(self.fd, _PROC_LOCK + j, fcntl.F_WRLCK):
                self._publish_raw(j, {"pid": os.getpid(), "pools": []})
                return j
        return None

    def publish(self, pool_id: int, summary: dict) -> None:
        """This process's summary of one pool, for the host-wide view."""
        if self.proc is None:
            return
        with self._lock:
            self._published[pool_id] = summary
            pools = list(self._published.values())
        self._publish_raw(self.proc, {"pid": os.getpid(), "pools": pools})

    def forget(self, pool_id: int) -> None:
        self._published.pop(pool_id, None)

    def _publish_raw(self, j: int, payload: dict) -> None:
        data = json.dumps(payload, separators=(",", ":")).encode()[:PAYLOAD_MAX]
        at = HEADER_SIZE + SLOTS * SLOT_SIZE + j * PROC_SIZE
        seq = struct.unpack_from("<Q", self.map, at)[0]
        struct.pack_into("<Q", self.map, at, seq | 1)
        self.map[at + _PROC.size:at + _PROC.size + len(data)] = data
        _PROC.pack_into(self.map, at, seq | 1, os.getpid(), 0, monotonic(), len(data))
        struct.pack_into("<Q", self.map, at, (seq | 1) + 1)

    def processes(self) -> list[dict]:
        """The summaries of every live process sharing this board (this one included)."""
        found = []
        for j in range(PROCS):
            if j != self.proc and not _locked_by_other(self.fd, _PROC_LOCK + j):
                continue  # nobody holds it: a free slot, or a process that died
            at = HEADER_SIZE + SLOTS * SLOT_SIZE + j * PROC_SIZE
            for _ in range(20):
                seq, pid, _, updated, length = _PROC.unpack_from(self.map, at)
                data = bytes(self.map[at + _PROC.size:at + _PROC.size + min(length, PAYLOAD_MAX)])
                if seq & 1 or struct.unpack_from("<Q", self.map, at)[0] != seq:
                    continue
                try:
                    summary = json.loads(data) if data else {"pid": pid, "pools": []}
                except ValueError:
                    break
                summary["age"] = round(monotonic() - updated, 3)
                found.append(summary)
                break
        return found


def after_fork_in_child() -> None:
    for board in list(Board._open.values()):
        board.after_fork_in_child()
    Board._open_lock = threading.Lock()


def state_code(state: str) -> int:
    return CODES.get(state, NONE)
