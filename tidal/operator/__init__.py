"""The kopf operator for LLMService and LLMBatchJob: it parses each object (``spec``), works out
its desired state (``desired``, pure: the pods it should have, manifests in ``pods``), applies
it (``reconciler``, one level-based reconcile per event) and reports status, conditions and
Events. ``crds`` holds the CustomResourceDefinitions the API server validates with;
``manifests`` adds what else the operator needs installed (PriorityClasses, RBAC)."""
