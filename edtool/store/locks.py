"""Who may touch a run: the realizations a shard owns, pid lock files that keep two computes off the
same realizations, and the flock access lock that keeps readers off a run being replaced."""

import datetime
import fcntl
import json
import os
import re
import socket
import time
import uuid
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

from edtool.errors import EdtoolError
from edtool.store.leftovers import leftover_name
from edtool.store.location import STORE_NAME, local_dir, make_dir, run_location

ACCESS_LOCK_NAME = ".edtool-access.lock"  # readers shared, replacing/aggregating exclusive (flock)


def shard_realizations(n_realizations: int, shard: Optional[tuple] = None) -> list:
    """The realizations shard (i, K) owns: i, i+K, i+2K, ...; all of them when shard is None."""
    if shard is None:
        return list(range(n_realizations))
    i, k = _check_shard(shard)
    return list(range(i, n_realizations, k))


def _check_shard(shard) -> tuple:
    i, k = (int(v) for v in shard)
    if not 0 <= i < k:
        raise EdtoolError(f"shard {i}/{k} is not valid: use i/K with 0 <= i < K")
    return i, k


_LOCK_NAME = re.compile(r"lock(\.shard-\d+-of-\d+)?")


def _lock_name(shard) -> str:
    if shard is None:
        return "lock"
    i, k = _check_shard(shard)
    return f"lock.shard-{i}-of-{k}"


def _conflicts(name: str, other: str) -> bool:
    """Whether two lock files guard overlapping realizations (same name is handled by O_EXCL)."""
    if name == other:
        return False
    if name == "lock" or other == "lock":
        return True
    return name.rsplit("-of-", 1)[1] != other.rsplit("-of-", 1)[1]  # different K: overlapping shards


def _read_lock(path: Path) -> Optional[dict]:
    """The holder recorded in a lock file, or None if it is unreadable (being written, or corrupt)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _not_a_record(info: Optional[dict]) -> bool:
    """A lock file that reads whole but is not what run_lock writes (an integer pid and a host): no
    live edtool holds it (a lock being written does not read as JSON), so it is stale."""
    return info is not None and not (isinstance(info, dict) and type(info.get("pid")) is int
                                     and isinstance(info.get("host"), str))


def _refuse_odd_lock(path: Path):
    """A lock name taken by a folder (or anything but a file) is not edtool's: never moved or deleted."""
    if path.exists() and not path.is_file():
        raise EdtoolError(f"{path} is a folder (or not a file), not edtool's lock file; move it away or rename "
                          "it, then run the command again")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_stale(info: Optional[dict], path: Path) -> bool:
    """A lock is stale when its holder ran on this host and is gone (or it is unreadable and old)."""
    if _not_a_record(info):
        return True
    if info is None:
        try:
            return datetime.datetime.now().timestamp() - path.stat().st_mtime > 10
        except FileNotFoundError:
            return False
    return info.get("host") == socket.gethostname() and not _pid_alive(int(info.get("pid", -1)))


def _refuse(run_dir, path: Path, info: Optional[dict]):
    if info is None or _not_a_record(info):
        raise EdtoolError(f"run {run_dir} has a lock being written ({path}); try again in a few seconds")
    what = f" (shard {info['shard']})" if info.get("shard") else ""
    raise EdtoolError(f"run {run_dir} is being computed{what} by pid {info.get('pid')} on host {info.get('host')} "
                      f"since {info.get('started')}; wait for it to finish, or if that process is gone "
                      f"delete {path}")


def lock_holders(run_dir) -> list:
    """Who holds locks on a run: one dict per lock file (pid, host, started, shard, path, stale)."""
    base = local_dir(run_location(run_dir))
    if base is None or not base.is_dir():
        return []
    holders = []
    for path in sorted(base.glob("lock*")):
        if _LOCK_NAME.fullmatch(path.name) and path.is_file():
            info = _read_lock(path)
            info = info if isinstance(info, dict) and not _not_a_record(info) else {}
            holders.append({"pid": info.get("pid"), "host": info.get("host"), "started": info.get("started"),
                            "shard": info.get("shard"), "path": str(path), "stale": _is_stale(info or None, path)})
    return holders


@contextmanager
def run_lock(run_dir, shard: Optional[tuple] = None):
    """Hold the exclusive lock file of a run (or of one shard (i, K) of it) while computing.

    A live holder makes this raise EdtoolError; a stale one (same host, process gone) is taken
    over with a warning. Shards of one split (same K) lock independently; an unsharded lock
    excludes every shard. Non-local URLs are not locked (a warning says so). Yields the lock path.
    """
    base = local_dir(run_location(run_dir))
    if base is None:
        warnings.warn(f"run {run_dir} is not on a local file system: no lock is taken; make sure only "
                      "one process computes each realization")
        yield None
        return
    make_dir(base)
    name = _lock_name(shard)
    path = base / name
    me = {"pid": os.getpid(), "host": socket.gethostname(), "token": uuid.uuid4().hex,
          "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
          "shard": None if shard is None else "{}/{}".format(*_check_shard(shard))}
    _acquire(base, path, me)
    try:
        for other in sorted(base.glob("lock*")):
            if _LOCK_NAME.fullmatch(other.name) and _conflicts(name, other.name) and other.is_file():
                info = _read_lock(other)
                if other.exists() and not _is_stale(info, other):
                    _refuse(run_dir, other, info)
        yield path
    finally:
        if (_read_lock(path) or {}).get("token") == me["token"]:
            path.unlink(missing_ok=True)


def _acquire(base: Path, path: Path, me: dict):
    """Create `path` exclusively with our record; take it over once if its holder is gone."""
    for attempt in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            _refuse_odd_lock(path)
            info = _read_lock(path)
            if attempt or not _is_stale(info, path):
                _refuse(base, path, info)
            _take_over(base, path, info)
            continue
        except OSError as err:
            raise EdtoolError(f"cannot write the lock file {path} ({err.strerror or err}): "
                              "choose a writable --run-dir") from err
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return


def _take_over(base: Path, path: Path, stale: Optional[dict]):
    """Remove a stale lock, making sure it is still the stale one (not a fresh lock of a racing process)."""
    moved = path.with_name(leftover_name(f"{path.name}.stale"))
    try:
        os.rename(path, moved)
    except FileNotFoundError:
        return  # someone else removed it; the next O_EXCL attempt decides
    now = _read_lock(moved)
    if stale is not None and now != stale:  # (a record's token tells it from any other)
        try:  # we moved a fresh lock: put it back and give way
            os.link(moved, path)
        finally:
            moved.unlink(missing_ok=True)
        _refuse(base, path, now)
    moved.unlink(missing_ok=True)
    holder = "an unreadable lock" if stale is None or _not_a_record(stale) else (
        f"the stale lock of pid {stale.get('pid')} on {stale.get('host')} (since {stale.get('started')}; "
        "that process is gone)")
    warnings.warn(f"run {base}: taking over {holder}; finished cells are kept, the rest are recomputed")


# ---------------------------------------------------------------- readers and writers of a whole run

LOCK_WAIT = 600.0  # seconds a command waits for another's access before giving up


@contextmanager
def access_lock(location, exclusive: bool = False, doing: str = "", wait: Optional[float] = None,
                create: bool = False):
    """Hold the run's access lock: shared for readers (plot, verify, status), exclusive for whoever
    replaces the store or writes its aggregate, so nobody reads a run while it is deleted or rewritten.

    Computing cells needs no access lock (cells are committed by their done flag, and `run_lock`
    keeps writers apart). An flock on `<run>/.edtool-access.lock`, released by the kernel when its
    process dies, so it never goes stale. Waits up to `wait` seconds (LOCK_WAIT; EdtoolError after),
    warning once that it waits. Non-local runs, run directories a reader cannot write, and (unless
    `create`, which makes the directory) folders that hold no run are not locked.
    """
    base = local_dir(run_location(location))
    if base is None or not (create or (base / ACCESS_LOCK_NAME).exists() or (base / STORE_NAME).exists()):
        yield  # not a run (yet): nothing to protect, and no lock file left in somebody's folder
        return
    if create:
        make_dir(base)
    path = base / ACCESS_LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        if exclusive:
            raise EdtoolError(f"cannot write the lock file {path}: choose a writable --run-dir") from None
        yield  # a read-only run directory: nobody can replace the run from here either
        return
    try:
        _flock(fd, base, exclusive, LOCK_WAIT if wait is None else wait)
        if exclusive:  # who holds it, for the messages of those who wait
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "doing": doing}).encode(), 0)
        yield
    finally:
        if exclusive:
            os.ftruncate(fd, 0)
        os.close(fd)  # releases the flock


def _flock(fd: int, base: Path, exclusive: bool, wait: float):
    mode = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB
    deadline, warned = time.monotonic() + wait, False
    while True:
        try:
            fcntl.flock(fd, mode)
            return
        except BlockingIOError:
            pass
        holder = access_holder(base)
        if time.monotonic() >= deadline:
            raise EdtoolError(f"run {base} is busy{holder}: try again when that has finished")
        if not warned:
            warnings.warn(f"run {base} is busy{holder}: waiting for it")
            warned = True
        time.sleep(0.05)


def access_holder(base: Path) -> str:
    """Who holds a run's access lock exclusively, as ' (pid N on host: doing)', or '' if unknown
    (readers do not sign)."""
    try:
        info = json.loads((Path(base) / ACCESS_LOCK_NAME).read_text() or "{}")
    except (OSError, ValueError):
        return ""
    if not info:
        return " (being read by another edtool process)"
    return f" (pid {info.get('pid')} on {info.get('host')}: {info.get('doing') or 'writing'})"
