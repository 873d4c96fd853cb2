"""`tidal dev-cluster up | status | down`, run as a user would, in a process of its own."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tidal.devcluster import LocalCluster


def tidal(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tidal", *args],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def test_up_status_down(cluster: LocalCluster, tmp_path: Path) -> None:
    # `cluster` only guarantees the binaries exist; this test starts a second control plane.
    workdir = tmp_path / "dev"
    up = tidal("dev-cluster", "up", "--dir", str(workdir), "--nodes", "2", "--preset", "hgx-a100")
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        assert "dev cluster up: 2 GPU nodes" in up.stdout
        again = tidal("dev-cluster", "up", "--dir", str(workdir))
        assert again.returncode == 1
        assert "already up" in again.stdout

        status = tidal("dev-cluster", "status", "--dir", str(workdir))
        assert status.returncode == 0, status.stdout + status.stderr
        assert "nodes: 2/2 Ready" in status.stdout
        assert "kube-scheduler" in status.stdout
        pids = LocalCluster.attach(workdir).running()
        assert set(pids) >= {"etcd", "kube-apiserver", "kube-scheduler", "kwok"}
        assert all(pids.values())
    finally:
        down = tidal("dev-cluster", "down", "--dir", str(workdir))
    assert down.returncode == 0, down.stdout + down.stderr
    assert not workdir.exists()


def test_up_rejects_an_unknown_preset(tmp_path: Path) -> None:
    result = tidal("dev-cluster", "up", "--dir", str(tmp_path), "--preset", "dgx-h900")
    assert result.returncode == 1
    assert "--preset: unknown dgx-h900" in result.stdout
