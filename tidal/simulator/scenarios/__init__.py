"""The bundled simulation scenarios (YAML): openb-day, topology-rich, nvswitch-control;
`tidal simulate --scenario NAME` loads one by name."""
