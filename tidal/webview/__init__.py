"""tidal's own read-only web view of the GPU pool: the snapshot model (:mod:`.snapshot`) that the
extender builds from its cache and the simulator records during a replay, and the one HTML page
(:mod:`.page`) that renders it live or as a replay. Pure: no I/O beyond reading the page's
static file; the extender serves it, the simulator writes it."""
