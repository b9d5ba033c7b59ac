"""What killed commands leave in a run directory, found, reported by status and cleaned up by the
next compute or aggregate on that run when provably stale.

A store being built is `.ed.zarr.partial-<pid>@<host>-<token>`, an old store being deleted by
--overwrite `.ed.zarr.deleting-<pid>@<host>-<token>`, a lock being taken over
`lock….stale-<pid>@<host>-<token>`. One is stale when the process that made it ran on this host and
is gone (names from before the host was recorded: the process is gone and the folder is over an
hour old). Anything else is reported and kept; so is a `lock` that is a folder (not edtool's).
"""

import datetime
import os
import re
import shutil
import socket
import uuid
import warnings
from pathlib import Path
from typing import List

_NAME = re.compile(r"(?:\.ed\.zarr\.(?P<store>partial|deleting)|(?P<lock>lock(?:\.shard-\d+-of-\d+)?)\.stale)"
                   r"-(?P<pid>\d+)(?:@(?P<host>[^/@]+?))?-[0-9a-f]{8}")
_LOCK = re.compile(r"lock(\.shard-\d+-of-\d+)?")
LEGACY_AGE = 3600.0  # seconds: a leftover without a host counts as stale only when older
KINDS = {"partial": "a store being built", "deleting": "an old store being deleted (--overwrite)",
         "lock": "a lock being taken over"}


def leftover_name(prefix: str) -> str:
    """A name for a temporary beside the run: `<prefix>-<pid>@<host>-<token>`, which tells who made it."""
    return f"{prefix}-{os.getpid()}@{socket.gethostname()}-{uuid.uuid4().hex[:8]}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def find_leftovers(base) -> List[dict]:
    """Leftovers in a local run directory: {path, kind, pid, host, stale} each; [] if none (or no folder)."""
    base = Path(base)
    try:
        names = sorted(os.listdir(base))
    except OSError:
        return []
    found, now = [], datetime.datetime.now().timestamp()
    for name in names:
        path = base / name
        match = _NAME.fullmatch(name)
        if match:
            pid, host = int(match["pid"]), match["host"]
            try:
                old = now - path.lstat().st_mtime > LEGACY_AGE
            except OSError:
                continue
            stale = (host == socket.gethostname() or (host is None and old)) and pid != os.getpid() and not _alive(pid)
            found.append({"path": str(path), "kind": KINDS[match["store"] or "lock"], "pid": pid, "host": host,
                          "stale": stale})
        elif _LOCK.fullmatch(name) and path.exists() and not path.is_file():
            found.append({"path": str(path), "kind": "a folder named like edtool's lock file (not edtool's)",
                          "pid": None, "host": None, "stale": False})
    return found


def clean_leftovers(base) -> List[str]:
    """Remove the stale leftovers in a local run directory (one warning names them); returns their paths."""
    removed = []
    for item in find_leftovers(base):
        if not item["stale"]:
            continue
        path = Path(item["path"])
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        except OSError:
            continue  # still there: status keeps reporting it
        removed.append(item)
    if removed:
        names = ", ".join(f"{Path(i['path']).name} ({i['kind']}, pid {i['pid']} gone)" for i in removed)
        warnings.warn(f"run {base}: removed what killed commands left: {names}")
    return [i["path"] for i in removed]


def describe(item: dict) -> str:
    """One leftover for status: its name, what it is, whether the next compute or aggregate removes it."""
    who = f"pid {item['pid']}" + (f" on {item['host']}" if item["host"] else "") if item["pid"] is not None else ""
    fate = ("stale: the next compute or aggregate on this run removes it" if item["stale"]
            else "kept: " + ("its process may still run" if item["pid"] is not None else "move it away yourself"))
    return f"{Path(item['path']).name}: {item['kind']}" + (f" by {who}" if who else "") + f"; {fate}"
