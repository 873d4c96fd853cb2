"""The pure parts of the local control plane: manifests, configuration, certificates."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.x509.oid import NameOID
from typer.testing import CliRunner

from tidal.api import LABEL_TOPOLOGY_PRESET
from tidal.cli import app
from tidal.devcluster.certs import make_pki
from tidal.devcluster.cluster import ClusterOptions, scheduler_config
from tidal.devcluster.nodes import KWOK_ANNOTATION, gpu_node, node_names
from tidal.scheduler_extender.schedconfig import ExtenderConfig


def test_gpu_node_has_preset_capacity_and_kwok_annotation() -> None:
    node = gpu_node("n1", "gb200-nvl72")
    assert node["metadata"]["annotations"][KWOK_ANNOTATION] == "fake"
    assert node["metadata"]["labels"][LABEL_TOPOLOGY_PRESET] == "gb200-nvl72"
    assert node["status"]["capacity"]["nvidia.com/gpu"] == "4"
    assert node["status"]["allocatable"] == node["status"]["capacity"]
    # DGX H100: two sockets of 56 cores each.
    assert gpu_node("n2", "dgx-h100")["status"]["capacity"]["cpu"] == "112"


def test_node_names_cycle_presets_and_reject_none() -> None:
    assert node_names(3, ["a", "b"]) == [
        ("gpu-node-00000", "a"),
        ("gpu-node-00001", "b"),
        ("gpu-node-00002", "a"),
    ]
    with pytest.raises(ValueError, match="presets"):
        node_names(1, [])


def test_scheduler_config_has_tidal_profile_and_extender_only_when_asked(tmp_path: Path) -> None:
    plain = scheduler_config(tmp_path / "kc", ClusterOptions())
    assert [p["schedulerName"] for p in plain["profiles"]] == [
        "default-scheduler",
        "tidal-scheduler",
    ]
    assert "extenders" not in plain
    assert plain["clientConnection"]["qps"] > 50
    with_extender = scheduler_config(
        tmp_path / "kc", ClusterOptions(extender=ExtenderConfig("http://127.0.0.1:8888"))
    )
    (extender,) = with_extender["extenders"]
    assert extender["urlPrefix"] == "http://127.0.0.1:8888"
    assert extender["bindVerb"] == "bind"
    assert extender["nodeCacheCapable"] is True
    assert extender["managedResources"] == [{"name": "nvidia.com/gpu", "ignoredByScheduler": False}]


def test_pki_chains_to_its_ca_with_admin_in_system_masters(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    ca = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    admin = x509.load_pem_x509_certificate(pki.admin_cert.read_bytes())
    serving = x509.load_pem_x509_certificate(pki.serving_cert.read_bytes())
    admin.verify_directly_issued_by(ca)
    serving.verify_directly_issued_by(ca)
    orgs = admin.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    assert [o.value for o in orgs] == ["system:masters"]
    sans = serving.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in sans.get_values_for_type(x509.DNSName)
    assert pki.admin_key.stat().st_mode & 0o077 == 0


def test_scheduler_config_command_prints_tls_and_rejects_bad_urls() -> None:
    runner = CliRunner()
    result = runner.invoke(
        app,
        ["scheduler-config", "--extender-url", "https://tidal-extender.tidal:8888",
         "--ca-file", "/etc/tidal/ca.crt", "--client-cert", "/etc/tidal/client.crt",
         "--client-key", "/etc/tidal/client.key", "--leader-elect"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    config = yaml.safe_load(result.output)
    extender = config["extenders"][0]
    assert extender["enableHTTPS"] is True
    assert extender["tlsConfig"] == {
        "caFile": "/etc/tidal/ca.crt",
        "certFile": "/etc/tidal/client.crt",
        "keyFile": "/etc/tidal/client.key",
    }
    assert extender["managedResources"] == [{"name": "nvidia.com/gpu", "ignoredByScheduler": False}]
    assert config["percentageOfNodesToScore"] == 100
    assert "kubeconfig" not in config["clientConnection"]  # in-cluster
    assert config["leaderElection"]["resourceName"] == "tidal-scheduler"
    bad = runner.invoke(app, ["scheduler-config", "--extender-url", "tidal:8888"])
    assert bad.exit_code == 2 and "must start with http:// or https://" in bad.output
    mixed = runner.invoke(
        app, ["scheduler-config", "--extender-url", "http://x:1", "--ca-file", "/ca.crt"]
    )
    assert mixed.exit_code == 2 and "only apply to an https://" in mixed.output
    half = runner.invoke(
        app,
        ["scheduler-config", "--extender-url", "https://x:1", "--client-cert", "/c.crt"],
    )
    assert half.exit_code == 2 and "go together" in half.output


def test_extender_rbac_command_grants_exactly_the_extenders_calls() -> None:
    result = CliRunner().invoke(app, ["extender-rbac", "--namespace", "sched"])
    assert result.exit_code == 0, result.output
    account, role, binding = yaml.safe_load_all(result.output)
    assert (account["metadata"]["name"], account["metadata"]["namespace"]) == (
        "tidal-extender", "sched",
    )  # fmt: skip
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "tidal-extender", "namespace": "sched"}
    ]
    grants = {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    # the e2e tests run the extender with this role only (the dev cluster gives it a token)
    assert grants == {
        ("", "nodes", "list"), ("", "nodes", "watch"),
        ("", "pods", "list"), ("", "pods", "watch"), ("", "pods", "get"), ("", "pods", "patch"),
        ("", "bindings", "create"), ("", "pods/status", "patch"),
        ("", "pods/eviction", "create"), ("", "events", "create"),
        ("policy", "poddisruptionbudgets", "list"), ("policy", "poddisruptionbudgets", "watch"),
        ("tidal.dev", "gputopologies", "list"), ("tidal.dev", "gputopologies", "watch"),
    }  # fmt: skip
