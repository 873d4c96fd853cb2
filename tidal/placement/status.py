"""Outcomes as values: codes that mirror kube-scheduler's framework Status, readable reasons."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Code(enum.IntEnum):
    SUCCESS = 0
    UNSCHEDULABLE = 1  # preemption may help (extender: FailedNodes)
    UNRESOLVABLE = 2  # preemption cannot help (extender: FailedAndUnresolvableNodes)


@dataclass(frozen=True, slots=True)
class Rejection:
    code: Code
    reason: str


# Reasons. Constants with readable text, formatted with the request's numbers where useful.
TOO_FEW_GPUS_ON_NODE = "node has {have} GPUs, pod needs {need}"
NO_ALIGNED_DOMAIN = "node has no {need} GPUs whose every pair talks at tier {tier} or better"
INSUFFICIENT_GPUS = "insufficient nvidia.com/gpu: {free} free, {need} needed"
NO_FREE_ALIGNED_SET = "no {need} free GPUs aligned at tier {tier} ({free} free)"
INSUFFICIENT_CPU = "insufficient cpu: {free}m free, {need}m needed"
INSUFFICIENT_MEMORY = "insufficient memory: {free}Mi free, {need}Mi needed"
PROTECTED = "not enough GPUs held by lower-priority preemptible pods"

FITS_WITHOUT_PREEMPTION = "pod fits without preemption"
NO_CANDIDATE = "no node can be freed for this pod: {detail}"
DEADLINE = "planning deadline of {ms:.0f} ms hit after {nodes} nodes"
