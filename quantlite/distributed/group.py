"""The process group of a distributed run: joined with a timeout, every wait bounded, and the ranks'
packed directories compared before any work.

torchrun starts one process per rank and tells it where the others are (RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT, LOCAL_RANK). Backend: gloo on the CPU, NCCL for CUDA devices.

No wait is unbounded. A rank whose process ended closes its sockets, and gloo fails the peers'
pending send or receive at once ("Connection closed by peer"); a rank that is alive but stuck
is caught by the timeout every wait carries (`timeout`, default DEFAULT_TIMEOUT_SECONDS: it must
cover the slowest step between two messages, e.g. a stage's first pass reading its resident layers
from disk). Either way the rank raises DistributedError naming the peer, so the command ends with
one line and exit status 2 instead of hanging.
"""
from __future__ import annotations

import datetime
import os
import socket
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from quantlite.distributed import DEFAULT_TIMEOUT_SECONDS, launched_by_torchrun
from quantlite.errors import QuantliteError
from quantlite.sources.checksum import sha256_file


class DistributedError(QuantliteError, RuntimeError):
    """A distributed run cannot start or go on: a rank died or timed out, the ranks disagree."""


@dataclass(frozen=True)
class Group:
    rank: int
    world: int
    backend: str                 # "gloo" or "nccl"
    wire: torch.device           # where sent and received tensors live (cpu for gloo, the GPU for NCCL)
    timeout: datetime.timedelta  # the bound on every wait

    @property
    def seconds(self) -> float:
        return self.timeout.total_seconds()


def join(device: torch.device, timeout: float = DEFAULT_TIMEOUT_SECONDS) -> Group:
    """Join the process group torchrun describes (already joined: reuse it). Raises DistributedError."""
    if not launched_by_torchrun():
        raise DistributedError("a distributed run needs the environment torchrun sets (RANK, WORLD_SIZE > 1, MASTER_ADDR): "
                               "start it as `torchrun --nproc-per-node N -m quantlite ...`")
    if not (isinstance(timeout, (int, float)) and timeout > 0):
        raise DistributedError(f"the timeout must be a positive number of seconds, got {timeout!r}")
    backend = "nccl" if device.type == "cuda" else "gloo"
    bound = datetime.timedelta(seconds=timeout)
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        try:
            dist.init_process_group(backend, timeout=bound)
        except (RuntimeError, ValueError) as error:  # DistStoreError / DistNetworkError are RuntimeErrors
            where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
            raise DistributedError(f"rank {os.environ.get('RANK')} of {os.environ.get('WORLD_SIZE')} could not join the "
                                   f"process group at {where} within {timeout:g} s: {_first_line(error)}") from error
    elif dist.get_backend() != backend:
        raise DistributedError(f"the process group runs {dist.get_backend()}, device {device} needs {backend}")
    wire = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    return Group(dist.get_rank(), dist.get_world_size(), backend, wire, bound)


def leave() -> None:
    """Leave the process group after a run that ended well."""
    if dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def bounded(group: Group, what: str):
    """Turn a failed or timed-out collective (run inside) into DistributedError naming `what`."""
    try:
        yield
    except RuntimeError as error:  # gloo and NCCL failures, timeouts included, are RuntimeErrors
        if isinstance(error, QuantliteError):
            raise
        raise DistributedError(f"rank {group.rank}: {what} failed ({_first_line(error)}); another rank died, "
                               f"or did not answer within the {group.seconds:g} s timeout (see its own output)") from error


def send(group: Group, tensor: torch.Tensor, peer: int):
    """Start sending `tensor` to `peer`; returns the work to `finish` (tensor stays alive with it)."""
    tensor = tensor.to(group.wire).contiguous()
    with bounded(group, f"sending to rank {peer}"):
        return dist.isend(tensor, peer), tensor


def finish(group: Group, sent, peer: int) -> None:
    """Wait, bounded, for a `send` to complete."""
    with bounded(group, f"sending to rank {peer}"):
        sent[0].wait(group.timeout)


def receive(group: Group, shape: tuple, dtype: torch.dtype, peer: int) -> torch.Tensor:
    """A tensor of this shape and dtype from `peer`, waited for at most the timeout."""
    tensor = torch.empty(shape, dtype=dtype, device=group.wire)
    with bounded(group, f"waiting for rank {peer}"):
        dist.irecv(tensor, peer).wait(group.timeout)
    return tensor


def same_everywhere(group: Group, what: str, value) -> list:
    """Every rank's `value` (all_gather_object); raises DistributedError, naming the ranks and hosts,
    unless all are equal. `what` names the value in the message."""
    here = (value, socket.gethostname())
    gathered: list = [None] * group.world
    with bounded(group, f"comparing {what} across ranks"):
        dist.all_gather_object(gathered, here)
    differ = [rank for rank, (other, _) in enumerate(gathered) if other != gathered[0][0]]
    if differ:
        shown = ", ".join(f"rank {rank} on {host}: {other}" for rank, (other, host) in enumerate(gathered))
        raise DistributedError(f"the ranks disagree on {what} ({shown})")
    return [other for other, _ in gathered]


def manifest_digest(path: str | Path) -> str:
    """sha256 of a packed directory's quantlite.json (which records every shard's sha256): equal on
    two ranks means the same model, converted the same way."""
    from quantlite.packed import MANIFEST

    return sha256_file(Path(path) / MANIFEST)


def broadcast(group: Group, value, source: int):
    """`value` of rank `source`, on every rank (broadcast_object_list, bounded)."""
    box = [value if group.rank == source else None]
    with bounded(group, f"receiving a result from rank {source}"):
        dist.broadcast_object_list(box, src=source)
    return box[0]


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return (text[0] if text else error.__class__.__name__)[:300]
