"""A real Prometheus for e2e tests: Debian's server binary scraping local components.

``e2e/build.sh`` unpacks Debian's prometheus package into
``${TIDAL_PROMETHEUS_DIR:-~/.cache/tidal/prometheus}`` (``usr/bin/prometheus``, promtool beside
it). Without it the tests that need it skip, unless TIDAL_E2E=require (CI), which makes that a
failure::

    targets = [ScrapeTarget("tidal-extender", "127.0.0.1:8888", honor_labels=True), ...]
    with Prometheus(targets, tmp_path / "prometheus").start() as prometheus:
        prometheus.wait_targets_up(60)
        prometheus.query('sum(tidal_pool_gpus)')      # the result list of /api/v1/query

:class:`Prometheus` writes a prometheus.yml with one job per :class:`ScrapeTarget`
(static_configs, a 1 s scrape interval unless told otherwise), keeps its TSDB and log in its
work directory, listens on a free loopback port, and is ready when ``/-/ready`` says so.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pytest
import yaml

from tidal.devcluster.process import free_port, tail


def prometheus_dir() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache")))
    return Path(os.environ.get("TIDAL_PROMETHEUS_DIR", str(cache / "tidal" / "prometheus")))


def prometheus_or_skip() -> Path:
    """The Prometheus server binary; without it skip, unless TIDAL_E2E=require (CI)."""
    binary = prometheus_dir() / "usr" / "bin" / "prometheus"
    if os.access(binary, os.X_OK):
        return binary
    message = (
        f"no Prometheus server at {binary}: fetch it with `make e2e-binaries` (e2e/build.sh "
        "unpacks Debian's prometheus package)"
    )
    if os.environ.get("TIDAL_E2E") == "require":
        pytest.fail(message)
    pytest.skip(message)


class PrometheusError(RuntimeError):
    """Prometheus did not start, or its HTTP API refused a request; the message says why."""


@dataclass(frozen=True)
class ScrapeTarget:
    """One scrape job of one endpoint."""

    job: str
    address: str  # host:port
    scheme: str = "http"
    path: str = "/metrics"
    honor_labels: bool = False  # keep the target's own namespace/pod labels (workload labels)
    bearer_token_file: Path | None = None
    insecure_skip_verify: bool = False  # a self-signed serving certificate

    def scrape_config(self) -> dict[str, Any]:
        config: dict[str, Any] = {
            "job_name": self.job,
            "scheme": self.scheme,
            "metrics_path": self.path,
            "honor_labels": self.honor_labels,
            "static_configs": [{"targets": [self.address]}],
        }
        if self.bearer_token_file is not None:
            config["authorization"] = {
                "type": "Bearer",
                "credentials_file": str(self.bearer_token_file),
            }
        if self.insecure_skip_verify:
            config["tls_config"] = {"insecure_skip_verify": True}
        return config


class Prometheus:
    """A Prometheus server scraping ``targets``; ``start()``, then query, then ``stop()``
    (or use the started object as a context manager)."""

    def __init__(
        self,
        targets: Iterable[ScrapeTarget],
        workdir: Path,
        *,
        binary: Path | None = None,
        scrape_interval_s: int = 1,
        startup_timeout_s: float = 60.0,
    ) -> None:
        self.targets = list(targets)
        jobs = [t.job for t in self.targets]
        if len(jobs) != len(set(jobs)):
            raise ValueError(f"job names must be unique: {jobs}")
        self.workdir = workdir
        self.binary = binary
        self.scrape_interval_s = scrape_interval_s
        self.startup_timeout_s = startup_timeout_s
        self.port = 0
        self.started_at = 0.0  # epoch seconds
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "prometheus.log"

    @property
    def config_path(self) -> Path:
        return self.workdir / "prometheus.yml"

    def config(self) -> dict[str, Any]:
        interval = f"{self.scrape_interval_s}s"
        return {
            "global": {
                "scrape_interval": interval,
                "scrape_timeout": interval,
                "evaluation_interval": interval,
            },
            "scrape_configs": [t.scrape_config() for t in self.targets],
        }

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> Prometheus:
        if self._process is not None:
            raise PrometheusError("started already")
        binary = self.binary or prometheus_or_skip()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(yaml.safe_dump(self.config(), sort_keys=False))
        self.port = free_port()
        command = [
            str(binary),
            f"--config.file={self.config_path}",
            f"--storage.tsdb.path={self.workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--storage.tsdb.retention.time=1d",
            "--log.level=info",
        ]
        self._log = self.log_path.open("ab")
        self.started_at = time.time()
        self._process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.startup_timeout_s
        while not self._ready():
            code = self._process.poll()
            if code is not None or time.monotonic() > deadline:
                why = "timed out" if code is None else f"exited {code}"
                self.stop()
                raise PrometheusError(f"Prometheus not ready ({why}):\n{self.log_tail()}")
            time.sleep(0.2)
        return self

    def stop(self) -> None:
        """Terminate and wait (kill after 20 s); the log and TSDB stay in the work directory."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> Prometheus:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_tail(self, lines: int = 30) -> str:
        return tail(self.log_path, lines)

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    # -- the HTTP API ---------------------------------------------------------------------
    def api(
        self, path: str, params: Mapping[str, str | float] | None = None, *, post: bool = False
    ) -> Any:
        """``data`` of a /api/v1 call (``post``: the parameters as a form, as the query
        endpoints take them); PrometheusError with the API's error."""
        params = params or {}
        form = urllib.parse.urlencode({k: str(v) for k, v in params.items()})
        url = f"{self.url}/api/v1/{path}"
        request = (
            urllib.request.Request(url, data=form.encode(), method="POST")
            if post
            else urllib.request.Request(f"{url}?{form}")
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                answer = json.loads(response.read())
        except urllib.error.HTTPError as error:  # 400 / 422: a bad expression, with its error
            answer = json.loads(error.read() or b"{}")
        if answer.get("status") != "success":
            raise PrometheusError(
                f"{path} {params}: {answer.get('errorType')}: {answer.get('error')}"
            )
        return answer["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """The instant vector (or scalar as one sample) ``expr`` gives now (or at ``at``)."""
        params: dict[str, str | float] = {"query": expr}
        if at is not None:
            params["time"] = at
        data = self.api("query", params, post=True)
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        result: list[dict[str, Any]] = data["result"]
        return result

    def query_range(
        self, expr: str, start: float, end: float, step_s: float = 1.0
    ) -> list[dict[str, Any]]:
        """The matrix ``expr`` gives from ``start`` to ``end`` (epoch seconds)."""
        params: dict[str, str | float] = {"query": expr, "start": start, "end": end, "step": step_s}
        data = self.api("query_range", params, post=True)
        result: list[dict[str, Any]] = data["result"]
        return result

    def label_values(self, label: str, match: str) -> list[str]:
        """What Grafana's ``label_values(match, label)`` offers."""
        values: list[str] = self.api(f"label/{label}/values", {"match[]": match})
        return values

    def active_targets(self) -> list[dict[str, Any]]:
        targets: list[dict[str, Any]] = self.api("targets", {"state": "active"})["activeTargets"]
        return targets

    def targets_up(self) -> dict[str, str]:
        """Every configured job → "up", or its health and last scrape error."""
        found = {t["labels"]["job"]: t for t in self.active_targets()}
        out = {}
        for target in self.targets:
            seen = found.get(target.job)
            if seen is None:
                out[target.job] = "not scraped yet"
            elif seen["health"] == "up":
                out[target.job] = "up"
            else:
                out[target.job] = f"{seen['health']}: {seen.get('lastError') or 'no scrape yet'}"
        return out

    def wait_targets_up(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            health = self.targets_up()
            if all(h == "up" for h in health.values()):
                return
            if time.monotonic() > deadline:
                down = {job: h for job, h in health.items() if h != "up"}
                raise AssertionError(f"scrape targets not up after {timeout_s:.0f} s: {down}")
            time.sleep(0.5)
