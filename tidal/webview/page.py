"""The web view's one HTML page (``static/dashboard.html``: inline CSS and vanilla JavaScript,
no external resource), live or as a replay.

Live: the page fetches a snapshot URL every 2 s and renders it. Replay: the frames are embedded
in the page, with a time slider, play/pause and a speed; the same renderer draws each frame.

A replay is embedded compactly, as the document :func:`replay_document` builds (a day of a
1,000-node pool at a frame every 10 minutes is over a million GPU cells, and in 10 minutes most
nodes do not change)::

    {"version": 1, "source": str,
     "nodes": [node name, ...],                          # each node once
     "kinds": [[state, class, tier, namespace, pod, workload, mode], ...],   # each GPU look once
     "frames": [{"time": float,
                 "grid": [[node index, kind of GPU 0, kind of GPU 1, ...], ...],
                 "gone": [node index, ...],
                 "reservations": [...], "preemptions": [...], "pending": [...], "totals": {...}}]}

A frame's ``grid`` holds the rows of the nodes that are new or changed since the frame before
(all of them in the first), ``gone`` the nodes no longer there; the page carries the other rows
forward and shows the nodes in the order they first appear. Reservations, preemptions, pending
and totals are the snapshot's own (see :mod:`tidal.webview.snapshot`).

What the page may do is pinned by its Content-Security-Policy (as a meta tag, so a replay file
opened from disk has it too, and as a header where it is served): its one script by hash, inline
styles, requests to its own origin only, no form target.
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Iterable, Mapping
from functools import cache
from importlib import resources
from typing import Any

import orjson

from tidal.webview.snapshot import (
    COLOURS,
    LEGEND,
    RECENT_PREEMPTIONS,
    SNAPSHOT_VERSION,
)

REFRESH_MS = 2000  # how often a live page fetches a snapshot
# The page's placeholders, replaced in one pass so that no inserted text is scanned again.
_PLACEHOLDER = re.compile(r"__TIDAL_(CONFIG|REPLAY|CSP)__")
_CODE = re.compile(r"<script>(.*?)</script>", re.DOTALL)  # the one executable script
_KIND_FIELDS = ("state", "class", "tier", "namespace", "pod", "workload", "mode")
_FRAME_FIELDS = ("reservations", "preemptions", "pending", "totals")


@cache
def _template() -> str:
    return resources.files("tidal.webview").joinpath("static/dashboard.html").read_text("utf-8")


@cache
def _policy() -> str:
    """The page's Content-Security-Policy, without what only a header can say."""
    scripts = _CODE.findall(_template())
    if len(scripts) != 1:
        raise RuntimeError(f"dashboard.html: expected one inline script, found {len(scripts)}")
    digest = base64.b64encode(hashlib.sha256(scripts[0].encode()).digest()).decode()
    return (
        f"default-src 'none'; script-src 'sha256-{digest}'; style-src 'unsafe-inline'; "
        "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'"
    )


def content_security_policy() -> str:
    """The Content-Security-Policy header to serve the page with."""
    return _policy() + "; frame-ancestors 'none'"


def render_page(snapshot_url: str | None, replay: list[dict[str, Any]] | None) -> str:
    """The page: live, fetching ``snapshot_url`` (relative to the page, or absolute), or a
    replay of ``replay``'s snapshots (:meth:`Snapshot.to_json` dicts, in time order). Exactly
    one of the two."""
    if (snapshot_url is None) == (replay is None):
        raise ValueError("render_page: give a snapshot URL or replay frames, not both or neither")
    config = {
        "mode": "live" if replay is None else "replay",
        "snapshot_url": snapshot_url,
        "refresh_ms": REFRESH_MS,
        "version": SNAPSHOT_VERSION,
        "colours": COLOURS,
        "legend": LEGEND,
        "recent_preemptions": RECENT_PREEMPTIONS,
    }
    values = {
        "CONFIG": _script_json(config),
        "REPLAY": _script_json(None if replay is None else replay_document(replay)),
        "CSP": _policy(),
    }
    return _PLACEHOLDER.sub(lambda match: values[match[1]], _template())


def replay_document(frames: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Snapshots as the compact replay document the page embeds (see the module docstring):
    node names and GPU looks are interned, a GPU's index is its place in its node's row, and a
    frame holds only the rows that changed."""
    nodes: dict[str, int] = {}
    kinds: dict[tuple[Any, ...], int] = {}
    encoded = []
    source = "simulator"
    shown: dict[int, list[int]] = {}  # node index -> its row in the frame before
    for frame in frames:
        source = frame["source"]
        rows = {}
        for node in frame["nodes"]:
            index = nodes.setdefault(node["name"], len(nodes))
            rows[index] = [index, *_kinds_of(node, kinds)]
        encoded.append(
            {
                "time": frame["time"],
                "grid": [row for index, row in rows.items() if shown.get(index) != row],
                "gone": [index for index in shown if index not in rows],
            }
            | {key: frame[key] for key in _FRAME_FIELDS}
        )
        shown = rows
    return {
        "version": SNAPSHOT_VERSION,
        "source": source,
        "nodes": list(nodes),
        "kinds": [list(look) for look in kinds],
        "frames": encoded,
    }


def _kinds_of(node: Mapping[str, Any], kinds: dict[tuple[Any, ...], int]) -> list[int]:
    """The kind of each of the node's GPUs, by index (new looks are added to ``kinds``)."""
    row = []
    for position, gpu in enumerate(node["gpus"]):
        if gpu["gpu"] != position:
            raise ValueError(f"node {node['name']}: GPUs must be listed by index from 0")
        look = tuple(gpu[field] for field in _KIND_FIELDS)
        row.append(kinds.setdefault(look, len(kinds)))
    return row


def _script_json(value: object) -> str:
    """JSON for a ``<script type="application/json">`` block: with every ``<`` escaped, no
    string from the cluster can close the block (``</script>``) or open a comment."""
    return orjson.dumps(value).replace(b"<", b"\\u003c").decode()
