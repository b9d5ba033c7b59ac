"""Digests of everything a run's numbers depend on (SPEC 8), so an edited, moved or copied piece of
a store is damage, not a number.

- the group attributes `config`, `models` and `schema_version`: one sha256, kept apart from them
  in the group attribute `integrity`, checked on every open (a mismatch: the run is broken);
- the arrays fixed when the run is made (`time`, `seed`, `label`, `radius`): a sha256 each, in the
  same record, checked on open (a mismatch: the run is damaged until compute rewrites them);
- each cell (r, m) of each per-cell array: a 64-bit BLAKE2b of (array name, r, m, the cell's
  bytes) in the array `cell_digest` (realization, model, cell array), written with the cell before
  its done flag and checked wherever damage is looked for (verify, status, compute, aggregate, plot);
- the aggregate arrays: a sha256 each, in the attributes of `aggregate/`, written after them.

Every digest binds its array's name (and a cell's position), so a chunk swapped with another or
copied from another run does not match. Chunks also carry zarr's CRC32C, which finds flipped bits
and truncation before any digest is computed. A run without the `integrity` record was made
before edtool kept digests (legacy): it opens, resumes and aggregates as before, unchecked by them.
"""

import hashlib
import json
from typing import Optional

import numpy as np

INTEGRITY_ATTR = "integrity"  # the group attribute holding the record
DIGEST_ARRAY = "cell_digest"  # (realization, model, cell array) uint64, 0 where never written
AGGREGATE_DIGESTS = "digests"  # the attribute of aggregate/ holding {array: sha256}
FORMAT = 1
FIXED_ARRAYS = ("time", "seed", "label", "radius")  # written once, when the run is made
MISMATCH = "does not match its digest (edited, moved or copied)"


def _bytes(values) -> bytes:
    """Values as digested: dtype, shape and little-endian bytes (strings as JSON)."""
    arr = np.asarray(values)
    if arr.dtype.kind in "OUT":
        return json.dumps([str(v) for v in arr.reshape(-1)]).encode()
    arr = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))
    return f"{arr.dtype.str}{arr.shape}".encode() + b"\0" + arr.tobytes()


def attributes_digest(config, models, schema_version) -> str:
    """sha256 of the attributes a run's numbers depend on, as canonical JSON."""
    text = json.dumps({"config": config, "models": models, "schema_version": schema_version}, sort_keys=True,
                      separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(text.encode()).hexdigest()


def array_digest(name: str, values) -> str:
    """sha256 of a whole array bound to its name."""
    return hashlib.sha256(name.encode() + b"\0" + _bytes(values)).hexdigest()


def cell_digest(name: str, r: int, m: int, values) -> int:
    """64-bit BLAKE2b of one cell's values bound to its array and position (as a uint64)."""
    h = hashlib.blake2b(f"{name}/{int(r)}/{int(m)}".encode() + b"\0" + _bytes(values), digest_size=8)
    return int.from_bytes(h.digest(), "little")


def make_record(config, models, schema_version, fixed: dict, cell_arrays) -> dict:
    """The `integrity` attribute of a new run: digests of its attributes and fixed arrays, and the
    order of the per-cell arrays along cell_digest's last dimension."""
    return {"format": FORMAT, "attributes": attributes_digest(config, models, schema_version),
            "arrays": {name: array_digest(name, values) for name, values in fixed.items()},
            "cell_arrays": list(cell_arrays)}


def record_problem(attrs: dict, members: set, cell_arrays: list, shapes: dict) -> Optional[str]:
    """Why a run's integrity record or its attributes cannot be trusted, or None (also None for a
    legacy run, which has no record)."""
    record = attrs.get(INTEGRITY_ATTR)
    if record is None:
        return f"array {DIGEST_ARRAY} is there but the group attribute {INTEGRITY_ATTR!r} is missing" \
            if DIGEST_ARRAY in members else None
    if not (isinstance(record, dict) and record.get("format") == FORMAT and isinstance(record.get("attributes"), str)
            and isinstance(record.get("arrays"), dict) and isinstance(record.get("cell_arrays"), list)):
        return f"group attribute {INTEGRITY_ATTR!r} is not a digest record edtool {FORMAT} writes"
    if attributes_digest(attrs.get("config"), attrs.get("models"), attrs.get("schema_version")) != record["attributes"]:
        return "group attributes config, models or schema_version differ from the digest recorded when the run " \
               "was made (edited?)"
    if record["cell_arrays"] != cell_arrays:
        return f"the run's per-cell arrays {cell_arrays} differ from those recorded {record['cell_arrays']}"
    fixed = [name for name in FIXED_ARRAYS if name in members]
    if sorted(record["arrays"]) != sorted(fixed):
        return f"the recorded digests name arrays {sorted(record['arrays'])}, the run has {sorted(fixed)}"
    if DIGEST_ARRAY not in members:
        return f"array {DIGEST_ARRAY} missing"
    r, m = shapes["done"]
    if shapes[DIGEST_ARRAY] != (r, m, len(cell_arrays)):
        return f"array {DIGEST_ARRAY} has shape {shapes[DIGEST_ARRAY]}, expected {(r, m, len(cell_arrays))}"
    return None


def aggregate_damage(group) -> dict:
    """Aggregate arrays that do not match the digests `aggregate` recorded, {name: why}; {} when
    there is no aggregate or it has no digests (made before them, or interrupted: `read_aggregate`
    then recomputes it)."""
    if "aggregate" not in group:
        return {}
    agg = group["aggregate"]
    digests = agg.attrs.get(AGGREGATE_DIGESTS)
    if not isinstance(digests, dict):
        return {}
    found = {}
    for name, digest in digests.items():
        try:
            values = np.asarray(agg[name][:])
        except KeyError:
            found[name] = "missing"
            continue
        except Exception as err:  # noqa: BLE001 (undecodable chunk or edited metadata)
            found[name] = f"unreadable ({reason(err)})"
            continue
        if array_digest(name, values) != digest:
            found[name] = MISMATCH
    return found


def reason(err: Exception) -> str:
    """Why a chunk did not read, in a few words."""
    text = str(err).lower()
    return "checksum mismatch" if "checksum" in text else f"{type(err).__name__}: {str(err)[:60]}"
