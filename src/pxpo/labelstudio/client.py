"""A small Label Studio REST client (stdlib ``urllib``; no web stack in pxpo's environment).

Only the endpoints pxpo needs: find / create / update a project, import
tasks (with predictions), export a project's tasks with their annotations,
and create an annotation (what the labelling page sends when a person
submits; the tests use it to play the person). Authentication is the
``Authorization: Token <token>`` header of Label Studio's legacy API tokens.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from ..errors import PxpoInputError


class LabelStudioClient:
    """``LabelStudioClient(url, token)``; every failure is a :class:`PxpoInputError` naming the endpoint."""

    def __init__(self, url: str, token: str, timeout: float = 60.0):
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout

    @classmethod
    def from_config(cls, url: str, token_env: str) -> LabelStudioClient:
        token = os.environ.get(token_env, "")
        if not token:
            raise PxpoInputError(
                f"environment variable {token_env}", "is not set", "export the Label Studio API token (Account & Settings -> Legacy Token)"
            )
        return cls(url, token)

    def request(self, method: str, path: str, body: Any = None, **query: Any) -> Any:
        """One JSON request; returns the decoded JSON answer (None for an empty body)."""
        url = f"{self.url}{path}"
        if query:
            url += "?" + urllib.parse.urlencode({k: v for k, v in query.items() if v is not None})
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(url, data=data, method=method)
        req.add_header("Authorization", f"Token {self.token}")
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read()[:500].decode("utf-8", "replace")
            fix = "check label_studio.token_env (the token)" if exc.code in (401, 403) else "check the request and the server log"
            raise PxpoInputError(f"Label Studio {method} {path}", f"HTTP {exc.code}: {detail}", fix) from None
        except (urllib.error.URLError, OSError) as exc:
            raise PxpoInputError(
                f"Label Studio at {self.url}", f"unreachable ({getattr(exc, 'reason', exc)})", "start the server or fix label_studio.url"
            ) from None
        return json.loads(raw) if raw.strip() else None

    # --- projects -----------------------------------------------------------------------------

    def find_project(self, title: str) -> dict | None:
        """The project titled exactly ``title`` (the lowest id if several), or None."""
        found: list[dict] = []
        page = 1
        while True:
            out = self.request("GET", "/api/projects", title=title, page=page, page_size=100)
            items = out["results"] if isinstance(out, dict) else out
            found += [p for p in items if p.get("title") == title]
            if not isinstance(out, dict) or not out.get("next"):
                break
            page += 1
        return min(found, key=lambda p: p["id"]) if found else None

    def create_project(self, title: str, label_config: str, description: str = "") -> dict:
        return self.request("POST", "/api/projects", {"title": title, "label_config": label_config, "description": description})

    def update_project(self, project_id: int, **fields: Any) -> dict:
        return self.request("PATCH", f"/api/projects/{project_id}", fields)

    # --- tasks and annotations ----------------------------------------------------------------

    def import_tasks(self, project_id: int, tasks: list[dict]) -> dict:
        """Tasks in Label Studio's JSON format (``data`` and optional ``predictions``)."""
        return self.request("POST", f"/api/projects/{project_id}/import", tasks, return_task_ids="true")

    def export_tasks(self, project_id: int) -> list[dict]:
        """Every task of the project with its annotations (also tasks nobody annotated)."""
        return self.request("GET", f"/api/projects/{project_id}/export", exportType="JSON", download_all_tasks="true")

    def create_annotation(self, task_id: int, project_id: int, result: list[dict], **extra: Any) -> dict:
        """Submit an annotation the way the labelling page does (``POST /api/tasks/<id>/annotations``)."""
        body = {"result": result, "was_cancelled": False, "ground_truth": False, "lead_time": 1.0, **extra}
        return self.request("POST", f"/api/tasks/{task_id}/annotations/", body, project=project_id)
