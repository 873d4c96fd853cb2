"""An emulation of the ``pynvml`` module (nvidia-ml-py) and of /sys for a machine built like a
topology preset, so the NVML backend's code paths run without a GPU. It answers the way the
real library does (bytes for some strings, NVMLError subclasses, NVSwitch links ending on a
bus id that is no GPU's)."""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from tidal.node_agent.facts import NodeFacts
from tidal.topology import NodeTopology, PcieLevel

NVSWITCH_BUS = "00000000:C0:00.0"
_NVML_LEVEL = {PcieLevel.PIX: 10, PcieLevel.PXB: 20, PcieLevel.PHB: 30, PcieLevel.NODE: 40,
               PcieLevel.SYS: 50}  # fmt: skip


class NVMLError(Exception):
    pass


class NVMLError_Timeout(NVMLError):  # noqa: N801, N818 (pynvml's names)
    pass


class NVMLError_NotSupported(NVMLError):  # noqa: N801, N818
    pass


class EmulatedNvml:
    NVML_NVLINK_MAX_LINKS = 18
    NVML_TEMPERATURE_GPU = 0
    nvmlEventTypeXidCriticalError = 8  # noqa: N815
    NVMLError = NVMLError
    NVMLError_Timeout = NVMLError_Timeout

    def __init__(self, facts: NodeFacts, *, driver_loaded: bool = True) -> None:
        self.facts = facts
        self.driver_loaded = driver_loaded
        self.events: list[SimpleNamespace] = []
        self.links = [self._links(i) for i in range(len(facts.gpus))]

    def _links(self, i: int) -> list[str]:
        """Remote bus id per NVLink of GPU i: the peer GPU's, or the NVSwitch's."""
        gpus = self.facts.gpus
        if self.facts.nvswitch:
            lanes = max(self.facts.nvlink[i])
            return [NVSWITCH_BUS] * lanes
        return [gpus[j].pci_bus_id for j, n in enumerate(self.facts.nvlink[i]) for _ in range(n)]

    def xid(self, index: int, code: int) -> None:
        self.events.append(SimpleNamespace(device=index, eventData=code))

    # -- the pynvml functions the backend calls ---------------------------------------------
    def nvmlInit(self) -> None:
        if not self.driver_loaded:
            raise NVMLError("Driver Not Loaded")

    def nvmlShutdown(self) -> None:
        return None

    def nvmlDeviceGetCount(self) -> int:
        return len(self.facts.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetPciInfo(self, h: int) -> Any:
        return SimpleNamespace(busId=self.facts.gpus[h].pci_bus_id.encode())

    def nvmlDeviceGetUUID(self, h: int) -> str:
        return self.facts.gpus[h].uuid

    def nvmlDeviceGetName(self, h: int) -> bytes:
        return self.facts.gpus[h].name.encode()

    def nvmlDeviceGetMemoryInfo(self, h: int) -> Any:
        return SimpleNamespace(total=self.facts.gpus[h].memory_mib << 20, used=(h + 1) << 30)

    def nvmlDeviceGetMinorNumber(self, h: int) -> int:
        return self.facts.gpus[h].minor

    def nvmlDeviceGetNumaNodeId(self, h: int) -> int:
        raise NVMLError_NotSupported("Not Supported")  # older drivers: the backend reads sysfs

    def nvmlDeviceGetTopologyCommonAncestor(self, a: int, b: int) -> int:
        return _NVML_LEVEL[self.facts.pcie[a][b]]

    def nvmlDeviceGetNvLinkState(self, h: int, link: int) -> int:
        if link >= len(self.links[h]):
            raise NVMLError_NotSupported("Not Supported")
        return 1

    def nvmlDeviceGetNvLinkRemotePciInfo(self, h: int, link: int) -> Any:
        return SimpleNamespace(busId=self.links[h][link])

    def nvmlSystemGetDriverVersion(self) -> str:
        return "560.35.03"

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        return 12060

    def nvmlEventSetCreate(self) -> object:
        return object()

    def nvmlDeviceRegisterEvents(self, h: int, kinds: int, events: object) -> None:
        return None

    def nvmlEventSetWait_v2(self, events: object, timeout_ms: int) -> Any:
        if not self.events:
            raise NVMLError_Timeout("Timeout")
        return self.events.pop(0)

    def nvmlEventSetFree(self, events: object) -> None:
        return None

    def nvmlDeviceGetUtilizationRates(self, h: int) -> Any:
        return SimpleNamespace(gpu=25 * (h % 4))

    def nvmlDeviceGetTemperature(self, h: int, sensor: int) -> int:
        return 40 + h

    def nvmlDeviceGetPowerUsage(self, h: int) -> int:
        return 300_000  # milliwatts


def _pci_components(topology: NodeTopology, vertex: tuple[str, Any], leaf: str) -> list[str]:
    """sysfs path components from the root complex to ``vertex``: a root port below the host
    bridge, then an upstream port and one downstream port per child for every switch."""
    chain = list(reversed(topology.ancestors(vertex)))
    bridge_at = next(i for i, v in enumerate(chain) if v[0] == "host_bridge")
    path = [f"pci0000:{int(chain[bridge_at][1]):02x}"]
    below = chain[bridge_at + 1 :]
    path.append(f"rp-{below[0][0]}{below[0][1]}")
    for parent, child in itertools.pairwise(below):
        path += [f"sw{parent[1]}-up", f"sw{parent[1]}-dn-{child[0]}{child[1]}"]
    return [*path, leaf]


def write_sysfs(root: Path, topology: NodeTopology, facts: NodeFacts) -> None:
    """A /sys with NUMA nodes, CPU packages, the GPUs and NICs on their PCIe paths."""
    cpu = 0
    for numa, cores in sorted(topology.cpu_cores().items()):
        node_dir = root / f"devices/system/node/node{numa}"
        node_dir.mkdir(parents=True)
        (node_dir / "cpulist").write_text(f"{cpu}-{cpu + cores - 1}\n")
        socket = facts.numa_socket[numa]
        package = root / f"devices/system/cpu/cpu{cpu}/topology"
        package.mkdir(parents=True)
        (package / "physical_package_id").write_text(f"{socket}\n")
        cpu += cores
    (root / "devices/system/node/node99").mkdir()  # a memory-only node (no CPUs)
    (root / "devices/system/node/node99/cpulist").write_text("\n")
    for gpu in facts.gpus:
        bus = gpu.pci_bus_id.lower()[4:]  # sysfs spells the domain with 4 digits
        device = root / "devices" / Path(*_pci_components(topology, ("gpu", gpu.index), bus))
        device.mkdir(parents=True)
        (device / "numa_node").write_text(f"{gpu.numa_node}\n")
        link = root / "bus/pci/devices" / bus
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(device, link)
    for i, nic in enumerate(facts.nics):
        device = (
            root
            / "devices"
            / Path(*_pci_components(topology, ("nic", nic.name), f"0000:{0x80 + i:02x}:00.0"))
        )
        device.mkdir(parents=True)
        (device / "numa_node").write_text(f"{nic.numa_node}\n")
        (root / "class/infiniband" / nic.name).mkdir(parents=True)
        os.symlink(device, root / "class/infiniband" / nic.name / "device")
