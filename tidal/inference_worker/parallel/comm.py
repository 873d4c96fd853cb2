"""The collectives tensor parallelism needs, behind one interface.

- :class:`LocalComm`: one rank; every collective is the identity.
- :class:`TorchComm`: ``torch.distributed`` over the process group the launcher made: NCCL on
  GPUs, gloo on CPU. ``async_op=True`` runs the all-reduce on gloo's threads or NCCL's stream;
  ``Handle.wait()`` orders its consumer after it (on a GPU without blocking the host).
- :class:`RecordingComm`: wraps another and records the order in which all-reduces are issued
  and waited for (the ISO schedule's tests check it).
- :class:`NoopComm`: pretends to be ``world`` ranks but moves nothing (compute-only timings).
- :class:`ProxyComm`: one GPU pretending to be ``world`` ranks: an all-reduce becomes a copy of
  the bytes a ring all-reduce moves, on a side stream (the copy engine), so the ISO schedule's
  overlap can be timed on one GPU. The sum is not computed: results are meaningless, timings
  are labelled "proxy".

Every all-reduce sums in place and returns its tensor; a rank that issued an asynchronous one
keeps the tensor alive and unread until it waited.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.distributed as dist


class Handle(Protocol):
    def wait(self) -> None: ...


class Comm(Protocol):
    # Read-only in the protocol, so that a wrapper's properties (RecordingComm) satisfy it.
    @property
    def rank(self) -> int: ...

    @property
    def world(self) -> int: ...

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor: ...

    def all_reduce_async(self, tensor: torch.Tensor) -> Handle: ...

    def gather_last_dim(self, tensor: torch.Tensor) -> torch.Tensor | None:
        """Every rank's ``tensor`` concatenated along the last dimension, on rank 0 (None on
        the others): the vocabulary-parallel LM head's logits."""

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (the step plan of the control plane)."""


class _Done:
    def wait(self) -> None:
        return None


@dataclass
class _Work:
    work: Any  # torch.distributed.Work

    def wait(self) -> None:
        self.work.wait()


class LocalComm:
    """One rank: nothing to communicate."""

    rank = 0
    world = 1

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def all_reduce_async(self, tensor: torch.Tensor) -> Handle:
        return _Done()

    def gather_last_dim(self, tensor: torch.Tensor) -> torch.Tensor | None:
        return tensor

    def broadcast_object(self, obj: Any) -> Any:
        return obj


class NoopComm(LocalComm):
    """``world`` ranks whose collectives move nothing: the compute alone, for timing."""

    def __init__(self, rank: int, world: int) -> None:
        self.rank = rank
        self.world = world

    def gather_last_dim(self, tensor: torch.Tensor) -> torch.Tensor | None:
        if self.rank != 0:
            return None
        return torch.cat([tensor] * self.world, dim=-1)


class TorchComm:
    """The default ``torch.distributed`` group for data (NCCL or gloo) and a gloo group for
    Python objects (NCCL cannot send them without a GPU copy)."""

    def __init__(self, control: Any | None = None) -> None:
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        self.control = control

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(tensor)
        return tensor

    def all_reduce_async(self, tensor: torch.Tensor) -> Handle:
        work = dist.all_reduce(tensor, async_op=True)
        assert work is not None
        return _Work(work)

    def gather_last_dim(self, tensor: torch.Tensor) -> torch.Tensor | None:
        parts = [torch.empty_like(tensor) for _ in range(self.world)] if self.rank == 0 else None
        dist.gather(tensor.contiguous(), parts, dst=0)
        return torch.cat(parts, dim=-1) if parts is not None else None

    def broadcast_object(self, obj: Any) -> Any:
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]


@dataclass
class RecordingComm:
    """Records ``("issue", n)`` and ``("wait", n)`` for the n-th asynchronous all-reduce (and
    ``("sync", n)`` for a blocking one), passing each call to ``inner``."""

    inner: Comm
    log: list[tuple[str, int]] = field(default_factory=list)
    _issued: int = 0

    @property
    def rank(self) -> int:
        return self.inner.rank

    @property
    def world(self) -> int:
        return self.inner.world

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        self.log.append(("sync", self._next()))
        return self.inner.all_reduce(tensor)

    def all_reduce_async(self, tensor: torch.Tensor) -> Handle:
        number = self._next()
        self.log.append(("issue", number))
        return _RecordedHandle(self.inner.all_reduce_async(tensor), self.log, number)

    def gather_last_dim(self, tensor: torch.Tensor) -> torch.Tensor | None:
        return self.inner.gather_last_dim(tensor)

    def broadcast_object(self, obj: Any) -> Any:
        return self.inner.broadcast_object(obj)

    def reset(self) -> None:
        """Forget what was recorded; numbering starts again at 0."""
        self.log.clear()
        self._issued = 0

    def _next(self) -> int:
        self._issued += 1
        return self._issued - 1


@dataclass
class _RecordedHandle:
    inner: Handle
    log: list[tuple[str, int]]
    number: int

    def wait(self) -> None:
        self.log.append(("wait", self.number))
        self.inner.wait()


class ProxyComm(NoopComm):
    """A same-GPU stand-in for ``world`` NCCL ranks (NCCL refuses two ranks on one GPU): each
    all-reduce copies 2(p-1)/p of the tensor's bytes device to device on a side stream, and its
    handle makes the compute stream wait for that copy, as ``work.wait()`` does for NCCL."""

    def __init__(self, rank: int, world: int, device: torch.device) -> None:
        super().__init__(rank, world)
        self.device = device
        self.stream = torch.cuda.Stream(device=device)  # type: ignore[no-untyped-call]

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        self.all_reduce_async(tensor).wait()
        return tensor

    def all_reduce_async(self, tensor: torch.Tensor) -> Handle:
        moved = max(1, tensor.numel() * 2 * (self.world - 1) // self.world)
        flat = tensor.reshape(-1)
        scratch = torch.empty(moved, dtype=tensor.dtype, device=tensor.device)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):  # device-to-device copies: the copy engine
            for start in range(0, moved, flat.numel()):
                size = min(flat.numel(), moved - start)
                scratch[start : start + size].copy_(flat[:size], non_blocking=True)
            done = torch.cuda.Event()  # type: ignore[no-untyped-call]
            done.record(self.stream)
        return _StreamHandle(done, scratch)


@dataclass
class _StreamHandle:
    event: Any  # torch.cuda.Event
    keep: torch.Tensor  # alive until waited: the side stream still reads it

    def wait(self) -> None:
        torch.cuda.current_stream().wait_event(self.event)
