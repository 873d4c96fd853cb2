"""What the operator needs installed beside its CRDs (pure): the PriorityClasses its pods
name, kopf's peering CRD, its least-privilege ClusterRole, ServiceAccount and binding, and the
workers' identity. ``manifests`` is everything ``tidal operator install-crds`` applies (the
cluster-scoped objects), the CRDs first.

The workers' identity. Every worker pod runs as ServiceAccount ``tidal-worker`` of its own
namespace, whose only right is to patch pods there (ClusterRole ``tidal-worker``, defined once
and bound namespace by namespace). The operator creates the ServiceAccount and the RoleBinding
in each namespace where it creates worker pods (``worker_identity``), just before the pods: it
may create ServiceAccounts and RoleBindings, and bind that one ClusterRole (the ``bind`` verb on
it by name), never patch pods itself. RBAC cannot say "only your own pod, only one annotation",
so a ValidatingAdmissionPolicy does: an update by any ``tidal-worker`` ServiceAccount passes only
when its token is bound to the very pod it updates (the kubelet's projected token is) and the
only change is the ``tidal.dev/checkpoint`` annotation.
"""

from __future__ import annotations

from typing import Any

from tidal import api
from tidal.operator.crds import custom_resource_definitions
from tidal.rbac import (
    RBAC_GROUP,
    app_labels,
    cluster_role,
    cluster_role_binding,
    role_binding,
    service_account,
)

OPERATOR = "tidal-operator"  # its ServiceAccount, ClusterRole and binding
WORKER = api.WORKER_SERVICE_ACCOUNT  # the workers' ServiceAccount, ClusterRole and RoleBinding
WORKER_POLICY = "tidal-worker-own-pod"  # the ValidatingAdmissionPolicy and its binding
ADMISSION_API_VERSION = "admissionregistration.k8s.io/v1"
# What the API server puts in a pod-bound ServiceAccount token's user info (request extra).
POD_NAME_EXTRA = "authentication.kubernetes.io/pod-name"
POD_UID_EXTRA = "authentication.kubernetes.io/pod-uid"


def priority_classes() -> list[dict[str, Any]]:
    """Online services preempt; batch work never does (it waits for the tide to go out)."""
    return [
        {
            "apiVersion": "scheduling.k8s.io/v1",
            "kind": "PriorityClass",
            "metadata": {"name": api.PRIORITY_CLASS_ONLINE},
            "value": 1_000_000,
            "preemptionPolicy": "PreemptLowerPriority",
            "description": "tidal online LLM services: may preempt batch work.",
        },
        {
            "apiVersion": "scheduling.k8s.io/v1",
            "kind": "PriorityClass",
            "metadata": {"name": api.PRIORITY_CLASS_BATCH},
            "value": 1_000,
            "preemptionPolicy": "Never",
            "description": "tidal offline LLM batch jobs: preemptible, never preempt.",
        },
    ]


def operator_cluster_role() -> dict[str, Any]:
    """Least privilege for ``tidal operator run``."""
    tidal_resources = [api.PLURAL_LLMSERVICES, api.PLURAL_LLMBATCHJOBS]
    return cluster_role(
        OPERATOR,
        app_labels(OPERATOR, "operator"),
        [
            {
                "apiGroups": [api.GROUP],
                "resources": tidal_resources,
                "verbs": ["get", "list", "watch", "patch", "update"],
            },
            {
                "apiGroups": [api.GROUP],
                "resources": [f"{r}/status" for r in tidal_resources],
                "verbs": ["get", "patch", "update"],
            },
            {
                "apiGroups": [api.GROUP],
                "resources": [api.PLURAL_GPUTOPOLOGIES],
                "verbs": ["get", "list", "watch"],
            },
            {
                "apiGroups": [""],
                "resources": ["pods"],
                "verbs": ["get", "list", "watch", "create", "delete"],
            },
            {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list", "watch"]},
            {
                "apiGroups": ["", "events.k8s.io"],
                "resources": ["events"],
                "verbs": ["create", "patch"],
            },
            # kopf peering (leader election between operator replicas) and CRD discovery.
            {
                "apiGroups": ["kopf.dev"],
                "resources": ["clusterkopfpeerings", "kopfpeerings"],
                "verbs": ["get", "list", "watch", "patch"],
            },
            {
                "apiGroups": ["apiextensions.k8s.io"],
                "resources": ["customresourcedefinitions"],
                "verbs": ["get", "list", "watch"],
            },
            {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["get", "list", "watch"]},
            {
                "apiGroups": ["scheduling.k8s.io"],
                "resources": ["priorityclasses"],
                "verbs": ["get", "create"],
            },
            # The workers' identity in each namespace it runs workers in (worker_identity):
            # create only (an existing one is a 409, kept), and the right to bind the workers'
            # ClusterRole and no other, so it needs no pod patch right of its own.
            {"apiGroups": [""], "resources": ["serviceaccounts"], "verbs": ["create"]},
            {"apiGroups": [RBAC_GROUP], "resources": ["rolebindings"], "verbs": ["create"]},
            {
                "apiGroups": [RBAC_GROUP],
                "resources": ["clusterroles"],
                "verbs": ["bind"],
                "resourceNames": [WORKER],
            },
        ],
    )


def worker_cluster_role() -> dict[str, Any]:
    """What a worker may do, granted per namespace by worker_identity's RoleBinding: patch
    pods (its admission policy narrows that to its own pod's checkpoint annotation)."""
    rules = [{"apiGroups": [""], "resources": ["pods"], "verbs": ["patch"]}]
    return cluster_role(WORKER, app_labels(WORKER, "worker"), rules)


def worker_identity(namespace: str) -> list[dict[str, Any]]:
    """The workers' ServiceAccount in ``namespace`` and the RoleBinding of
    :func:`worker_cluster_role` to it there: what the operator creates before worker pods."""
    labels = app_labels(WORKER, "worker")
    return [
        service_account(WORKER, namespace, labels),
        role_binding(WORKER, namespace, labels, WORKER, WORKER),
    ]


def _quoted(text: str) -> str:
    """``text`` as a CEL string literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _extra(key: str) -> str:
    """CEL: the values of the requesting user's extra ``key`` ([] when it has none)."""
    extra = "request.userInfo.extra"
    return f"has({extra}) && {_quoted(key)} in {extra} ? {extra}[{_quoted(key)}] : []"


def _metadata(obj: str, field: str, empty: str) -> str:
    """CEL: ``obj.metadata.field``, or ``empty`` when the field is absent."""
    return f"has({obj}.metadata.{field}) ? {obj}.metadata.{field} : {empty}"


def _worker_validations() -> list[dict[str, str]]:
    checkpoint = _quoted(api.ANNOTATION_CHECKPOINT)
    own_pod = (
        "'a tidal worker may update only its own pod ('"
        " + (size(variables.boundPods) == 1 ? variables.boundPods[0] : 'none')"
        " + '), not ' + request.name"
    )
    unchanged_notes = (
        f"variables.notes.all(k, k == {checkpoint} || "
        "(k in variables.oldNotes && variables.oldNotes[k] == variables.notes[k]))"
        f" && variables.oldNotes.all(k, k == {checkpoint} || k in variables.notes)"
    )
    references = (
        f"({_metadata('object', 'ownerReferences', '[]')}) =="
        f" ({_metadata('oldObject', 'ownerReferences', '[]')})"
        f" && ({_metadata('object', 'finalizers', '[]')}) =="
        f" ({_metadata('oldObject', 'finalizers', '[]')})"
    )
    return [
        {
            # An update of the pod itself carries no subResource at all (not an empty one).
            "expression": "!has(request.subResource) || request.subResource == ''",
            "messageExpression": "'a tidal worker may not update pods/' + request.subResource",
            "reason": "Forbidden",
        },
        {
            "expression": "size(variables.boundPods) == 1",
            "message": "a tidal worker's token must be bound to its pod (the kubelet's projected "
            "token, or a TokenRequest with boundObjectRef kind Pod)",
            "reason": "Forbidden",
        },
        {
            # The uid too: a pod of the same name made later is another pod.
            "expression": "variables.boundPods == [request.name]"
            " && variables.boundUIDs == [oldObject.metadata.uid]",
            "messageExpression": own_pod,
            "reason": "Forbidden",
        },
        {
            "expression": "object.spec == oldObject.spec",
            "message": "a tidal worker may not change its pod's spec",
            "reason": "Forbidden",
        },
        {
            "expression": "variables.labels == variables.oldLabels",
            "message": "a tidal worker may not change its pod's labels",
            "reason": "Forbidden",
        },
        {
            "expression": unchanged_notes,
            "message": f"a tidal worker may change no annotation of its pod but "
            f"{api.ANNOTATION_CHECKPOINT}",
            "reason": "Forbidden",
        },
        {
            "expression": references,
            "message": "a tidal worker may not change its pod's owner references or finalizers",
            "reason": "Forbidden",
        },
    ]


def worker_admission_policy() -> dict[str, Any]:
    """Updates of pods by a ``tidal-worker`` ServiceAccount (any namespace) pass only from a
    token bound to the pod updated, and only when nothing but its checkpoint annotation
    changes; its subresources (status, ephemeral containers, resize) never."""
    username = "request.userInfo.username"
    return {
        "apiVersion": ADMISSION_API_VERSION,
        "kind": "ValidatingAdmissionPolicy",
        "metadata": {"name": WORKER_POLICY, "labels": app_labels(WORKER, "worker")},
        "spec": {
            "failurePolicy": "Fail",  # a policy that cannot be evaluated refuses
            "matchConstraints": {
                "resourceRules": [
                    {
                        "apiGroups": [""],
                        "apiVersions": ["v1"],
                        "operations": ["UPDATE"],
                        "resources": ["pods", "pods/*"],
                    }
                ]
            },
            "matchConditions": [
                {
                    "name": "tidal-worker-service-account",
                    "expression": f"{username}.startsWith('system:serviceaccount:')"
                    f" && {username}.endsWith({_quoted(':' + WORKER)})",
                }
            ],
            "variables": [
                {"name": "boundPods", "expression": _extra(POD_NAME_EXTRA)},
                {"name": "boundUIDs", "expression": _extra(POD_UID_EXTRA)},
                {"name": "notes", "expression": _metadata("object", "annotations", "{}")},
                {"name": "oldNotes", "expression": _metadata("oldObject", "annotations", "{}")},
                {"name": "labels", "expression": _metadata("object", "labels", "{}")},
                {"name": "oldLabels", "expression": _metadata("oldObject", "labels", "{}")},
            ],
            "validations": _worker_validations(),
        },
    }


def worker_admission_policy_binding() -> dict[str, Any]:
    """The policy, enforced (Deny) in every namespace."""
    return {
        "apiVersion": ADMISSION_API_VERSION,
        "kind": "ValidatingAdmissionPolicyBinding",
        "metadata": {"name": WORKER_POLICY, "labels": app_labels(WORKER, "worker")},
        "spec": {"policyName": WORKER_POLICY, "validationActions": ["Deny"]},
    }


def kopf_peering_crd() -> dict[str, Any]:
    """kopf's ClusterKopfPeering, where operator replicas see each other (``--peering``):
    the one with the highest priority works, the others wait."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "clusterkopfpeerings.kopf.dev"},
        "spec": {
            "group": "kopf.dev",
            "scope": "Cluster",
            "names": {
                "kind": "ClusterKopfPeering",
                "plural": "clusterkopfpeerings",
                "singular": "clusterkopfpeering",
            },
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {
                                "status": {
                                    "type": "object",
                                    "x-kubernetes-preserve-unknown-fields": True,
                                },
                            },
                        }
                    },
                }
            ],
        },
    }


def operator_identity(namespace: str) -> list[dict[str, Any]]:
    """The operator's ServiceAccount and its binding to :func:`operator_cluster_role`."""
    labels = app_labels(OPERATOR, "operator")
    return [
        service_account(OPERATOR, namespace, labels),
        cluster_role_binding(OPERATOR, namespace, labels),
    ]


def manifests(extra_priority_classes: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Everything the operator needs installed before it runs."""
    return [
        *custom_resource_definitions(extra_priority_classes),
        kopf_peering_crd(),
        *priority_classes(),
        operator_cluster_role(),
        worker_cluster_role(),
        worker_admission_policy(),
        worker_admission_policy_binding(),
    ]
