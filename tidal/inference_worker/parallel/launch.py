"""Run a function on ``world`` tensor-parallel ranks, one process each.

CPU ranks talk over gloo, GPU ranks over NCCL (rank r on ``cuda:r``). Each rank calls
``fn(comm, device, *args)`` with a :class:`~.comm.TorchComm`; :func:`launch` returns every
rank's result in rank order. A rank that raises fails the launch with its traceback; a rank
that dies or stalls fails it after ``timeout`` seconds. The other ranks are then terminated
(they may be blocked in a collective with the dead one), so a launch never hangs.

Results travel pickled as bytes, not through torch's shared-memory tensor sharing, so that a
rank may exit as soon as it has sent them.
"""

from __future__ import annotations

import os
import pickle
import queue
import socket
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tidal.inference_worker.parallel.comm import TorchComm

RankFn = Callable[..., Any]  # fn(comm: TorchComm, device: torch.device, *args) -> result


class RankError(RuntimeError):
    """A rank raised, died or timed out; the message names the rank and carries its traceback."""


def free_port() -> int:
    """A TCP port free now on 127.0.0.1 (the rendezvous; a race with other binders is possible
    but harmless in tests: init fails loudly)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def launch(
    fn: RankFn,
    world: int,
    *args: Any,
    cuda: bool = False,
    timeout: float = 120.0,
) -> list[Any]:
    """``fn(comm, device, *args)`` on ranks ``0 .. world - 1``; their results in rank order.
    ``fn`` and ``args`` must be picklable (a module-level function): ranks are spawned."""
    context = mp.get_context("spawn")
    results: Any = context.Queue()
    port = free_port()
    processes = [
        context.Process(
            target=_rank_main, args=(fn, rank, world, port, cuda, timeout, args, results)
        )
        for rank in range(world)
    ]
    for process in processes:
        process.start()
    try:
        return _collect(processes, results, timeout)
    finally:
        for process in processes:
            if process.is_alive():
                process.terminate()
            process.join(5)


def _collect(processes: list[Any], results: Any, timeout: float) -> list[Any]:
    """Every rank's result, or RankError at the first rank that failed, died or is late."""
    deadline = time.monotonic() + timeout
    done: dict[int, Any] = {}
    while len(done) < len(processes):
        try:
            rank, ok, payload = results.get(timeout=0.2)
        except queue.Empty:
            _check_alive(processes, done, deadline)
            continue
        if not ok:
            raise RankError(f"rank {rank} of {len(processes)} failed:\n{payload}{_dead(processes)}")
        done[rank] = pickle.loads(payload)
    return [done[rank] for rank in range(len(processes))]


def _dead(processes: list[Any], grace: float = 1.0) -> str:
    """A note naming the ranks that died: a collective fails on the survivors when a peer dies,
    and the dead rank, not the survivor's error, is the cause."""
    time.sleep(grace)  # let a dying peer's exit code settle
    dead = [
        f"rank {rank} died (exit code {p.exitcode})"
        for rank, p in enumerate(processes)
        if not p.is_alive() and p.exitcode not in (0, None)
    ]
    return "\n(" + "; ".join(dead) + ")" if dead else ""


def _check_alive(processes: list[Any], done: dict[int, Any], deadline: float) -> None:
    for rank, process in enumerate(processes):
        if rank not in done and not process.is_alive() and process.exitcode != 0:
            raise RankError(
                f"rank {rank} of {len(processes)} died (exit code {process.exitcode}) "
                "without a result"
            )
    if time.monotonic() > deadline:
        missing = [rank for rank in range(len(processes)) if rank not in done]
        raise RankError(f"ranks {missing} gave no result within the timeout")


def _rank_main(
    fn: RankFn,
    rank: int,
    world: int,
    port: int,
    cuda: bool,
    timeout: float,
    args: tuple[Any, ...],
    results: Any,
) -> None:
    """A rank's process: join the group, run ``fn``, send its result or traceback."""
    try:
        comm, device = init_rank(rank, world, port, cuda, timeout)
        payload = pickle.dumps(fn(comm, device, *args))
        results.put((rank, True, payload))
    except BaseException:  # report anything, including SystemExit, with the traceback
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def init_rank(
    rank: int, world: int, port: int, cuda: bool, timeout: float
) -> tuple[TorchComm, torch.device]:
    cores = os.cpu_count() or 1
    torch.set_num_threads(max(1, cores // world))
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group(
        "nccl" if cuda else "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=timeout),
    )
    control = dist.new_group(backend="gloo") if cuda else None
    device = torch.device(f"cuda:{rank}" if cuda else "cpu")
    return TorchComm(control), device
