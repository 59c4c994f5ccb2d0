"""A small client for the Ray dashboard's REST API, with the job's bearer token."""

from __future__ import annotations

import json
import urllib.error
import urllib.request


class DashboardError(RuntimeError):
    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class Dashboard:
    def __init__(self, url: str, token: str | None = None, timeout: float = 10):
        self.url = url.rstrip("/")
        if "://" not in self.url:
            self.url = "http://" + self.url
        self.token = token
        self.timeout = timeout

    def get(self, path: str) -> dict | list:
        req = urllib.request.Request(self.url + path)
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return json.loads(resp.read().decode())
        except urllib.error.HTTPError as exc:
            hint = {401: "this cluster requires its token (--token-file)",
                    403: "the token does not match this cluster's"}.get(exc.code, exc.reason)
            raise DashboardError(f"{self.url}{path}: HTTP {exc.code} ({hint})", exc.code) from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise DashboardError(f"{self.url}{path}: {getattr(exc, 'reason', exc)}") from None

    def version(self) -> dict:
        return self.get("/api/version")

    def nodes(self) -> list[dict]:
        """Every node the GCS knows, alive or dead, with its total resources."""
        body = self.get("/api/v0/nodes?detail=1&limit=10000")
        return body["data"]["result"]["result"]

    def alive_nodes(self) -> list[dict]:
        return [n for n in self.nodes() if n.get("state") == "ALIVE"]

    def jobs(self) -> list[dict]:
        """Driver and submitted jobs (Ray's job API lists both)."""
        return self.get("/api/jobs/")

    def cluster_status(self) -> dict:
        return self.get("/api/cluster_status")
