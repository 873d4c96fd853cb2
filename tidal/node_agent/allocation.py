"""Which GPUs a container gets, and what it is told about them. Pure: the device plugin and the
standalone launcher both call these.

kube-scheduler does not choose GPU identities; the extender writes its choice on the pod
(``tidal.dev/gpus``) at bind. When the kubelet admits the pod it asks the device plugin for a
preferred allocation (we answer with that choice) and then calls Allocate with the devices it
picked. Allocate hands out exactly the annotated GPUs or fails loudly: handing out others would
silently break the topology the pod was placed for, and double-book GPUs another pod was
promised.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from tidal import api
from tidal.node_agent.facts import NodeFacts
from tidal.placement import TopologyMode, choose_gpus
from tidal.topology import NodeShape, NodeTopology, PcieLevel, Tier, bits, mask_of


class AllocationError(RuntimeError):
    """The kubelet's devices do not match what tidal promised the pod; the message names both."""


@dataclass(frozen=True)
class PendingAssignment:
    """A pod bound to this node, not yet started, with the GPUs the scheduler chose for it."""

    namespace: str
    name: str
    uid: str
    gpus: tuple[int, ...]
    created: str = ""  # creationTimestamp: the kubelet admits pods roughly in this order

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


def parse_gpu_annotation(text: str) -> tuple[int, ...]:
    """'0,1,3' -> (0, 1, 3); ValueError on anything else (an empty set included)."""
    try:
        gpus = api.parse_gpu_list(text)
    except ValueError as error:
        raise ValueError(f"{api.ANNOTATION_GPUS}: {error}") from error
    if not gpus:
        raise ValueError(f"{api.ANNOTATION_GPUS}={text!r} names no GPU")
    return gpus


def _waiting(
    assignments: Iterable[PendingAssignment], size: int, done: set[str]
) -> list[PendingAssignment]:
    """Pods waiting for a ``size``-GPU allocation, oldest first."""
    return sorted(
        (a for a in assignments if len(a.gpus) == size and a.uid not in done),
        key=lambda a: (a.created, a.key),
    )


def preferred_allocation(
    shape: NodeShape,
    available: set[int],
    must_include: set[int],
    size: int,
    assignments: Sequence[PendingAssignment],
    done: set[str],
) -> list[int]:
    """The GPUs to ask the kubelet for: the oldest waiting pod's annotated set when it is free,
    else the best aligned set the topology core picks (pods scheduled without tidal)."""
    for assignment in _waiting(assignments, size, done):
        chosen = set(assignment.gpus)
        if chosen <= available and must_include <= chosen:
            return sorted(chosen)
    free = mask_of(available) & ~mask_of(must_include)
    rest = size - len(must_include)
    if rest <= 0:
        return sorted(must_include)[:size]
    picked = choose_gpus(shape, free, rest, TopologyMode.BEST_EFFORT, Tier.NVLINK) or 0
    return sorted(must_include | set(bits(picked)))


def match_allocation(
    requested: Sequence[int], assignments: Sequence[PendingAssignment], done: set[str]
) -> PendingAssignment | None:
    """The waiting pod the kubelet's ``requested`` GPUs were promised to. None when no pod
    placed by tidal waits for this many GPUs here (a pod scheduled without tidal gets what the
    kubelet picked). Raises :class:`AllocationError` on a mismatch."""
    waiting = _waiting(assignments, len(requested), done)
    exact = [a for a in waiting if set(a.gpus) == set(requested)]
    if exact:
        return exact[0]
    if not waiting:
        return None
    promised = "; ".join(f"{a.key} was assigned GPUs {_list(a.gpus)}" for a in waiting)
    raise AllocationError(
        f"the kubelet offered GPUs {_list(requested)} for a {len(requested)}-GPU container, but "
        f"{promised} by {api.SCHEDULER_NAME} ({api.ANNOTATION_GPUS}); refusing to hand out other "
        "GPUs. "
        "Are the promised GPUs still held by a terminating pod?"
    )


def _list(gpus: Iterable[int]) -> str:
    return "[" + ",".join(str(g) for g in sorted(gpus)) + "]"


# -- what the container is told ---------------------------------------------------------------

_NCCL_P2P = {PcieLevel.PIX: "PIX", PcieLevel.PXB: "PXB", PcieLevel.PHB: "PHB",
             PcieLevel.NODE: "PHB", PcieLevel.SYS: "SYS"}  # fmt: skip


def container_env(
    facts: NodeFacts, topology: NodeTopology, shape: NodeShape, gpus: Sequence[int]
) -> dict[str, str]:
    """Environment for a container (or a standalone worker) that owns ``gpus``."""
    ordered = sorted(gpus)
    uuids = ",".join(facts.gpus[g].uuid for g in ordered)
    env = {
        "CUDA_VISIBLE_DEVICES": uuids,
        "NVIDIA_VISIBLE_DEVICES": uuids,  # the NVIDIA container runtime mounts these
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
        "TIDAL_GPU_IDS": ",".join(str(g) for g in ordered),
        "TIDAL_GPU_UUIDS": uuids,
        "TIDAL_GPU_TIER": shape.tier_of(mask_of(ordered)).label if ordered else "node",
        "TIDAL_GPU_LINK": _weakest_link(topology, ordered),
    }
    env.update(nccl_env(topology, ordered))
    return env


def nccl_env(topology: NodeTopology, gpus: Sequence[int]) -> dict[str, str]:
    """NCCL settings that fit the set: peer-to-peer over the path the set actually has, and the
    RDMA NICs nearest to it (NCCL would otherwise consider every NIC of the node)."""
    env: dict[str, str] = {}
    pairs = [(a, b) for i, a in enumerate(gpus) for b in gpus[i + 1 :]]
    if pairs:
        if all(topology.nvlink_lanes(a, b) for a, b in pairs):
            env["NCCL_P2P_LEVEL"] = "NVL"
        else:
            worst = max(topology.pcie_level(a, b) for a, b in pairs)
            env["NCCL_P2P_LEVEL"] = _NCCL_P2P[worst]
    chosen = set(gpus)
    near = sorted(name for name, members in topology.nics().items() if members & chosen)
    if near:
        env["NCCL_IB_HCA"] = "=" + ",".join(near)  # '=' : exactly these names, not prefixes
    return env


def _weakest_link(topology: NodeTopology, gpus: Sequence[int]) -> str:
    links = [topology.link(a, b) for i, a in enumerate(gpus) for b in gpus[i + 1 :]]
    return min(links, key=lambda link: link.weight).name if links else "X"


CONTROL_DEVICES = ("/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools")


def device_paths(facts: NodeFacts, gpus: Sequence[int]) -> list[str]:
    """Device nodes the container needs: one per GPU, plus the driver's control devices."""
    return [f"/dev/nvidia{facts.gpus[g].minor}" for g in sorted(gpus)] + list(CONTROL_DEVICES)
