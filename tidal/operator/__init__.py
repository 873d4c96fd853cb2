"""tidal.operator: the kopf operator for LLMService and LLMBatchJob (planners are pure)."""
