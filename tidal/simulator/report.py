"""What a scenario loaded, as plain data: nodes per preset, jobs per class and size, rows
dropped by reason, and what the replay makes of them. ``tidal simulate`` prints it before the
replay (``--dry-run``: instead of it) and writes it into results.json."""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from tidal.api import LABEL_GPU_MODEL
from tidal.placement import NodeInfo
from tidal.simulator.traces import SourceReport, TraceJob, TraceNode


@dataclass(frozen=True)
class NodeGroup:
    gpu_model: str
    gpus: int
    preset: str
    chosen_by: str  # which table chose the preset
    nodes: int


@dataclass(frozen=True)
class JobGroup:
    job_class: str
    gpus: int  # per worker
    jobs: int  # rows read
    gangs: int  # of them, with more than one worker
    max_workers: int
    replayed: int  # of them, in the replay's pool (sampled from, or replayed at their times)
    constrained: int  # of them, limited to some GPU models


@dataclass(frozen=True)
class LoadReport:
    sources: tuple[SourceReport, ...]
    node_groups: tuple[NodeGroup, ...]
    job_groups: tuple[JobGroup, ...]
    replay: tuple[str, ...]  # sentences: what the replay does with what was loaded

    def as_dict(self) -> dict[str, Any]:
        return {
            "sources": [
                {
                    "kind": s.kind,
                    "location": s.location,
                    "format": s.format,
                    "rows": s.rows,
                    "kept": s.kept,
                    "dropped": dict(s.drops.most_common()),
                    "notes": list(s.notes),
                }
                for s in self.sources
            ],
            "nodes": [dataclasses.asdict(g) for g in self.node_groups],
            "jobs": [dataclasses.asdict(g) for g in self.job_groups],
            "replay": list(self.replay),
        }


def node_groups(
    nodes: Sequence[NodeInfo], trace: dict[str, TraceNode] | None
) -> tuple[NodeGroup, ...]:
    """Nodes per (GPU model, GPU count, preset, chosen by), largest groups first."""
    counts: Counter[tuple[str, int, str, str]] = Counter()
    for node in nodes:
        source = trace.get(node.name) if trace else None
        if source is not None:
            key = (source.gpu_model, source.gpus, source.preset, source.preset_from)
        else:
            model = node.labels.get(LABEL_GPU_MODEL, node.shape.gpu_model)
            key = (model, node.shape.gpu_count, node.shape.name, "synthetic_nodes")
        counts[key] += 1
    return tuple(NodeGroup(*key, nodes=n) for key, n in counts.most_common())


def job_groups(read: Iterable[TraceJob], replayed: Iterable[TraceJob]) -> tuple[JobGroup, ...]:
    """Jobs per (class, GPUs per worker), with their gangs and how many the replay uses."""
    used = {id(job) for job in replayed}
    groups: dict[tuple[str, int], list[int]] = {}
    for job in read:
        tally = groups.setdefault((job.job_class, job.gpus), [0, 0, 0, 0, 0])
        tally[0] += 1
        tally[1] += job.workers > 1
        tally[2] = max(tally[2], job.workers)
        tally[3] += id(job) in used
        tally[4] += bool(job.gpu_models)
    return tuple(JobGroup(cls, gpus, *tally) for (cls, gpus), tally in sorted(groups.items()))
