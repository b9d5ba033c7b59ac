"""Scale-out of `edtool compute` over processes: joining torchrun's process group (a rank that waits in
vain stops with one line), the barriers the ranks meet at and leaving the group; `--shard i/K` needs none
of this. The ranks exchange no tensors, they only wait for each other, so the group is gloo's on CPU and
GPU alike: no NCCL communicator, so no device_id to bind (each rank's GPU is chosen by
edtool.device.cuda_index)."""

import os
from contextlib import contextmanager

from edtool.errors import EdtoolError
from edtool.config import ComputeConfig


def distributed_shard(cfg: ComputeConfig):
    """Under torchrun/srun (WORLD_SIZE > 1) join the process group; return (rank, world) or None."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise EdtoolError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number of processes; unset it to "
                          "run one process, or start the ranks with torchrun") from None
    if world <= 1:
        return None
    if cfg.shard is not None:
        raise EdtoolError("--shard and torchrun split the realizations each on their own: use one of them")
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise EdtoolError(f"WORLD_SIZE={world} is set but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
                          f"not: start the ranks with torchrun (torchrun --nproc-per-node {world} -m edtool compute "
                          "...), or unset WORLD_SIZE to run one process")
    try:
        rank = int(os.environ["RANK"])
    except ValueError:
        raise EdtoolError(f"RANK={os.environ['RANK']!r} is not a rank number; start the ranks with torchrun") from None
    if not 0 <= rank < world:
        raise EdtoolError(f"RANK={rank} with WORLD_SIZE={world}: ranks go from 0 to {world - 1}; start the ranks "
                          "with torchrun, or fix RANK/WORLD_SIZE")
    import torch.distributed as dist

    if not dist.is_initialized():
        _join(dist, rank, world)
    return dist.get_rank(), dist.get_world_size()


@contextmanager
def _stderr_kept_unless_failed():
    """Hold what the process writes to its stderr (file descriptor 2, where C++ logs go) meanwhile; pass it
    on if the block succeeds, drop it if it raises (the error then says what happened, in one line)."""
    import sys
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        held.seek(0)  # reached only without an error
        sys.stderr.write(held.read().decode(errors="replace"))


RENDEZVOUS_TIMEOUT = 300  # seconds the ranks wait for each other at start (EDTOOL_RENDEZVOUS_TIMEOUT overrides)
# the barriers wait while other ranks compute (a resumed rank with nothing left waits for a whole shard):
# no timeout in practice; a rank that dies closes its connection, which ends the wait with an error
WAIT_TIMEOUT_DAYS = 365
_joined = {}  # "wait": the barrier group of the process group edtool joined (empty: none, or the caller's)


def _join(dist, rank: int, world: int) -> None:
    """init_process_group (gloo), but a rank that waits in vain for the others stops with one line after
    EDTOOL_RENDEZVOUS_TIMEOUT seconds instead of hanging; then the group the barriers use, which waits as
    long as the other ranks compute."""
    from datetime import timedelta

    text = os.environ.get("EDTOOL_RENDEZVOUS_TIMEOUT", str(RENDEZVOUS_TIMEOUT))
    try:
        seconds = float(text)
        assert 0 < seconds < 1e7
    except (ValueError, AssertionError):
        raise EdtoolError(f"EDTOOL_RENDEZVOUS_TIMEOUT={text!r} is not a number of seconds (e.g. 300)") from None
    where = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    try:
        with _stderr_kept_unless_failed():  # torch's C++ logs each connection retry with a stack trace
            dist.init_process_group(backend="gloo", timeout=timedelta(seconds=seconds), rank=rank, world_size=world)
    except Exception as e:  # DistStoreError, RuntimeError: torch names no common type for "the others never came"
        raise EdtoolError(f"rank {rank} of {world}: the other ranks did not join at {where} within {seconds:g}s "
                          f"({' '.join(str(e).split())[:160]}); start every rank (torchrun does), check "
                          "MASTER_ADDR/MASTER_PORT, or raise EDTOOL_RENDEZVOUS_TIMEOUT") from None
    _joined["wait"] = dist.new_group(backend="gloo", timeout=timedelta(days=WAIT_TIMEOUT_DAYS))


def barrier():
    """Wait until every rank is here, however long the others compute (in a process group the caller
    made, with its timeout)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier(group=_joined.get("wait"))


def leave():
    """Destroy the process group edtool joined (one a caller made stays theirs)."""
    import torch.distributed as dist

    if _joined:
        _joined.clear()
        dist.destroy_process_group()
