"""A stateful fake of the Hetzner Cloud API that the real hcloud-python client accepts.

Point the client at it with `Client(token=fake.token, api_endpoint=fake.base_url)`. Shapes follow
providers.md §1.9: server create answers all four keys, actions go running -> success|error,
errors are `{"error": {"code", "message", "details"}}`, every answer carries RateLimit-* headers.

Time-based behaviour (evaluated lazily on every request, so nobody has to poll for it to happen):
each action finishes `action_duration_s` after it began; a start_server action finishes after
`boot_delay_s` instead, or never when `never_boot` is set (the server stays `starting`); the
create_server action takes `create_delay_s` when set (`math.inf`: the server stays `initializing`
and the start after it never begins); a delete_server action takes `delete_delay_s` when set (the
server stays `deleting`, GET still finds it).

Knobs and faults beyond `FakeApiServer`:

    fake.resource_unavailable_in = {"fsn1"}     # POST /servers there -> 412 resource_unavailable
    fake.placement_error_in = {"nbg1"}          # -> 422 placement_error
    fake.server_limit = 3                       # -> 403 resource_limit_exceeded beyond 3 servers
    fake.action_errors_next("create_server", times=1, code="action_failed", message="...")
    fake.boot_delay_s = 5; fake.never_boot = True
    fake.create_delay_s = math.inf              # created servers stay "initializing"
    fake.delete_delay_s = math.inf              # deleted servers stay "deleting"
    fake.finish_pending("create_server")        # end held actions now (e.g. after a *_delay_s of inf)
    fake.ignore_shutdown = True                 # ACPI shutdown succeeds, the server stays running
    fake.add_server("other", labels={...}, status="running")   # something we did not create

Metering: `GET /servers/{id}/metrics` answers synthetic samples at `default_metric_rates` (or
`metric_rates[server id]`), `metrics_step`, `metrics_available_until` (lagging data); with
`enforce_rate_limit` an empty budget (`set_budget(n)`, `rate_limit`) answers 429 with Retry-After.

Inspection: `fake.servers` (id -> server JSON), `fake.actions`, `fake.firewalls`, `fake.requests`.
"""

from __future__ import annotations

import itertools
import math
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from . import JSON_BODY, FakeApiServer

LOCATIONS = {
    "fsn1": {"id": 1, "name": "fsn1", "city": "Falkenstein", "country": "DE", "network_zone": "eu-central"},
    "nbg1": {"id": 2, "name": "nbg1", "city": "Nuremberg", "country": "DE", "network_zone": "eu-central"},
    "hel1": {"id": 3, "name": "hel1", "city": "Helsinki", "country": "FI", "network_zone": "eu-central"},
    "ash": {"id": 4, "name": "ash", "city": "Ashburn, VA", "country": "US", "network_zone": "us-east"},
    "hil": {"id": 5, "name": "hil", "city": "Hillsboro, OR", "country": "US", "network_zone": "us-west"},
    "sin": {"id": 6, "name": "sin", "city": "Singapore", "country": "SG", "network_zone": "ap-southeast"},
}
SERVER_TYPES = {
    "cx23": {"id": 1, "name": "cx23", "cores": 2, "memory": 4.0, "disk": 40, "cpu_type": "shared"},
    "cx33": {"id": 2, "name": "cx33", "cores": 4, "memory": 8.0, "disk": 80, "cpu_type": "shared"},
    "cpx11": {"id": 3, "name": "cpx11", "cores": 2, "memory": 2.0, "disk": 40, "cpu_type": "shared"},
    "cpx21": {"id": 4, "name": "cpx21", "cores": 3, "memory": 4.0, "disk": 80, "cpu_type": "shared"},
    "cax11": {"id": 5, "name": "cax11", "cores": 2, "memory": 4.0, "disk": 40, "cpu_type": "shared"},
}
STATUS_CODES = {
    400: "json_error",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    409: "conflict",
    412: "resource_unavailable",
    422: "invalid_input",
    423: "locked",
    429: "rate_limit_exceeded",
    500: "server_error",
    503: "unavailable",
    504: "timeout",
}


def _now_iso() -> str:
    return datetime.now(UTC).isoformat()


@dataclass
class _PendingAction:
    action: dict[str, Any]
    done_at: float
    server_id: int | None
    on_success: str | None  # new server status, "gone" to delete
    error: dict[str, str] | None = None


@dataclass
class _ActionError:
    command: str
    times: int
    code: str
    message: str


def _selector_matches(selector: str, labels: dict[str, str]) -> bool:
    """Label selector subset: `k=v`, `k==v`, `k!=v`, `k`, `!k`, `k in (a,b)`, `k notin (a,b)`."""
    terms: list[str] = []
    depth, cur = 0, ""
    for ch in selector:
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            terms.append(cur)
            cur = ""
        else:
            cur += ch
    terms.append(cur)
    for raw in terms:
        term = raw.strip()
        if not term:
            continue
        if " notin " in term or " in " in term:
            neg = " notin " in term
            key, _, rest = term.partition(" notin " if neg else " in ")
            values = {v.strip() for v in rest.strip().strip("()").split(",")}
            ok = labels.get(key.strip()) in values
            if ok == neg:
                return False
        elif "!=" in term:
            key, _, value = term.partition("!=")
            if labels.get(key.strip()) == value.strip():
                return False
        elif "=" in term:
            key, _, value = term.replace("==", "=").partition("=")
            if labels.get(key.strip()) != value.strip():
                return False
        elif term.startswith("!"):
            if term[1:].strip() in labels:
                return False
        elif term not in labels:
            return False
    return True


class FakeHetzner(FakeApiServer):
    prefix = "/v1"

    def __init__(self, token: str = "test-token") -> None:
        super().__init__(token)
        self.servers: dict[int, dict[str, Any]] = {}
        self.actions: dict[int, dict[str, Any]] = {}
        self.firewalls: dict[int, dict[str, Any]] = {}
        self._pending: list[_PendingAction] = []
        self._action_errors: list[_ActionError] = []
        self._ids = itertools.count(1)
        self.resource_unavailable_in: set[str] = set()
        self.placement_error_in: set[str] = set()
        self.server_limit: int | None = None
        self.action_duration_s = 0.02
        self.boot_delay_s = 0.0
        self.never_boot = False
        self.create_delay_s: float | None = None
        self.delete_delay_s: float | None = None
        self.ignore_shutdown = False
        self.user_data: dict[int, str | None] = {}
        # Lifecycle tests point servers at loopback, where an emulated VM runs; other tests keep
        # documentation addresses (203.0.113.0/24) that nothing ever connects to.
        self.fixed_ipv4: str | None = None
        self.rate_limit = 3600
        self._budget = float(self.rate_limit)
        self._budget_at = time.monotonic()
        # Metrics: rates per sample (strings, per second: cpu in percent of one vCPU, bytes/s).
        self.default_metric_rates: dict[str, str] = {
            "cpu": "50", "network.0.bandwidth.in": "1000", "network.0.bandwidth.out": "2000",
            "disk.0.bandwidth.read": "4096", "disk.0.bandwidth.write": "8192",
        }
        self.metric_rates: dict[int, dict[str, str]] = {}
        self.metrics_step: int | None = None
        self.metrics_available_until: float | None = None
        # When set, an empty budget answers 429 rate_limit_exceeded (refills 1 request per second).
        self.enforce_rate_limit = False

    # -- knobs ----------------------------------------------------------------------------------

    def action_errors_next(
        self,
        command: str,
        *,
        times: int = 1,
        code: str = "action_failed",
        message: str = "action failed (fake)",
    ) -> None:
        """The next `times` actions with this command (e.g. create_server, start_server) end in error."""
        with self.lock:
            self._action_errors.append(_ActionError(command, times, code, message))

    def finish_pending(self, command: str | None = None) -> int:
        """Finish the running actions (all, or those with this command) now; returns how many.

        A start_server that follows a held create_server stays held until it is finished too.
        """
        with self.lock:
            due = [p for p in self._pending if command is None or p.action["command"] == command]
            for pending in due:
                pending.done_at = 0.0
            self.before_request()
            return len(due)

    def add_server(
        self,
        name: str,
        *,
        labels: dict[str, str] | None = None,
        status: str = "running",
        location: str = "fsn1",
        server_type: str = "cx23",
    ) -> dict[str, Any]:
        """Put a server in the project directly (made by someone else, or by a lost request)."""
        with self.lock:
            server = self._new_server(name, labels or {}, location, server_type, None, [])
            server["status"] = status
            return server

    # -- plumbing -----------------------------------------------------------------------------------

    def error_response(
        self, status: int, code: str | None, message: str | None, headers: dict[str, str] | None = None
    ) -> web.Response:
        code = code or STATUS_CODES.get(status, "server_error")
        hdrs = dict(headers or {})
        if status == 429:
            hdrs.setdefault("RateLimit-Limit", str(self.rate_limit))
            hdrs.setdefault("RateLimit-Remaining", "0")
            hdrs.setdefault("RateLimit-Reset", str(int(time.time()) + 5))
        body = {"error": {"code": code, "message": message or code.replace("_", " "), "details": {}}}
        return web.json_response(body, status=status, headers=hdrs)

    def unauthorized(self) -> web.Response:
        return self.error_response(401, "unauthorized", "unable to authenticate")

    def set_budget(self, remaining: float) -> None:
        """Put the project's remaining budget at `remaining` (refill continues at 1 per second)."""
        with self.lock:
            self._budget = float(remaining)
            self._budget_at = time.monotonic()

    async def _respond(self, request: web.Request, handler: Any, path: str) -> web.StreamResponse:
        if self.enforce_rate_limit and self.check_auth(request):
            with self.lock:
                now = time.monotonic()
                budget = min(float(self.rate_limit), self._budget + (now - self._budget_at))
            if budget < 1:
                return self.error_response(429, "rate_limit_exceeded", "limit of requests per hour reached",
                                           {"Retry-After": "1"})
        return await super()._respond(request, handler, path)

    def decorate(self, response: web.StreamResponse) -> None:
        if response.status == 429 and self.enforce_rate_limit:
            response.headers.setdefault("RateLimit-Limit", str(self.rate_limit))
            return  # a refused request costs nothing
        with self.lock:
            now = time.monotonic()
            self._budget = min(float(self.rate_limit), self._budget + (now - self._budget_at))
            self._budget_at = now
            self._budget = max(0.0, self._budget - 1)
            remaining = int(self._budget)
        response.headers.setdefault("RateLimit-Limit", str(self.rate_limit))
        response.headers.setdefault("RateLimit-Remaining", str(remaining))
        response.headers.setdefault("RateLimit-Reset", str(int(time.time() + self.rate_limit - remaining)))
        response.headers.setdefault("X-Correlation-Id", uuid.uuid4().hex)

    def before_request(self) -> None:
        now = time.monotonic()
        for pending in [p for p in self._pending if p.done_at <= now]:
            self._pending.remove(pending)
            self._finish(pending)

    def _finish(self, pending: _PendingAction) -> None:
        action = pending.action
        action["finished"] = _now_iso()
        action["progress"] = 100
        server = self.servers.get(pending.server_id) if pending.server_id is not None else None
        if pending.error is not None:
            action["status"] = "error"
            action["error"] = pending.error
            if server is not None and server["status"] in ("initializing", "starting"):
                server["status"] = "off"
        else:
            action["status"] = "success"
            if server is not None and pending.on_success == "gone":
                self._forget_server(server["id"])
            elif server is not None and pending.on_success is not None:
                server["status"] = pending.on_success
        if server is not None and server["id"] in self.servers:
            server["locked"] = any(
                p.server_id == server["id"] and p.action["command"] != "delete_server" for p in self._pending
            )

    def _forget_server(self, server_id: int) -> None:
        self.servers.pop(server_id, None)
        for fw in self.firewalls.values():
            for entry in fw["applied_to"]:
                if entry["type"] == "server" and entry["server"]["id"] == server_id:
                    fw["applied_to"].remove(entry)
                    break

    def _action(
        self,
        command: str,
        server_id: int | None,
        *,
        duration: float | None = None,
        on_success: str | None = None,
        resources: list[dict[str, Any]] | None = None,
    ) -> dict[str, Any]:
        action_id = next(self._ids)
        action = {
            "id": action_id,
            "command": command,
            "status": "running",
            "progress": 0,
            "started": _now_iso(),
            "finished": None,
            "resources": resources
            if resources is not None
            else ([{"id": server_id, "type": "server"}] if server_id is not None else []),
            "error": None,
        }
        self.actions[action_id] = action
        error = None
        for inj in self._action_errors:
            if inj.command == command and inj.times > 0:
                inj.times -= 1
                error = {"code": inj.code, "message": inj.message}
                if inj.times == 0:
                    self._action_errors.remove(inj)
                break
        delay = self.action_duration_s if duration is None else duration
        self._pending.append(_PendingAction(action, time.monotonic() + delay, server_id, on_success, error))
        if server_id is not None and server_id in self.servers and command != "delete_server":
            self.servers[server_id]["locked"] = True
        return action

    def _boot_duration(self) -> float:
        return math.inf if self.never_boot else max(self.action_duration_s, self.boot_delay_s)

    def _new_server(
        self,
        name: str,
        labels: dict[str, str],
        location: str,
        server_type: str,
        image: str | None,
        firewall_ids: list[int],
    ) -> dict[str, Any]:
        server_id = next(self._ids)
        server = {
            "id": server_id,
            "name": name,
            "status": "initializing",
            "created": _now_iso(),
            "public_net": {
                "ipv4": {
                    "id": server_id + 100000,
                    "ip": self.fixed_ipv4 or f"203.0.113.{server_id % 250 + 1}",
                    "blocked": False,
                    "dns_ptr": f"static.{server_id}.example",
                },
                "ipv6": None,
                "floating_ips": [],
                "firewalls": [{"id": fid, "status": "applied"} for fid in firewall_ids],
            },
            "private_net": [],
            "server_type": SERVER_TYPES.get(server_type, {"id": 99, "name": server_type}),
            "location": LOCATIONS.get(location, {"id": 99, "name": location}),
            "image": {"id": 7, "type": "system", "name": image} if image else None,
            "iso": None,
            "rescue_enabled": False,
            "locked": False,
            "backup_window": None,
            "outgoing_traffic": 0,
            "ingoing_traffic": 0,
            "included_traffic": 21990232555520,
            "protection": {"delete": False, "rebuild": False},
            "labels": dict(labels),
            "volumes": [],
            "load_balancers": [],
            "primary_disk_size": 40,
            "placement_group": None,
        }
        self.servers[server_id] = server
        return server

    def _json(self, payload: Any, status: int = 200) -> web.Response:
        return web.json_response(payload, status=status)

    def _server_or_404(self, request: web.Request) -> dict[str, Any] | web.Response:
        try:
            server_id = int(request.match_info["id"])
        except ValueError:
            return self.error_response(400, "invalid_input", "invalid server id")
        server = self.servers.get(server_id)
        if server is None:
            return self.error_response(404, "not_found", f"server with ID '{server_id}' not found")
        return server

    @staticmethod
    def _page(items: list[dict[str, Any]], request: web.Request, key: str) -> dict[str, Any]:
        page = int(request.query.get("page", "1"))
        per_page = int(request.query.get("per_page", "25"))
        total = len(items)
        last = max(1, math.ceil(total / per_page))
        chunk = items[(page - 1) * per_page : page * per_page]
        return {
            key: chunk,
            "meta": {
                "pagination": {
                    "page": page,
                    "per_page": per_page,
                    "previous_page": page - 1 if page > 1 else None,
                    "next_page": page + 1 if page < last else None,
                    "last_page": last,
                    "total_entries": total,
                }
            },
        }

    # -- routes ---------------------------------------------------------------------------------------

    def add_routes(self, router: web.UrlDispatcher) -> None:
        p = self.prefix
        router.add_post(f"{p}/servers", self.create_server)
        router.add_get(f"{p}/servers", self.list_servers)
        router.add_get(f"{p}/servers/actions/{{aid}}", self.get_action)
        router.add_get(f"{p}/servers/{{id}}", self.get_server)
        router.add_put(f"{p}/servers/{{id}}", self.update_server)
        router.add_delete(f"{p}/servers/{{id}}", self.delete_server)
        router.add_get(f"{p}/servers/{{id}}/actions", self.list_server_actions)
        router.add_post(f"{p}/servers/{{id}}/actions/{{op}}", self.server_action)
        router.add_get(f"{p}/servers/{{id}}/metrics", self.metrics)
        router.add_get(f"{p}/actions/{{aid}}", self.get_action)
        router.add_post(f"{p}/firewalls", self.create_firewall)
        router.add_get(f"{p}/firewalls", self.list_firewalls)
        router.add_get(f"{p}/firewalls/{{fid}}", self.get_firewall)
        router.add_delete(f"{p}/firewalls/{{fid}}", self.delete_firewall)
        router.add_post(f"{p}/firewalls/{{fid}}/actions/{{op}}", self.firewall_action)
        router.add_get(f"{p}/locations", self.list_locations)
        router.add_get(f"{p}/server_types", self.list_server_types)

    async def create_server(self, request: web.Request) -> web.Response:
        body = request[JSON_BODY]
        if not isinstance(body, dict):
            return self.error_response(400, "json_error", "invalid JSON")
        with self.lock:
            missing = [k for k in ("name", "server_type", "image") if not body.get(k)]
            if missing:
                return self._invalid(missing, "is required")
            name = str(body["name"])
            if any(s["name"] == name for s in self.servers.values()):
                return web.json_response(
                    {
                        "error": {
                            "code": "uniqueness_error",
                            "message": "server name is already used",
                            "details": {"fields": [{"name": "name"}]},
                        }
                    },
                    status=409,
                )
            server_type = str(body["server_type"])
            if server_type not in SERVER_TYPES:
                return self._invalid(["server_type"], f"server type {server_type} not found")
            location = str(body.get("location") or "fsn1")
            if location not in LOCATIONS:
                return self._invalid(["location"], f"location {location} not found")
            if location in self.resource_unavailable_in:
                return self.error_response(
                    412, "resource_unavailable", "we are unable to provision servers for this location"
                )
            if location in self.placement_error_in:
                return self.error_response(422, "placement_error", "error during placement")
            if self.server_limit is not None and len(self.servers) >= self.server_limit:
                return web.json_response(
                    {
                        "error": {
                            "code": "resource_limit_exceeded",
                            "message": "server limit exceeded",
                            "details": {"limits": [{"name": "server_limit"}]},
                        }
                    },
                    status=403,
                )
            firewall_ids = [int(f["firewall"]) for f in body.get("firewalls") or []]
            for fid in firewall_ids:
                if fid not in self.firewalls:
                    return self._invalid(["firewalls"], f"firewall {fid} not found")
            labels = body.get("labels") or {}
            server = self._new_server(name, labels, location, server_type, str(body["image"]), firewall_ids)
            # Kept aside like Hetzner does (the API never returns it): what the VM would boot with.
            self.user_data[server["id"]] = body.get("user_data")
            for fid in firewall_ids:
                self.firewalls[fid]["applied_to"].append({"type": "server", "server": {"id": server["id"]}})
            start = body.get("start_after_create", True) is not False
            create_duration = self.action_duration_s if self.create_delay_s is None else self.create_delay_s
            create = self._action(
                "create_server", server["id"], duration=create_duration, on_success="starting" if start else "off"
            )
            next_actions = []
            if start:
                # The start never finishes before the create it follows.
                boot = max(self._boot_duration(), create_duration)
                next_actions.append(self._action("start_server", server["id"], duration=boot, on_success="running"))
                if create_error := self._pending_error(create["id"]):
                    self._set_pending_error(next_actions[0]["id"], create_error)
            return self._json(
                {"server": server, "action": create, "next_actions": next_actions, "root_password": None}, 201
            )

    def _pending_error(self, action_id: int) -> dict[str, str] | None:
        for p in self._pending:
            if p.action["id"] == action_id:
                return p.error
        return None

    def _set_pending_error(self, action_id: int, error: dict[str, str]) -> None:
        for p in self._pending:
            if p.action["id"] == action_id:
                p.error = error
                p.done_at = time.monotonic() + self.action_duration_s

    def _invalid(self, fields: list[str], message: str) -> web.Response:
        return web.json_response(
            {
                "error": {
                    "code": "invalid_input",
                    "message": f"invalid input in fields '{','.join(fields)}'",
                    "details": {"fields": [{"name": f, "messages": [message]} for f in fields]},
                }
            },
            status=422,
        )

    async def list_servers(self, request: web.Request) -> web.Response:
        with self.lock:
            items = sorted(self.servers.values(), key=lambda s: s["id"])
            if "name" in request.query:
                items = [s for s in items if s["name"] == request.query["name"]]
            if "label_selector" in request.query:
                items = [s for s in items if _selector_matches(request.query["label_selector"], s["labels"])]
            statuses = request.query.getall("status", [])
            if statuses:
                items = [s for s in items if s["status"] in statuses]
            return self._json(self._page(items, request, "servers"))

    async def get_server(self, request: web.Request) -> web.Response:
        with self.lock:
            server = self._server_or_404(request)
            if isinstance(server, web.Response):
                return server
            return self._json({"server": server})

    async def update_server(self, request: web.Request) -> web.Response:
        body = request[JSON_BODY] or {}
        with self.lock:
            server = self._server_or_404(request)
            if isinstance(server, web.Response):
                return server
            if "labels" in body:
                server["labels"] = dict(body["labels"] or {})
            if "name" in body:
                server["name"] = body["name"]
            return self._json({"server": server})

    async def delete_server(self, request: web.Request) -> web.Response:
        with self.lock:
            server = self._server_or_404(request)
            if isinstance(server, web.Response):
                return server
            server["status"] = "deleting"
            # A delete supersedes whatever was running (a boot that never ends, for instance).
            self._pending = [p for p in self._pending if p.server_id != server["id"]]
            action = self._action("delete_server", server["id"], duration=self.delete_delay_s, on_success="gone")
            return self._json({"action": action})

    async def list_server_actions(self, request: web.Request) -> web.Response:
        with self.lock:
            server = self._server_or_404(request)
            if isinstance(server, web.Response):
                return server
            items = [a for a in self.actions.values() if any(r["id"] == server["id"] for r in a["resources"])]
            statuses = request.query.getall("status", [])
            if statuses:
                items = [a for a in items if a["status"] in statuses]
            for key in reversed(request.query.getall("sort", [])):
                field, _, direction = key.partition(":")
                items.sort(key=lambda a: a.get(field) or 0, reverse=direction == "desc")
            return self._json(self._page(items, request, "actions"))

    async def server_action(self, request: web.Request) -> web.Response:
        op = request.match_info["op"]
        with self.lock:
            server = self._server_or_404(request)
            if isinstance(server, web.Response):
                return server
            if server["locked"] or server["status"] == "deleting":
                return self.error_response(423, "locked", "server is locked")
            sid = server["id"]
            if op == "poweron":
                if server["status"] != "running":
                    server["status"] = "starting"
                action = self._action("start_server", sid, duration=self._boot_duration(), on_success="running")
            elif op == "poweroff":
                if server["status"] != "off":
                    server["status"] = "stopping"
                action = self._action("stop_server", sid, on_success="off")
            elif op == "shutdown":
                keep = server["status"]
                action = self._action("shutdown_server", sid, on_success=keep if self.ignore_shutdown else "off")
                if not self.ignore_shutdown and server["status"] != "off":
                    server["status"] = "stopping"
            elif op in ("reboot", "reset"):
                action = self._action(f"{op}_server", sid, on_success="running")
            else:
                return self.error_response(404, "not_found", f"unknown action {op}")
            return self._json({"action": action}, 201)

    async def metrics(self, request: web.Request) -> web.Response:
        """Synthetic per-step samples over `[start, end)` at the server's rates (`metric_rates`).

        Samples are stamped at multiples of the step (the response's step: `metrics_step` when set,
        like Hetzner raising it for long windows); none at or after `metrics_available_until`
        (data that lags); none for a server that is `off`. Values are strings, as Hetzner sends them.
        """
        with self.lock:
            server = self._server_or_404(request)
            if isinstance(server, web.Response):
                return server
            rates = {**self.default_metric_rates, **self.metric_rates.get(server["id"], {})}
            powered = server["status"] == "running"
            available_until = self.metrics_available_until
        types: set[str] = set()
        for raw in request.query.getall("type", []):
            types.update(t for t in raw.split(",") if t)
        if not types or not types <= {"cpu", "disk", "network"}:
            return self.error_response(422, "invalid_input", "type must be cpu, disk and/or network")
        try:
            start = datetime.fromisoformat(request.query["start"]).timestamp()
            end = datetime.fromisoformat(request.query["end"]).timestamp()
        except (KeyError, ValueError):
            return self.error_response(422, "invalid_input", "start and end must be ISO 8601 times")
        if end < start:
            return self.error_response(422, "invalid_input", "end is before start")
        step = int(self.metrics_step or float(request.query.get("step", "60")))
        while (end - start) / step > 500:  # at most 500 samples: Hetzner raises the step
            step *= 2
        stamps = [t for t in range(math.ceil(start / step) * step, math.ceil(end), step)
                  if t < end and (available_until is None or t < available_until)] if powered else []
        series = {name: {"values": [[t, value] for t in stamps]} for name, value in rates.items()
                  if name.split(".")[0] in types}
        return self._json({"metrics": {"start": request.query["start"], "end": request.query["end"],
                                       "step": step, "time_series": series}})

    async def get_action(self, request: web.Request) -> web.Response:
        with self.lock:
            try:
                action = self.actions.get(int(request.match_info["aid"]))
            except ValueError:
                action = None
            if action is None:
                return self.error_response(404, "not_found", "action not found")
            return self._json({"action": action})

    # -- firewalls ---------------------------------------------------------------------------------

    @staticmethod
    def _rule(raw: dict[str, Any]) -> dict[str, Any]:
        return {
            "direction": raw.get("direction"),
            "protocol": raw.get("protocol"),
            "port": raw.get("port"),
            "source_ips": list(raw.get("source_ips") or []),
            "destination_ips": list(raw.get("destination_ips") or []),
            "description": raw.get("description"),
        }

    async def create_firewall(self, request: web.Request) -> web.Response:
        body = request[JSON_BODY]
        if not isinstance(body, dict) or not body.get("name"):
            return self._invalid(["name"], "is required")
        with self.lock:
            if any(f["name"] == body["name"] for f in self.firewalls.values()):
                return web.json_response(
                    {
                        "error": {
                            "code": "uniqueness_error",
                            "message": "firewall name is already used",
                            "details": {"fields": [{"name": "name"}]},
                        }
                    },
                    status=409,
                )
            for rule in body.get("rules") or []:
                if rule.get("direction") == "in" and not rule.get("source_ips"):
                    return self._invalid(["rules"], "source_ips is required for direction in")
            fid = next(self._ids)
            fw = {
                "id": fid,
                "name": body["name"],
                "labels": dict(body.get("labels") or {}),
                "created": _now_iso(),
                "rules": [self._rule(r) for r in body.get("rules") or []],
                "applied_to": [],
            }
            for res in body.get("apply_to") or []:
                fw["applied_to"].append(res)
            self.firewalls[fid] = fw
            return self._json({"firewall": fw, "actions": []}, 201)

    async def list_firewalls(self, request: web.Request) -> web.Response:
        with self.lock:
            items = sorted(self.firewalls.values(), key=lambda f: f["id"])
            if "name" in request.query:
                items = [f for f in items if f["name"] == request.query["name"]]
            if "label_selector" in request.query:
                items = [f for f in items if _selector_matches(request.query["label_selector"], f["labels"])]
            return self._json(self._page(items, request, "firewalls"))

    def _firewall_or_404(self, request: web.Request) -> dict[str, Any] | web.Response:
        fw = self.firewalls.get(int(request.match_info["fid"]))
        if fw is None:
            return self.error_response(404, "not_found", "firewall not found")
        return fw

    async def get_firewall(self, request: web.Request) -> web.Response:
        with self.lock:
            fw = self._firewall_or_404(request)
            if isinstance(fw, web.Response):
                return fw
            return self._json({"firewall": fw})

    async def delete_firewall(self, request: web.Request) -> web.Response:
        with self.lock:
            fw = self._firewall_or_404(request)
            if isinstance(fw, web.Response):
                return fw
            if any(e["type"] == "server" for e in fw["applied_to"]):
                return self.error_response(422, "resource_in_use", "firewall is still in use")
            del self.firewalls[fw["id"]]
            return web.Response(status=204)

    async def firewall_action(self, request: web.Request) -> web.Response:
        body = request[JSON_BODY] or {}
        op = request.match_info["op"]
        with self.lock:
            fw = self._firewall_or_404(request)
            if isinstance(fw, web.Response):
                return fw
            if op == "set_rules":
                fw["rules"] = [self._rule(r) for r in body.get("rules") or []]
            elif op == "apply_to_resources":
                fw["applied_to"].extend(body.get("apply_to") or [])
            elif op == "remove_from_resources":
                for res in body.get("remove_from") or []:
                    if res in fw["applied_to"]:
                        fw["applied_to"].remove(res)
            else:
                return self.error_response(404, "not_found", f"unknown action {op}")
            action = self._action(op, None, resources=[{"id": fw["id"], "type": "firewall"}])
            return self._json({"actions": [action]}, 201)

    async def list_locations(self, request: web.Request) -> web.Response:
        items = list(LOCATIONS.values())
        if "name" in request.query:
            items = [x for x in items if x["name"] == request.query["name"]]
        return self._json({"locations": items})

    async def list_server_types(self, request: web.Request) -> web.Response:
        items = list(SERVER_TYPES.values())
        if "name" in request.query:
            items = [x for x in items if x["name"] == request.query["name"]]
        return self._json({"server_types": items})
