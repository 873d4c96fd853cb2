"""Where the control-plane binaries live, and how to build them when they are missing."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

# Pinned releases; the build script reads the same variables, so one place decides.
K8S_VERSION = os.environ.get("K8S_VERSION", "1.34.4")
ETCD_VERSION = os.environ.get("ETCD_VERSION", "3.6.16")
KWOK_VERSION = os.environ.get("KWOK_VERSION", "0.8.0")
KUBECTL_NPM_VERSION = os.environ.get("KUBECTL_NPM_VERSION", "2.2.2")

BUILD_SCRIPT = Path(__file__).with_name("build.sh")
CONTROL_PLANE = ("etcd", "kube-apiserver", "kube-scheduler", "kube-controller-manager", "kwok")
CLIENT_TOOLS = ("kubectl", "helm")


class DevClusterError(RuntimeError):
    """Anything that stops the local control plane from starting, with what to do about it."""


def cache_root() -> Path:
    if "TIDAL_K8S_CACHE" in os.environ:
        return Path(os.environ["TIDAL_K8S_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache"))
    return Path(xdg) / "tidal" / "k8s"


@dataclass(frozen=True)
class Binaries:
    control_plane_dir: Path
    tools_dir: Path

    def path(self, name: str) -> Path:
        folder = self.tools_dir if name in CLIENT_TOOLS else self.control_plane_dir
        return folder / name

    def missing(self) -> list[str]:
        return [n for n in (*CONTROL_PLANE, *CLIENT_TOOLS) if not os.access(self.path(n), os.X_OK)]


def default_binaries() -> Binaries:
    root = cache_root()
    key = f"k8s-{K8S_VERSION}-etcd-{ETCD_VERSION}-kwok-{KWOK_VERSION}"
    return Binaries(root / key / "bin", root / f"kubectl-layer-{KUBECTL_NPM_VERSION}" / "bin")


def find_binaries() -> Binaries:
    """The cached binaries, or an error that says how to build them."""
    binaries = default_binaries()
    missing = binaries.missing()
    if missing:
        raise DevClusterError(
            f"missing control-plane binaries {', '.join(missing)} under {cache_root()}; "
            "build them with `tidal dev-cluster build` (a cold build takes ~15 min on 2 cores)"
        )
    return binaries


def build(*, quiet: bool = False) -> Binaries:
    """Run the build script; its progress lines go to the terminal unless ``quiet``."""
    env = {
        **os.environ,
        "K8S_VERSION": K8S_VERSION,
        "ETCD_VERSION": ETCD_VERSION,
        "KWOK_VERSION": KWOK_VERSION,
        "KUBECTL_NPM_VERSION": KUBECTL_NPM_VERSION,
        "TIDAL_K8S_CACHE": str(cache_root()),
    }
    output = subprocess.DEVNULL if quiet else None
    result = subprocess.run(["bash", str(BUILD_SCRIPT)], env=env, stdout=output, check=False)
    if result.returncode != 0:
        raise DevClusterError(f"{BUILD_SCRIPT} failed with exit status {result.returncode}")
    return find_binaries()
