"""The kopf operator for LLMService and LLMBatchJob: it parses each object (``spec``), plans
the pods it should have (``planner``, pure; manifests in ``pods``), applies the plan
(``reconciler``, one level-based reconcile per event) and reports status, conditions and
Events. ``crds`` holds the CustomResourceDefinitions the API server validates with."""
