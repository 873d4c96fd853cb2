"""Discovery on a real GPU node: NVML (through nvidia-ml-py) and sysfs.

NVML answers the GPU questions: identity, memory, the PCIe path class of every GPU pair
(``nvmlDeviceGetTopologyCommonAncestor``, the source of ``nvidia-smi topo -m``), NVLink lanes
and whether they end on another GPU or on an NVSwitch, XID events for health, and the fabric
clique of rack-scale NVLink (GB200). sysfs answers the host questions NVML does not: NUMA
nodes and their cores and sockets, and where the NICs sit on the PCIe tree.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import ClassVar, TypeAlias, TypeVar

from tidal.node_agent.facts import DiscoveryError, GpuDevice, GpuSample, NicDevice, NodeFacts
from tidal.topology import PcieLevel, RackDomain

log = logging.getLogger(__name__)
_T = TypeVar("_T")

# A device or event-set handle: an opaque ctypes pointer that is only ever handed back to NVML.
NvmlHandle: TypeAlias = object

# Nodes in one rack-scale NVLink domain (GB200 NVL72: 18 compute trays of 4 GPUs).
RACK_NODES = 18

# XIDs that an application causes and survives (the GPU stays usable), as NVIDIA's own device
# plugin treats them: 13 graphics engine exception, 31 memory page fault, 43 GPU stopped
# processing, 45 preemptive cleanup, 68 video processor exception, 109 context switch timeout.
APPLICATION_XIDS = frozenset({13, 31, 43, 45, 68, 109})
XID_MEANINGS = {
    48: "double-bit ECC error",
    79: "GPU has fallen off the bus",
    94: "contained ECC error",
    95: "uncontained ECC error",
    119: "GSP RPC timeout",
    120: "GSP error",
}


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class NvmlBackend:
    """GPUs as NVML reports them. ``nvml`` is the ``pynvml`` module of nvidia-ml-py (tests pass
    an emulation); ``sysfs`` the root of /sys."""

    def __init__(self, nvml: ModuleType | None = None, sysfs: Path = Path("/sys")) -> None:
        if nvml is None:
            import pynvml  # noqa: PLC0415 (nvidia-ml-py; loads libnvidia-ml.so.1)

            nvml = pynvml
        self.nvml = nvml
        self.sysfs = sysfs
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as error:
            raise DiscoveryError(
                f"NVML could not start ({error}): is the NVIDIA driver loaded and "
                "libnvidia-ml.so.1 on the library path? Use --fake PRESET to run without GPUs."
            ) from error
        self.handles: list[NvmlHandle] = [
            self._call("get device handle", nvml.nvmlDeviceGetHandleByIndex, i)
            for i in range(self._call("count devices", nvml.nvmlDeviceGetCount))
        ]
        self.unhealthy: dict[int, str] = {}
        self.events = self._register_xid_events()

    def _call(self, what: str, function: Callable[..., _T], *args: object) -> _T:
        try:
            return function(*args)
        except self.nvml.NVMLError as error:
            raise DiscoveryError(f"NVML failed to {what}: {error}") from error

    def close(self) -> None:
        try:
            if self.events is not None:
                self.nvml.nvmlEventSetFree(self.events)
            self.nvml.nvmlShutdown()
        except self.nvml.NVMLError as error:
            log.warning("NVML shutdown: %s", error)

    # -- facts ------------------------------------------------------------------------------
    def facts(self) -> NodeFacts:
        gpus = tuple(self._gpu(i, h) for i, h in enumerate(self.handles))
        lanes, switch_lanes = self._nvlinks([g.pci_bus_id for g in gpus])
        nvswitch = any(switch_lanes)
        if nvswitch:  # every GPU on the NVSwitch fabric reaches every other one
            on_fabric = [i for i, n in enumerate(switch_lanes) if n]
            for a in on_fabric:
                for b in on_fabric:
                    if a != b:
                        lanes[a][b] = min(switch_lanes[a], switch_lanes[b])
        numa_cores, numa_socket = self._numa_nodes()
        return NodeFacts(
            gpus=gpus,
            pcie=tuple(tuple(self._pcie(a, b) for b in self.handles) for a in self.handles),
            nvlink=tuple(tuple(row) for row in lanes),
            nvswitch=nvswitch,
            nics=tuple(self._nics(gpus)),
            numa_cores=numa_cores,
            numa_socket=numa_socket,
            source="nvml",
            driver_version=_text(
                self._call("read the driver", self.nvml.nvmlSystemGetDriverVersion)
            ),
            cuda_version=self._cuda_version(),
            rack_domain=self._rack_domain(),
        )

    def _gpu(self, index: int, handle: NvmlHandle) -> GpuDevice:
        nvml = self.nvml
        bus_id = _text(self._call("read PCI info", nvml.nvmlDeviceGetPciInfo, handle).busId)
        return GpuDevice(
            index=index,
            uuid=_text(self._call("read the UUID", nvml.nvmlDeviceGetUUID, handle)),
            name=_text(self._call("read the name", nvml.nvmlDeviceGetName, handle)),
            memory_mib=int(self._call("read memory", nvml.nvmlDeviceGetMemoryInfo, handle).total)
            >> 20,
            pci_bus_id=bus_id,
            numa_node=self._gpu_numa(handle, bus_id),
            minor=int(self._call("read the minor number", nvml.nvmlDeviceGetMinorNumber, handle)),
            behind_switch=len(self._pci_path(bus_id)) >= 4,  # root, root port, switch up+down
        )

    def _gpu_numa(self, handle: NvmlHandle, bus_id: str) -> int:
        try:
            return int(self.nvml.nvmlDeviceGetNumaNodeId(handle))
        except (self.nvml.NVMLError, AttributeError):
            return _read_int(self._pci_dir(bus_id) / "numa_node", -1)

    # NVML_TOPOLOGY_INTERNAL/SINGLE/MULTIPLE/HOSTBRIDGE/NODE/SYSTEM
    _LEVELS: ClassVar[dict[int, PcieLevel]] = {
        0: PcieLevel.PIX, 10: PcieLevel.PIX, 20: PcieLevel.PXB, 30: PcieLevel.PHB,
        40: PcieLevel.NODE, 50: PcieLevel.SYS,
    }  # fmt: skip

    def _pcie(self, a: NvmlHandle, b: NvmlHandle) -> PcieLevel:
        if a is b:
            return PcieLevel.PIX
        level = self._call(
            "read the PCIe path", self.nvml.nvmlDeviceGetTopologyCommonAncestor, a, b
        )
        return self._LEVELS.get(int(level), PcieLevel.SYS)

    def _nvlinks(self, bus_ids: list[str]) -> tuple[list[list[int]], list[int]]:
        """Lanes between GPU pairs, and lanes from each GPU into NVSwitches."""
        n = len(bus_ids)
        index_of = {_normal_bus_id(b): i for i, b in enumerate(bus_ids)}
        lanes = [[0] * n for _ in range(n)]
        switch_lanes = [0] * n
        for i, handle in enumerate(self.handles):
            for link in range(self.nvml.NVML_NVLINK_MAX_LINKS):
                try:
                    if not self.nvml.nvmlDeviceGetNvLinkState(handle, link):
                        continue
                    remote = self.nvml.nvmlDeviceGetNvLinkRemotePciInfo(handle, link)
                except self.nvml.NVMLError:
                    break  # no such link on this GPU (or NVLink unsupported)
                peer = index_of.get(_normal_bus_id(_text(remote.busId)))
                if peer is None:
                    switch_lanes[i] += 1
                elif peer != i:
                    lanes[i][peer] += 1
        return lanes, switch_lanes

    def _cuda_version(self) -> str:
        try:
            version = int(self.nvml.nvmlSystemGetCudaDriverVersion())
        except self.nvml.NVMLError:
            return ""
        return f"{version // 1000}.{version % 1000 // 10}"

    def _rack_domain(self) -> RackDomain | None:
        """The NVLink fabric clique (GB200 NVL72 and the like), when the fabric manager has one."""
        nvml = self.nvml
        if not self.handles or not hasattr(nvml, "c_nvmlGpuFabricInfo_t"):
            return None
        info = nvml.c_nvmlGpuFabricInfo_t()
        try:
            nvml.nvmlDeviceGetGpuFabricInfo(self.handles[0], info)
        except nvml.NVMLError:
            return None
        if info.state != nvml.NVML_GPU_FABRIC_STATE_COMPLETED or not any(info.clusterUuid):
            return None
        cluster = bytes(info.clusterUuid).hex()
        return RackDomain(name=f"nvl-{cluster[:12]}-{info.cliqueId}", nodes=RACK_NODES)

    # -- host facts from sysfs --------------------------------------------------------------
    def _pci_dir(self, bus_id: str) -> Path:
        return self.sysfs / "bus" / "pci" / "devices" / _normal_bus_id(bus_id)

    def _pci_path(self, bus_id: str) -> list[str]:
        """The device's PCI ancestry: root complex, bridges, the device itself."""
        return _pci_chain(self._pci_dir(bus_id))

    def _numa_nodes(self) -> tuple[dict[int, int], dict[int, int]]:
        cores: dict[int, int] = {}
        sockets: dict[int, int] = {}
        for node_dir in sorted((self.sysfs / "devices" / "system" / "node").glob("node[0-9]*")):
            numa = int(node_dir.name.removeprefix("node"))
            cpus = _cpu_list(_read(node_dir / "cpulist"))
            if not cpus:
                continue  # memory-only node (e.g. HBM or CXL)
            cores[numa] = len(cpus)
            package = self.sysfs / f"devices/system/cpu/cpu{cpus[0]}/topology/physical_package_id"
            sockets[numa] = _read_int(package, numa)
        if not cores:
            cores, sockets = {0: os.cpu_count() or 1}, {0: 0}
        return cores, sockets

    def _nics(self, gpus: tuple[GpuDevice, ...]) -> list[NicDevice]:
        """RDMA NICs (/sys/class/infiniband), by their PCIe path class to each GPU."""
        gpu_paths = [self._pci_path(g.pci_bus_id) for g in gpus]
        nics = []
        for nic_dir in sorted((self.sysfs / "class" / "infiniband").glob("*")):
            device = nic_dir / "device"
            if not device.exists():
                continue
            path = _pci_chain(device)
            numa = _read_int(device / "numa_node", -1)
            levels = tuple(
                _path_level(path, gpu_path, numa, g.numa_node)
                for gpu_path, g in zip(gpu_paths, gpus, strict=True)
            )
            nics.append(NicDevice(nic_dir.name, numa, levels))
        return nics

    # -- health and metrics -----------------------------------------------------------------
    def _register_xid_events(self) -> NvmlHandle | None:
        nvml = self.nvml
        try:
            events: NvmlHandle = nvml.nvmlEventSetCreate()
            for handle in self.handles:
                nvml.nvmlDeviceRegisterEvents(handle, nvml.nvmlEventTypeXidCriticalError, events)
        except nvml.NVMLError as error:
            log.warning("XID events unavailable (%s): health comes from device queries only", error)
            return None
        return events

    def _drain_xid_events(self) -> None:
        nvml = self.nvml
        while self.events is not None:
            try:
                event = nvml.nvmlEventSetWait_v2(self.events, 0)
            except nvml.NVMLError_Timeout:
                return
            except nvml.NVMLError as error:
                log.warning("reading XID events: %s", error)
                return
            xid = int(event.eventData)
            if xid in APPLICATION_XIDS:
                continue
            index = next((i for i, h in enumerate(self.handles) if h == event.device), None)
            meaning = XID_MEANINGS.get(xid, "critical error")
            log.error("GPU %s reported XID %d (%s): marking it unhealthy", index, xid, meaning)
            targets = range(len(self.handles)) if index is None else [index]
            for i in targets:
                self.unhealthy[i] = f"XID {xid} ({meaning})"

    def sample(self) -> list[GpuSample]:
        self._drain_xid_events()
        return [self._sample(i, h) for i, h in enumerate(self.handles)]

    def _sample(self, index: int, handle: NvmlHandle) -> GpuSample:
        nvml = self.nvml
        try:
            utilization = nvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100
            memory = nvml.nvmlDeviceGetMemoryInfo(handle).used >> 20
            temperature = float(nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU))
            power = nvml.nvmlDeviceGetPowerUsage(handle) / 1000
        except nvml.NVMLError as error:  # a GPU that stops answering is not usable
            return GpuSample(index, False, f"NVML query failed: {error}")
        reason = self.unhealthy.get(index, "")
        return GpuSample(index, not reason, reason, utilization, memory, temperature, power)


# -- sysfs helpers ------------------------------------------------------------------------


def _normal_bus_id(bus_id: str) -> str:
    """NVML writes 00000000:18:00.0; sysfs 0000:18:00.0."""
    domain, _, rest = bus_id.lower().partition(":")
    return f"{int(domain, 16):04x}:{rest}" if rest else bus_id.lower()


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def _read_int(path: Path, default: int) -> int:
    try:
        return int(_read(path))
    except ValueError:
        return default


def _cpu_list(text: str) -> list[int]:
    """'0-3,8,10-11' -> [0, 1, 2, 3, 8, 10, 11]."""
    cpus: list[int] = []
    for part in filter(None, text.split(",")):
        low, _, high = part.partition("-")
        cpus.extend(range(int(low), int(high or low) + 1))
    return cpus


def _pci_chain(device: Path) -> list[str]:
    """Components of the resolved sysfs path from the root complex (pci0000:00) down."""
    parts = device.resolve().parts
    start = next((i for i, p in enumerate(parts) if p.startswith("pci")), None)
    return list(parts[start:]) if start is not None else []


def _path_level(a: list[str], b: list[str], numa_a: int, numa_b: int) -> PcieLevel:
    """The ``nvidia-smi topo -m`` class between two PCI devices from their sysfs ancestry:
    PIX when one switch joins them (both hang off ports of the same upstream port), PXB when
    several bridges do, PHB when only the root complex does, NODE/SYS across root complexes."""
    if not a or not b or a[0] != b[0]:
        return PcieLevel.NODE if numa_a == numa_b and numa_a >= 0 else PcieLevel.SYS
    common = 0
    while common < min(len(a), len(b)) and a[common] == b[common]:
        common += 1
    if common <= 2:  # only the root complex, or the root complex and one root port each
        return PcieLevel.PHB if common == 1 else PcieLevel.PXB
    if len(a) - common == 2 and len(b) - common == 2:
        return PcieLevel.PIX
    return PcieLevel.PXB
