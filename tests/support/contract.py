"""Checks requests and responses against Fly's OpenAPI document (../shared/reference/machines-openapi.json).

Attach a `ContractChecker` to the simulator's observers: every exchange over HTTP is validated, the
request against its operation's parameters and body, the response against the documented status's
schema. Where Fly's real behaviour departs from its own document, machines-api.md says so, and the
departure is tolerated here by name with its reason; anything else is a violation.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from openapi_core import Config, OpenAPI
from openapi_core.testing import MockRequest, MockResponse

from daemon.sim.api import Exchange

HOST = "https://api.machines.dev"
LEASE_OPERATIONS = {"Machines_create_lease", "Machines_show_lease", "Machines_release_lease"}
ERROR_STATUS_ENUM = {"unknown", "insufficient_capacity"}


def reference_dir() -> Path:
    """../shared/reference beside the checkout (FLYWATCH_REFERENCE_DIR overrides)."""
    override = os.environ.get("FLYWATCH_REFERENCE_DIR")
    if override:
        return Path(override)
    root = Path(__file__).resolve().parents[2]
    return root.parent / "shared" / "reference"


@cache
def openapi() -> OpenAPI:
    spec = json.loads((reference_dir() / "machines-openapi.json").read_text())
    # The published document repeats an operationId (PUT and PATCH metadata), so skip its self-check.
    return OpenAPI.from_dict(spec, config=Config(spec_validator_cls=None))


@cache
def documented_statuses() -> dict[tuple[str, str], set[int]]:
    spec = json.loads((reference_dir() / "machines-openapi.json").read_text())
    result = {}
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            if method == "parameters":
                continue
            result[(method, path)] = {int(code) for code in operation.get("responses", {}) if code.isdigit()}
    return result


def _template(method: str, path: str) -> str | None:
    """The spec's path template for a concrete /v1 path and method."""
    parts = path.removeprefix("/v1").strip("/").split("/")
    for verb, template in documented_statuses():
        if verb != method.lower():
            continue
        tparts = template.strip("/").split("/")
        if len(tparts) == len(parts) and all(
            t.startswith("{") or t == p for t, p in zip(tparts, parts, strict=True)
        ):
            return template
    return None


# Known departures of Fly's real API from its OpenAPI document, each with its source.
TOLERATED = {
    "undocumented-body": "the document declares no content for this status; Fly's docs show a JSON body "
    "(start answers {previous_state, migrated, new_host}, stop {ok: true}; machines-api.md §1)",
    "comma-states": "wait's state takes repeated or comma-separated values (its own description says so)",
    "lease-without-body": "fly-go acquires leases with ?ttl= and no body (machines-api.md §1)",
    "metadata-null": "bulk metadata updates remove keys given as null (machines-api.md §1)",
}


@dataclass
class ContractChecker:
    violations: list[str] = field(default_factory=list)
    tolerated: dict[str, int] = field(default_factory=dict)
    checked: int = 0

    def __call__(self, exchange: Exchange) -> None:
        self.checked += 1
        template = _template(exchange.method, exchange.path)
        where = f"{exchange.method} {exchange.path} -> {exchange.status}"
        if template is None:
            if exchange.status not in (401, 404, 405):
                self.violations.append(f"{where}: operation is not in the OpenAPI document")
            return
        request = MockRequest(
            HOST,
            exchange.method.lower(),
            exchange.path,
            args=dict(exchange.query),
            headers={k.lower(): v for k, v in exchange.headers.items()},
            data=exchange.body or None,
            content_type=exchange.headers.get("Content-Type", "application/json").split(";")[0],
        )
        self._check_request(where, exchange, request)
        self._check_response(where, exchange, request, template)

    def _tolerate(self, key: str) -> None:
        self.tolerated[key] = self.tolerated.get(key, 0) + 1

    def _check_request(self, where: str, exchange: Exchange, request: MockRequest) -> None:
        if exchange.status == 401:
            return  # auth is checked before anything else, as Fly does; the request may be anything
        try:
            openapi().validate_request(request)
        except Exception as exc:  # noqa: BLE001 - openapi-core raises a family of errors
            text = f"{exc} {exc.__cause__ or ''}"
            if "state" in text and any("," in v for k, v in exchange.query if k == "state"):
                self._tolerate("comma-states")
                return
            if exchange.operation == "Machines_create_lease" and not exchange.body:
                self._tolerate("lease-without-body")
                return
            if exchange.operation.endswith("_metadata") and "None for not nullable" in text:
                self._tolerate("metadata-null")
                return
            if exchange.status < 400:
                self.violations.append(f"{where}: request accepted but not valid for the document: {text}")
            # a request the document rejects must be rejected by the server too: answered 4xx, it is fine

    def _check_response(self, where: str, exchange: Exchange, request: MockRequest, template: str) -> None:
        statuses = documented_statuses()[(exchange.method.lower(), template)]
        content_type = exchange.response_headers.get("Content-Type", "").split(";")[0]
        body: Any = None
        if content_type == "application/json":
            try:
                body = json.loads(exchange.response_body)
            except ValueError:
                self.violations.append(f"{where}: Content-Type is JSON but the body is not")
                return
        if exchange.status == 204 and not exchange.response_body and 204 in statuses:
            return  # no content, as documented
        if exchange.status in statuses:
            response = MockResponse(
                exchange.response_body, exchange.status, content_type=content_type or "application/json"
            )
            try:
                openapi().validate_response(request, response)
            except Exception as exc:  # noqa: BLE001
                text = f"{exc} {exc.__cause__ or ''}"
                if "Valid mimetypes: []" in text:
                    self._tolerate("undocumented-body")
                else:
                    self.violations.append(f"{where}: response does not match the document: {text}")
            if exchange.operation in LEASE_OPERATIONS and exchange.method != "DELETE":
                self._check_lease_envelope(where, body)
            return
        if exchange.status < 400:
            self.violations.append(
                f"{where}: success status {exchange.status} is not documented ({sorted(statuses)})"
            )
            return
        self._check_error(where, exchange, body, content_type)

    def _check_lease_envelope(self, where: str, body: Any) -> None:
        types = {"nonce": str, "expires_at": int, "owner": str, "description": str, "version": str}
        data = body.get("data") if isinstance(body, dict) else None
        if not isinstance(body, dict) or body.get("status") != "success" or not isinstance(data, dict):
            self.violations.append(f"{where}: lease answer is not the success envelope: {body!r}")
            return
        for key, kind in types.items():
            if not isinstance(data.get(key), kind):
                self.violations.append(f"{where}: lease data.{key} should be {kind.__name__}: {data!r}")

    def _check_error(self, where: str, exchange: Exchange, body: Any, content_type: str) -> None:
        if content_type != "application/json":
            if exchange.status < 500:
                self.violations.append(f"{where}: a 4xx answer must be JSON, got {content_type!r}")
            return  # Fly's 5xx may come from a proxy, with any body
        if not isinstance(body, dict):
            self.violations.append(f"{where}: error body is not an object: {body!r}")
            return
        if exchange.operation in LEASE_OPERATIONS:
            if body.get("status") != "error" or not isinstance(body.get("message"), str):
                self.violations.append(f"{where}: lease error is not the error envelope: {body!r}")
            return
        if not isinstance(body.get("error"), str) or not body["error"]:
            self.violations.append(f"{where}: error body lacks an `error` message: {body!r}")
        if "status" in body and body["status"] not in ERROR_STATUS_ENUM:
            self.violations.append(
                f"{where}: error status {body['status']!r} not in {sorted(ERROR_STATUS_ENUM)}"
            )
