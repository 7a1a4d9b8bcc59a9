"""Every collective the training job issues, in one place, each on a device its process group serves.

A process group serves some device types only: NCCL serves CUDA tensors (a CPU tensor fails with "No backend
type associated with device type cpu"), ``cpu:gloo`` CPU tensors, plain gloo both. The job agrees on two kinds of
values, and each goes where it is served without a detour through the other device:

* device values (the non-finite verdict of a step, training and evaluation counts) stay on the training device
  and are reduced on the default group (NCCL on GPUs, gloo on CPUs): no host round trip, nothing read;
* host values (stop requests, whether every rank wrote its checkpoint) are reduced on a CPU group: the default
  group where it serves CPU tensors, else a gloo group made once beside it (``init``), so agreeing on a host value
  every step never waits for the GPU.

Nothing else in the project calls ``torch.distributed`` (tests/test_presets.py checks it). Without a process group
(or with one rank) every function here is the identity.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Sequence
from datetime import timedelta

import torch
import torch.distributed as tdist

from launch.env import RankInfo

_OPS = {"sum": tdist.ReduceOp.SUM, "max": tdist.ReduceOp.MAX, "min": tdist.ReduceOp.MIN}
_host_group: tdist.ProcessGroup | None = None  # None: the default group serves CPU tensors itself


def init(info: RankInfo, device: str, timeout_s: int) -> None:
    """Join the job's process group from the rank environment (no hostfile): NCCL on GPUs, gloo on CPUs."""
    import deepspeed

    if device == "cpu":
        ds_torch = importlib.import_module("deepspeed.comm.torch")  # (attribute access would give torch itself)
        # DeepSpeed JIT-compiles a shared-memory all-reduce op on CPU; it serves only its inference all-reduce,
        # never training (gloo does that). Skipping it saves ~20-120 s per start and removes a hang: a process
        # killed mid-compile leaves torch's build lock behind and every later start waits on it forever.
        ds_torch.build_shm_op = lambda: None
    for k, v in info.torch_env().items():
        os.environ[k] = v
    if device == "cuda":
        torch.cuda.set_device(info.local_rank % max(1, torch.cuda.device_count()))
    deepspeed.init_distributed(dist_backend="nccl" if device == "cuda" else "gloo", auto_mpi_discovery=False,
                               verbose=False, timeout=timedelta(seconds=timeout_s), rank=info.rank,
                               world_size=info.world_size)
    setup_host_group(timeout_s)


def setup_host_group(timeout_s: int = 300) -> None:
    """Make the CPU group for host values if the default group does not serve CPU tensors (call on every rank
    right after the default group exists: creating a group is itself collective)."""
    global _host_group
    _host_group = None
    if active() and "cpu" not in served_device_types():
        _host_group = tdist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))


def active() -> bool:
    """A process group exists (collectives are real)."""
    return tdist.is_available() and tdist.is_initialized()


def world_size() -> int:
    return tdist.get_world_size() if active() else 1


def served_device_types(group: tdist.ProcessGroup | None = None) -> set[str]:
    """Device types the group's backends serve, from its backend config ("cuda:nccl", "cpu:gloo,cuda:gloo")."""
    config = str(tdist.get_backend_config(group))
    return {entry.split(":", 1)[0].strip() for entry in config.split(",") if ":" in entry}


def collective_device(prefer: torch.device | str | None = None) -> torch.device:
    """The device for a tensor reduced on the default group: ``prefer`` (e.g. the training device) when the group
    serves it, else CPU when served, else CUDA."""
    served = served_device_types() if active() else {"cpu", "cuda"}
    if prefer is not None and torch.device(prefer).type in served:
        return torch.device(prefer)
    if "cpu" in served:
        return torch.device("cpu")
    return torch.device("cuda")  # the current CUDA device (init sets it to this rank's GPU)


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Reduce a device tensor in place over every rank and return it, without reading it on the host. A tensor
    on a device the default group does not serve travels to one it does and back."""
    if world_size() == 1:
        return t
    if t.device.type in served_device_types():
        tdist.all_reduce(t, op=_OPS[op])
        return t
    moved = t.to(collective_device())
    tdist.all_reduce(moved, op=_OPS[op])
    return t.copy_(moved)


def all_reduce_host(values: Sequence[float], op: str = "sum", dtype: torch.dtype = torch.float64) -> list:
    """Reduce host numbers over every rank on the CPU group; returns them as a list (ints for integer dtypes)."""
    t = torch.tensor(list(values), dtype=dtype)
    if world_size() > 1:
        tdist.all_reduce(t, op=_OPS[op], group=_host_group)
    return t.tolist()


def barrier() -> None:
    """Wait for every rank (on the CPU group: a host-side rendezvous with no device involved)."""
    if active():
        tdist.barrier(group=_host_group)


def shutdown(sync: bool = True) -> None:
    """Leave the process group; ``sync=False`` after a failure, when a peer may be blocked in another collective
    (a barrier could pair with it and hang until the timeout): exiting closes our sockets, which fails the peer's
    collective at once."""
    global _host_group
    if not active():
        return
    try:
        if sync:
            barrier()
        tdist.destroy_process_group()
    except Exception:  # a peer already gone: nothing left to synchronise
        pass
    _host_group = None
