"""The topology presets as data files (YAML), one per server model: `tidal topo list` names
them and `tidal.topology.load_preset` reads one."""
