"""kube-scheduler's extender wire format (k8s.io/kube-scheduler/extender/v1).

The Go types carry no JSON tags, so kube-scheduler sends and expects the Go field names,
capitalised, and decodes case-insensitively. We accept any casing for the envelope's keys and
emit capitalised ones. Objects inside (Pod, Node) are ordinary API objects with their JSON tags.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class WireError(ValueError):
    """A malformed extender request: answered with HTTP 400 and this message."""


def _fold(obj: object, where: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise WireError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    return {str(k).lower(): v for k, v in obj.items()}


def _pod(body: dict[str, Any], verb: str) -> dict[str, Any]:
    pod = body.get("pod")
    if not isinstance(pod, dict):
        raise WireError(f"{verb}: field 'Pod' is required and must be an object")
    meta = pod.get("metadata")
    if not isinstance(meta, dict):
        raise WireError(f"{verb}: field 'Pod.metadata' is required and must be an object")
    for key in ("name", "uid"):
        if not isinstance(meta.get(key), str) or not meta[key]:
            raise WireError(f"{verb}: field 'Pod.metadata.{key}' must be a non-empty string")
    if not isinstance(meta.get("namespace", ""), str):
        raise WireError(f"{verb}: field 'Pod.metadata.namespace' must be a string")
    return pod


def _string_list(value: object, field: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise WireError(f"field '{field}': expected a list of node names")
    return value


@dataclass(frozen=True)
class FilterArgs:
    pod: dict[str, Any]
    node_names: list[str]
    nodes: list[dict[str, Any]] | None  # full Node objects when nodeCacheCapable is false


def parse_filter(raw: object, verb: str = "filter") -> FilterArgs:
    body = _fold(raw, verb)
    pod = _pod(body, verb)
    if body.get("nodenames") is not None:
        return FilterArgs(pod, _string_list(body["nodenames"], "NodeNames"), None)
    if body.get("nodes") is not None:
        node_list = _fold(body["nodes"], "field 'Nodes'")
        items = node_list.get("items") or []
        if not isinstance(items, list):
            raise WireError("field 'Nodes.items': expected a list of Node objects")
        names = []
        for i, node in enumerate(items):
            name = (node.get("metadata") or {}).get("name") if isinstance(node, dict) else None
            if not isinstance(name, str):
                raise WireError(f"field 'Nodes.items[{i}].metadata.name': missing")
            names.append(name)
        return FilterArgs(pod, names, items)
    raise WireError(f"{verb}: one of 'NodeNames' or 'Nodes' is required")


@dataclass(frozen=True)
class PreemptArgs:
    pod: dict[str, Any]
    candidates: dict[str, list[str]]  # node -> victim UIDs kube-scheduler proposed
    meta: bool  # answer in NodeNameToMetaVictims (always; the field kube-scheduler reads)


def parse_preempt(raw: object) -> PreemptArgs:
    body = _fold(raw, "preempt")
    pod = _pod(body, "preempt")
    if body.get("nodenametometavictims") is not None:
        source, key, meta = body["nodenametometavictims"], "NodeNameToMetaVictims", True
    elif body.get("nodenametovictims") is not None:
        source, key, meta = body["nodenametovictims"], "NodeNameToVictims", False
    else:
        raise WireError(
            "preempt: one of 'NodeNameToMetaVictims' or 'NodeNameToVictims' is required"
        )
    if not isinstance(source, dict):
        raise WireError(f"field '{key}': expected an object keyed by node name")
    candidates: dict[str, list[str]] = {}
    for node, victims in source.items():
        folded = _fold(victims, f"field '{key}.{node}'")
        pods = folded.get("pods") or []
        if not isinstance(pods, list):
            raise WireError(f"field '{key}.{node}.Pods': expected a list")
        uids = []
        for i, victim in enumerate(pods):
            entry = _fold(victim, f"field '{key}.{node}.Pods[{i}]'")
            uid = entry.get("uid") if meta else (entry.get("metadata") or {}).get("uid")
            if not isinstance(uid, str):
                raise WireError(f"field '{key}.{node}.Pods[{i}]': missing UID")
            uids.append(uid)
        candidates[str(node)] = uids
    return PreemptArgs(pod, candidates, meta)


@dataclass(frozen=True)
class BindArgs:
    name: str
    namespace: str
    uid: str
    node: str


def parse_bind(raw: object) -> BindArgs:
    body = _fold(raw, "bind")
    values = {}
    for field in ("PodName", "PodNamespace", "PodUID", "Node"):
        value = body.get(field.lower())
        if not isinstance(value, str) or not value:
            raise WireError(f"bind: field '{field}' is required and must be a non-empty string")
        values[field] = value
    return BindArgs(values["PodName"], values["PodNamespace"], values["PodUID"], values["Node"])


def filter_result(
    passed: list[str],
    failed: dict[str, str],
    unresolvable: dict[str, str],
    args: FilterArgs,
    error: str = "",
) -> dict[str, Any]:
    result: dict[str, Any] = {
        "FailedNodes": failed,
        "FailedAndUnresolvableNodes": unresolvable,
        "Error": error,
    }
    if args.nodes is None:
        result["NodeNames"] = passed
        result["Nodes"] = None
    else:
        keep = set(passed)
        result["Nodes"] = {"items": [n for n in args.nodes if n["metadata"]["name"] in keep]}
        result["NodeNames"] = None
    return result


def preempt_result(node: str | None, victims: list[str], pdb_violations: int) -> dict[str, Any]:
    if node is None:
        return {"NodeNameToMetaVictims": {}}
    pods = [{"UID": uid} for uid in victims]
    return {"NodeNameToMetaVictims": {node: {"Pods": pods, "NumPDBViolations": pdb_violations}}}
