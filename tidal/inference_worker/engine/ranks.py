"""Tensor-parallel ranks for a long-running worker: rank 0 is this process (it runs the server
or the batch runner and the engine loop); ranks 1 .. N-1 are spawned processes that build their
shard and follow rank 0's steps (:func:`engine.follow`).

A rank that dies must fail the worker loudly, never hang it: a watchdog thread on rank 0 checks
the followers every second and calls ``on_dead`` with the reason (the CLI logs it and exits
non-zero); a collective with a dead peer raises in the engine loop, which reports the same way.
When idle, rank 0 sends a heartbeat step so that an idle follower's wait never reaches the
collective timeout and a dead follower is noticed without traffic.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp

from tidal.inference_worker.engine.build import EngineOptions, build_engine, build_runner
from tidal.inference_worker.engine.engine import LLMEngine, follow
from tidal.inference_worker.metrics import WorkerMetrics
from tidal.inference_worker.parallel.comm import LocalComm
from tidal.inference_worker.parallel.launch import free_port, init_rank

log = logging.getLogger(__name__)

COLLECTIVE_TIMEOUT_S = 600.0


class Followers:
    """Ranks 1 .. N-1 and their watchdog."""

    def __init__(self, processes: list[Any]) -> None:
        self.processes = processes
        self._stop = threading.Event()

    def dead(self) -> str | None:
        for rank, process in enumerate(self.processes, start=1):
            if not process.is_alive() and process.exitcode != 0:
                return f"tensor-parallel rank {rank} died (exit code {process.exitcode})"
        return None

    def watch(self, on_dead: Callable[[str], None], period_s: float = 1.0) -> None:
        def run() -> None:
            while not self._stop.wait(period_s):
                reason = self.dead()
                if reason is not None:
                    on_dead(reason)
                    return

        threading.Thread(target=run, name="tidal-rank-watchdog", daemon=True).start()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        for process in self.processes:
            process.join(timeout_s)
            if process.is_alive():
                process.terminate()


def start(
    options: EngineOptions, metrics: WorkerMetrics | None, cuda: bool
) -> tuple[LLMEngine, Followers]:
    """Load the model on every rank; rank 0's engine and the followers."""
    world = options.tensor_parallel
    if world == 1:
        local = "cuda:0" if cuda else "cpu"
        return build_engine(options, LocalComm(), local, metrics), Followers([])
    context = mp.get_context("spawn")
    port = free_port()
    processes = [
        context.Process(
            target=_follower_main,
            args=(rank, world, port, cuda, options),
            daemon=True,
            name=f"tidal-rank-{rank}",
        )
        for rank in range(1, world)
    ]
    for process in processes:
        process.start()
    comm, device = init_rank(0, world, port, cuda, COLLECTIVE_TIMEOUT_S)
    return build_engine(options, comm, device, metrics), Followers(processes)


def _follower_main(rank: int, world: int, port: int, cuda: bool, options: EngineOptions) -> None:
    logging.basicConfig(level=logging.INFO, format=f"rank {rank}: %(message)s")
    comm, device = init_rank(rank, world, port, cuda, COLLECTIVE_TIMEOUT_S)
    runner, _, _ = build_runner(options, comm, device)
    if options.iso:
        from tidal.inference_worker.iso import measure_costs  # noqa: PLC0415

        measure_costs(runner.model)  # collectives: every rank joins rank 0's measurement
    follow(runner)
