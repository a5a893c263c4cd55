"""A stateful fake of the Fly.io Machines API (apps, volumes, machines, wait) for httpx clients.

Point the client at `fake.base_url` ("http://127.0.0.1:PORT/v1") with `Authorization: Bearer
<fake.token>` (or `FlyV1 <fake.token>`). Shapes follow providers.md §2: errors are
`{"error": "...", "status": "..."?}`, `GET .../wait` long-polls and answers 200 `{"ok": true}` or 408.

Machine states advance with time (evaluated on every request and inside wait):
created -> starting (after `launch_delay_s`, default `action_duration_s`; `math.inf` keeps it
`created`) -> started (after `boot_delay_s`, never when `never_boot`), stopping -> stopped,
destroying -> destroyed. App deletion is immediate, or takes `app_delete_delay_s` when set: the
app stays visible meanwhile and its machines are `destroying`.

Knobs and faults beyond `FakeApiServer`:

    fake.resource_unavailable_in = {"ams"}   # volume create -> 400 "no capacity", machine create -> 412
    fake.machine_unavailable_in = {"fra"}    # machine create only -> 412 insufficient_capacity
    fake.action_errors_next("start", times=1)   # the next launch/start ends in state "failed"
    fake.boot_delay_s = 5; fake.never_boot = True
    fake.launch_delay_s = math.inf           # new machines stay "created"
    fake.app_delete_delay_s = math.inf       # deleted apps linger, their machines "destroying"
    fake.finish_pending()                    # every scheduled transition and app deletion happens now
    fake.other_org_apps = {"slopbox-x"}      # app names taken by someone else (422 on create, 404 on get)
    fake.add_machine(app, metadata={...})    # something we did not create

Prometheus: `/prometheus/<org>/api/v1/query_range` answers every started machine's app with a
point per step at `fake.prom_rates` for each series our query names; `fake.prom_queries` records them.

Inspection: `fake.apps` (name -> app), `fake.machines` (id -> machine JSON, destroyed included),
`fake.volumes` (id -> volume), `fake.requests`.
"""

from __future__ import annotations

import asyncio
import math
import re
import secrets
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from . import JSON_BODY, FakeApiServer

APP_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,61}[a-z0-9]$")
VOLUME_NAME = re.compile(r"^[a-z0-9_]{1,30}$")
REGIONS = {"ams", "arn", "cdg", "fra", "iad", "lhr", "ord", "sjc", "syd", "nrt", "sin", "yyz"}
WAITABLE = {"started", "stopped", "suspended", "destroyed"}


def _now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class _App:
    name: str
    org_slug: str
    network: str
    id: str = field(default_factory=lambda: secrets.token_hex(8))
    created_at: int = field(default_factory=lambda: int(time.time() * 1000))
    machines: dict[str, dict[str, Any]] = field(default_factory=dict)
    volumes: dict[str, dict[str, Any]] = field(default_factory=dict)


class FakeFly(FakeApiServer):
    prefix = "/v1"

    def __init__(self, token: str = "test-token", org_slug: str = "personal") -> None:
        super().__init__(token)
        self.org_slug = org_slug
        self.apps: dict[str, _App] = {}
        self.resource_unavailable_in: set[str] = set()
        self.machine_unavailable_in: set[str] = set()
        self.other_org_apps: set[str] = set()
        self.action_duration_s = 0.02
        self.boot_delay_s = 0.0
        self.never_boot = False
        self.launch_delay_s: float | None = None
        self.app_delete_delay_s: float | None = None
        self.max_wait_s = 60.0
        # Prometheus: value per 60 s point for each started machine, by our query's `series` label.
        self.prom_rates: dict[str, float] = {"cpu_ms": 30_000, "net_in": 60_000, "net_out": 120_000,
                                             "memory_mb_seconds": 256 * 60}
        self.prom_queries: list[str] = []
        # app name -> when its pending deletion completes
        self._app_deletions: dict[str, float] = {}
        self._failures: dict[str, int] = {}
        # machine id -> list of (time, state) transitions still to happen
        self._schedule: dict[str, list[tuple[float, str]]] = {}

    # -- knobs & inspection ----------------------------------------------------------------------

    @property
    def machines(self) -> dict[str, dict[str, Any]]:
        with self.lock:
            return {mid: m for app in self.apps.values() for mid, m in app.machines.items()}

    @property
    def volumes(self) -> dict[str, dict[str, Any]]:
        with self.lock:
            return {vid: v for app in self.apps.values() for vid, v in app.volumes.items()}

    def action_errors_next(self, action: str = "start", *, times: int = 1) -> None:
        """The next `times` launches/starts end in state `failed` instead of `started`."""
        with self.lock:
            self._failures[action] = self._failures.get(action, 0) + times

    def finish_pending(self) -> None:
        """Run every scheduled machine transition and pending app deletion now, in order."""
        with self.lock:
            while self._schedule or self._app_deletions:
                for steps in self._schedule.values():
                    if steps:
                        steps[0] = (0.0, steps[0][1])
                for name in self._app_deletions:
                    self._app_deletions[name] = 0.0
                self.before_request()

    def add_machine(
        self, app_name: str, *, metadata: dict[str, str] | None = None, state: str = "started", region: str = "fra"
    ) -> dict[str, Any]:
        """Put a machine (and its app, if needed) in the fake directly."""
        with self.lock:
            app = self.apps.get(app_name) or self._new_app(app_name, self.org_slug)
            machine = self._new_machine(app, {"image": "x", "metadata": dict(metadata or {})}, region, None)
            machine["state"] = state
            return machine

    # -- plumbing -----------------------------------------------------------------------------------

    def check_auth(self, request: web.Request) -> bool:
        header = request.headers.get("Authorization", "")
        return header in (f"Bearer {self.token}", f"FlyV1 {self.token}")

    def unauthorized(self) -> web.Response:
        return self.error_response(401, None, "You must be authenticated to view this.")

    def error_response(
        self, status: int, code: str | None, message: str | None, headers: dict[str, str] | None = None
    ) -> web.Response:
        body: dict[str, Any] = {"error": message or code or f"HTTP {status}"}
        if code:
            body["status"] = code
        return web.json_response(body, status=status, headers=headers)

    def _err(self, status: int, message: str, code: str | None = None) -> web.Response:
        return self.error_response(status, code, message)

    def before_request(self) -> None:
        now = time.monotonic()
        for mid, steps in list(self._schedule.items()):
            machine = self._find_machine(mid)
            while steps and steps[0][0] <= now:
                _, state = steps.pop(0)
                if machine is not None:
                    machine["state"] = state
                    machine["updated_at"] = _now_iso()
                    machine["events"].append(
                        {"type": state, "status": state, "source": "flyd", "timestamp": int(time.time() * 1000)}
                    )
                    if state == "destroyed":
                        self._detach_volumes(machine)
            if not steps:
                del self._schedule[mid]
        for name, done_at in list(self._app_deletions.items()):
            if done_at <= now:
                del self._app_deletions[name]
                self.apps.pop(name, None)

    def _find_machine(self, mid: str) -> dict[str, Any] | None:
        for app in self.apps.values():
            if mid in app.machines:
                return app.machines[mid]
        return None

    def _detach_volumes(self, machine: dict[str, Any]) -> None:
        for app in self.apps.values():
            for vol in app.volumes.values():
                if vol["attached_machine_id"] == machine["id"]:
                    vol["attached_machine_id"] = None

    def _boot(self, machine: dict[str, Any], kind: str, *, from_created: bool) -> None:
        now = time.monotonic()
        steps: list[tuple[float, str]] = []
        t = now
        if from_created:
            t += self.action_duration_s if self.launch_delay_s is None else self.launch_delay_s
            steps.append((t, "starting"))
        else:
            machine["state"] = "starting"
        if self._failures.get(kind, 0) > 0:
            self._failures[kind] -= 1
            steps.append((t + self.action_duration_s, "failed"))
        elif not self.never_boot:
            steps.append((t + max(self.action_duration_s, self.boot_delay_s), "started"))
        self._schedule[machine["id"]] = steps

    def _new_app(self, name: str, org_slug: str, network: str | None = None) -> _App:
        app = _App(name=name, org_slug=org_slug, network=network or "default")
        self.apps[name] = app
        return app

    def _new_machine(self, app: _App, config: dict[str, Any], region: str, name: str | None) -> dict[str, Any]:
        mid = secrets.token_hex(7)
        machine = {
            "id": mid,
            "name": name or f"machine-{mid[:6]}",
            "state": "created",
            "region": region,
            "instance_id": "01" + secrets.token_hex(12).upper(),
            "private_ip": f"fdaa:0:1:a7b:{secrets.randbelow(0xFFFF):x}::2",
            "config": config,
            "image_ref": {"registry": "registry.fly.io", "repository": str(config.get("image")), "tag": ""},
            "created_at": _now_iso(),
            "updated_at": _now_iso(),
            "events": [{"type": "launch", "status": "created", "source": "user", "timestamp": int(time.time() * 1000)}],
            "host_status": "ok",
        }
        app.machines[mid] = machine
        return machine

    def _app_or_404(self, request: web.Request) -> _App | web.Response:
        app = self.apps.get(request.match_info["app"])
        if app is None:
            return self._err(404, "app not found")
        return app

    def _machine_or_404(self, request: web.Request) -> tuple[_App, dict[str, Any]] | web.Response:
        app = self._app_or_404(request)
        if isinstance(app, web.Response):
            return app
        machine = app.machines.get(request.match_info["mid"])
        if machine is None:
            return self._err(404, "machine not found")
        return app, machine

    # -- routes ---------------------------------------------------------------------------------------

    def add_routes(self, router: web.UrlDispatcher) -> None:
        p = self.prefix
        router.add_post(f"{p}/apps", self.create_app)
        router.add_get(f"{p}/apps", self.list_apps)
        router.add_get(f"{p}/apps/{{app}}", self.get_app)
        router.add_delete(f"{p}/apps/{{app}}", self.delete_app)
        router.add_post(f"{p}/apps/{{app}}/volumes", self.create_volume)
        router.add_get(f"{p}/apps/{{app}}/volumes", self.list_volumes)
        router.add_get(f"{p}/apps/{{app}}/volumes/{{vid}}", self.get_volume)
        router.add_delete(f"{p}/apps/{{app}}/volumes/{{vid}}", self.delete_volume)
        router.add_post(f"{p}/apps/{{app}}/machines", self.create_machine)
        router.add_get(f"{p}/apps/{{app}}/machines", self.list_machines)
        router.add_get(f"{p}/apps/{{app}}/machines/{{mid}}", self.get_machine)
        router.add_delete(f"{p}/apps/{{app}}/machines/{{mid}}", self.delete_machine)
        router.add_post(f"{p}/apps/{{app}}/machines/{{mid}}/start", self.start_machine)
        router.add_post(f"{p}/apps/{{app}}/machines/{{mid}}/stop", self.stop_machine)
        router.add_get(f"{p}/apps/{{app}}/machines/{{mid}}/wait", self.wait_machine)
        router.add_route("*", "/prometheus/{org}/api/v1/query_range", self.prometheus_range)

    # apps

    async def create_app(self, request: web.Request) -> web.Response:
        body = request[JSON_BODY] or {}
        name = str(body.get("app_name") or "")
        org = str(body.get("org_slug") or "")
        with self.lock:
            if not APP_NAME.match(name):
                return self._err(422, f"Validation failed: Name '{name}' is invalid")
            if org != self.org_slug:
                return self._err(404, f"organization {org!r} not found")
            if name in self.apps or name in self.other_org_apps:
                return self._err(422, "Validation failed: Name has already been taken", "name_taken")
            app = self._new_app(name, org, body.get("network"))
            return web.json_response({"id": app.id, "created_at": app.created_at}, status=201)

    def _app_json(self, app: _App) -> dict[str, Any]:
        return {
            "id": app.id,
            "name": app.name,
            "status": "deployed" if app.machines else "pending",
            "organization": {"name": app.org_slug, "slug": app.org_slug},
        }

    async def list_apps(self, request: web.Request) -> web.Response:
        org = request.query.get("org_slug")
        with self.lock:
            apps = [a for a in self.apps.values() if org in (None, a.org_slug)]
            items = [
                {
                    "id": a.id,
                    "name": a.name,
                    "machine_count": sum(1 for m in a.machines.values() if m["state"] != "destroyed"),
                    "network": a.network,
                }
                for a in apps
            ]
            return web.json_response({"total_apps": len(items), "apps": items})

    async def get_app(self, request: web.Request) -> web.Response:
        with self.lock:
            app = self._app_or_404(request)
            if isinstance(app, web.Response):
                return app
            return web.json_response(self._app_json(app))

    async def delete_app(self, request: web.Request) -> web.Response:
        with self.lock:
            app = self._app_or_404(request)
            if isinstance(app, web.Response):
                return app
            if self.app_delete_delay_s is None:
                del self.apps[app.name]
                for mid in app.machines:
                    self._schedule.pop(mid, None)
                return web.Response(status=202)
            # Accepted; the machines are destroyed and the app removed later (Fly answers 202 too).
            if app.name not in self._app_deletions:
                self._app_deletions[app.name] = time.monotonic() + self.app_delete_delay_s
                for machine in app.machines.values():
                    if machine["state"] != "destroyed":
                        machine["state"] = "destroying"
                        self._schedule[machine["id"]] = [(self._app_deletions[app.name], "destroyed")]
            return web.Response(status=202)

    # volumes

    async def create_volume(self, request: web.Request) -> web.Response:
        body = request[JSON_BODY] or {}
        with self.lock:
            app = self._app_or_404(request)
            if isinstance(app, web.Response):
                return app
            name = str(body.get("name") or "")
            region = str(body.get("region") or "")
            if not VOLUME_NAME.match(name):
                return self._err(400, "volume name must be lowercase alphanumeric and underscores, max 30")
            if region not in REGIONS:
                return self._err(400, f"region {region!r} not found")
            if region in self.resource_unavailable_in:
                return self._err(400, "no capacity")
            vid = "vol_" + secrets.token_hex(8)
            vol = {
                "id": vid,
                "name": name,
                "state": "created",
                "size_gb": int(body.get("size_gb") or 1),
                "region": region,
                "zone": secrets.token_hex(2),
                "encrypted": bool(body.get("encrypted", True)),
                "attached_machine_id": None,
                "created_at": _now_iso(),
            }
            app.volumes[vid] = vol
            return web.json_response(vol, status=200)

    async def list_volumes(self, request: web.Request) -> web.Response:
        with self.lock:
            app = self._app_or_404(request)
            if isinstance(app, web.Response):
                return app
            return web.json_response(list(app.volumes.values()))

    async def get_volume(self, request: web.Request) -> web.Response:
        with self.lock:
            app = self._app_or_404(request)
            if isinstance(app, web.Response):
                return app
            vol = app.volumes.get(request.match_info["vid"])
            if vol is None:
                return self._err(404, "volume not found")
            return web.json_response(vol)

    async def delete_volume(self, request: web.Request) -> web.Response:
        with self.lock:
            app = self._app_or_404(request)
            if isinstance(app, web.Response):
                return app
            vol = app.volumes.get(request.match_info["vid"])
            if vol is None:
                return self._err(404, "volume not found")
            if vol["attached_machine_id"]:
                return self._err(412, "volume is attached to a machine", "failed_precondition")
            del app.volumes[vol["id"]]
            return web.json_response({**vol, "state": "destroyed"})

    # machines

    def _validate_guest(self, guest: dict[str, Any]) -> str | None:
        kind = guest.get("cpu_kind", "shared")
        cpus = int(guest.get("cpus", 1))
        mem = int(guest.get("memory_mb", 256))
        if kind not in ("shared", "performance"):
            return f"invalid cpu_kind {kind!r}"
        step, lo, hi = (256, 256, 2048) if kind == "shared" else (1024, 2048, 8192)
        if mem % step:
            return f"invalid memory size {mem}MB: must be a multiple of {step}MB for {kind} cpus"
        if not lo * cpus <= mem <= hi * cpus:
            return f"invalid memory size {mem}MB for {cpus} {kind} cpus (min {lo * cpus}, max {hi * cpus})"
        return None

    async def create_machine(self, request: web.Request) -> web.Response:
        body = request[JSON_BODY] or {}
        with self.lock:
            app = self._app_or_404(request)
            if isinstance(app, web.Response):
                return app
            config = body.get("config") or {}
            if not config.get("image"):
                return self._err(400, "invalid config: image is required", "invalid_config")
            if problem := self._validate_guest(config.get("guest") or {}):
                return self._err(422, problem)
            region = str(body.get("region") or "fra")
            if region not in REGIONS:
                return self._err(400, f"region {region!r} not found")
            mounts = config.get("mounts") or []
            volumes = []
            for mount in mounts:
                vol = app.volumes.get(mount.get("volume", ""))
                if vol is None:
                    return self._err(404, f"volume {mount.get('volume')} not found")
                if vol["region"] != region:
                    return self._err(400, f"volume {vol['id']} is in region {vol['region']}, not {region}")
                if vol["attached_machine_id"]:
                    return self._err(412, f"volume {vol['id']} is already attached", "failed_precondition")
                volumes.append(vol)
            if region in self.resource_unavailable_in | self.machine_unavailable_in:
                vid = volumes[0]["id"] if volumes else ""
                return self._err(
                    412,
                    f"insufficient resources to create new machine with existing volume '{vid}'",
                    "insufficient_capacity",
                )
            machine = self._new_machine(app, config, region, body.get("name"))
            for vol in volumes:
                vol["attached_machine_id"] = machine["id"]
            if not body.get("skip_launch"):
                self._boot(machine, "start", from_created=True)
            return web.json_response(machine)

    async def list_machines(self, request: web.Request) -> web.Response:
        with self.lock:
            app = self._app_or_404(request)
            if isinstance(app, web.Response):
                return app
            items = list(app.machines.values())
            if request.query.get("include_deleted") not in ("true", "1"):
                items = [m for m in items if m["state"] != "destroyed"]
            if region := request.query.get("region"):
                items = [m for m in items if m["region"] == region]
            for key, value in request.query.items():
                if key.startswith("metadata."):
                    k = key.removeprefix("metadata.")
                    items = [m for m in items if (m["config"].get("metadata") or {}).get(k) == value]
            return web.json_response(items)

    async def get_machine(self, request: web.Request) -> web.Response:
        with self.lock:
            found = self._machine_or_404(request)
            if isinstance(found, web.Response):
                return found
            return web.json_response(found[1])

    async def start_machine(self, request: web.Request) -> web.Response:
        with self.lock:
            found = self._machine_or_404(request)
            if isinstance(found, web.Response):
                return found
            machine = found[1]
            previous = machine["state"]
            if previous not in ("stopped", "created", "suspended", "failed"):
                return self._err(
                    412, f"unable to start machine from current state: '{previous}'", "failed_precondition"
                )
            self._boot(machine, "start", from_created=False)
            return web.json_response({"previous_state": previous, "migrated": False, "new_host": ""})

    async def stop_machine(self, request: web.Request) -> web.Response:
        with self.lock:
            found = self._machine_or_404(request)
            if isinstance(found, web.Response):
                return found
            machine = found[1]
            if machine["state"] in ("started", "starting"):
                machine["state"] = "stopping"
                self._schedule[machine["id"]] = [(time.monotonic() + self.action_duration_s, "stopped")]
            elif machine["state"] not in ("stopped", "suspended", "stopping"):
                return self._err(
                    412, f"unable to stop machine from current state: '{machine['state']}'", "failed_precondition"
                )
            return web.json_response({"ok": True})

    async def delete_machine(self, request: web.Request) -> web.Response:
        force = request.query.get("force") in ("true", "1") or request.query.get("kill") in ("true", "1")
        with self.lock:
            found = self._machine_or_404(request)
            if isinstance(found, web.Response):
                return found
            machine = found[1]
            if machine["state"] in ("started", "starting") and not force:
                return self._err(
                    412, "failed_precondition: machine still active, refusing to delete", "failed_precondition"
                )
            machine["state"] = "destroying"
            self._schedule[machine["id"]] = [(time.monotonic() + self.action_duration_s, "destroyed")]
            return web.json_response({"ok": True})

    async def wait_machine(self, request: web.Request) -> web.Response:
        target = request.query.get("state", "started")
        if target not in WAITABLE:
            return self._err(400, f"invalid state {target!r}")
        if target == "stopped" and not (request.query.get("instance_id") or request.query.get("version")):
            return self._err(400, "instance_id is required when waiting for stopped")
        raw_timeout = request.query.get("timeout", "60").removesuffix("s")
        try:
            timeout = min(float(raw_timeout), self.max_wait_s)
        except ValueError:
            return self._err(400, f"invalid timeout {raw_timeout!r}")
        deadline = time.monotonic() + timeout
        while True:
            with self.lock:
                self.before_request()
                found = self._machine_or_404(request)
                if isinstance(found, web.Response):
                    return found
                state = found[1]["state"]
            if state == target:
                return web.json_response({"ok": True})
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return self._err(408, f"deadline_exceeded: machine did not reach {target} (state {state})")
            await asyncio.sleep(min(0.01, remaining) if math.isfinite(remaining) else 0.01)

    # -- Prometheus (api.fly.io/prometheus/<org>/api/v1/query_range) --------------------------------

    async def prometheus_range(self, request: web.Request) -> web.Response:
        """A range query answered per started machine with `prom_rates`; the query itself is recorded.

        Only what our collector sends is understood: `label_replace(..., "series", "<name>", "", "")`
        parts joined by `or`, over `app=~"<regex>"` (the apps of a batch, or a prefix).
        """
        if request.match_info["org"] != self.org_slug:
            return web.json_response({"status": "error", "errorType": "bad_data", "error": "unknown org"}, status=404)
        form = dict(request.query)
        if request.method == "POST":
            form.update({k: str(v) for k, v in (await request.post()).items()})
        try:
            query, start, end, step = form["query"], float(form["start"]), float(form["end"]), float(form["step"])
        except (KeyError, ValueError):
            return web.json_response({"status": "error", "errorType": "bad_data", "error": "bad parameters"},
                                     status=400)
        self.prom_queries.append(query)
        selector = re.search(r'app=~"([^"]*)"', query)
        names = re.findall(r'"series", "([a-z_]+)"', query)
        result = []
        with self.lock:
            self.before_request()
            apps = [(name, app) for name, app in self.apps.items()
                    if selector and re.fullmatch(selector.group(1), name)
                    and any(m["state"] == "started" for m in app.machines.values())]
        stamps = []
        t = start
        while t <= end:
            stamps.append(t)
            t += step
        for name, _app in apps:
            for series in names:
                rate = self.prom_rates.get(series, 0)
                result.append({"metric": {"app": name, "series": series},
                               "values": [[s, str(rate)] for s in stamps]})
        return web.json_response({"status": "success", "data": {"resultType": "matrix", "result": result}})
