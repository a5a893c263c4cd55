"""Fake provider APIs for tests: real HTTP servers on loopback that the real clients talk to.

`FakeHetzner` (hetzner_api.py) speaks enough of the Hetzner Cloud API for hcloud-python;
`FakeFly` (fly_api.py) speaks the Fly Machines API our httpx client uses. Both hold state and
support fault injection through the methods of `FakeApiServer` below.

Two ways to run one:

    fake = FakeHetzner()
    base_url = await fake.start()      # in the running event loop (async tests)
    ...
    await fake.aclose()

    base_url = fake.start_in_thread()  # own loop in a daemon thread (sync code, Temporal workers)
    ...
    fake.stop()

Fault injection (all thread-safe; `route` is "METHOD /path" relative to the API prefix, with
shell-style wildcards, e.g. "POST /servers", "POST /servers/*/actions/poweron", "* /apps/*"):

    fake.fail_next("POST /servers", status=429, times=2, headers={"Retry-After": "1"})
    fake.fail_next("POST /servers", status=504, commit=True)   # do the work, then answer 504
    fake.lose_response_next("POST /servers")                   # the same, named: "lost response"
    fake.hang_next("GET /servers/*", seconds=5)                # never answer (client timeout)
    fake.clear_faults()

Inspection: `fake.requests` (every request, oldest first; no auth headers are kept),
`fake.calls("POST /servers")`.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import json
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

__all__ = ["JSON_BODY", "FakeApiServer", "Fault", "RecordedRequest"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

JSON_BODY = web.RequestKey("json_body", object)
"""The parsed JSON body (or None), stored on the request by the middleware: `request[JSON_BODY]`."""


@dataclass
class RecordedRequest:
    method: str
    path: str
    """Path relative to the API prefix, e.g. "/servers/42"."""
    query: dict[str, list[str]]
    body: Any
    status: int | None = None

    @property
    def route(self) -> str:
        return f"{self.method} {self.path}"


@dataclass
class Fault:
    route: str
    kind: str  # "fail" | "hang"
    times: int
    status: int = 500
    code: str | None = None
    message: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    body: Any = None
    seconds: float = 10.0
    commit: bool = False

    def matches(self, method: str, path: str) -> bool:
        return fnmatch.fnmatchcase(f"{method} {path}", self.route)


class FakeApiServer:
    """aiohttp server base: recording, auth, fault injection, in-loop or in-thread lifecycle."""

    prefix = "/v1"

    def __init__(self, token: str = "test-token") -> None:
        self.token = token
        self.requests: list[RecordedRequest] = []
        self.lock = threading.RLock()
        self._faults: list[Fault] = []
        self._runner: web.AppRunner | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._closing: asyncio.Event | None = None
        self.port: int | None = None
        self.base_url: str | None = None

    # -- to be provided by subclasses ----------------------------------------------------------

    def add_routes(self, router: web.UrlDispatcher) -> None:
        raise NotImplementedError

    def error_response(
        self, status: int, code: str | None, message: str | None, headers: dict[str, str] | None = None
    ) -> web.Response:
        raise NotImplementedError

    def check_auth(self, request: web.Request) -> bool:
        return request.headers.get("Authorization") == f"Bearer {self.token}"

    def unauthorized(self) -> web.Response:
        return self.error_response(401, "unauthorized", "unable to authenticate")

    def before_request(self) -> None:
        """Advance time-based state (actions, boots); called under the lock on every request."""

    def decorate(self, response: web.StreamResponse) -> None:
        """Add headers every response carries (rate-limit headers on Hetzner)."""

    # -- fault injection -------------------------------------------------------------------------

    def fail_next(
        self,
        route: str,
        status: int = 500,
        *,
        times: int = 1,
        code: str | None = None,
        message: str | None = None,
        headers: dict[str, str] | None = None,
        body: Any = None,
        commit: bool = False,
    ) -> None:
        """Answer the next `times` matching requests with an error.

        `commit=True` performs the request first and then answers with the error, like a
        response lost on the way back (the client retries something that already happened).
        `body` replaces the JSON error body; pass a `str` to send a non-JSON body.
        """
        with self.lock:
            self._faults.append(
                Fault(route, "fail", times, status, code, message, dict(headers or {}), body, commit=commit)
            )

    def lose_response_next(self, route: str, *, times: int = 1) -> None:
        """Perform the next matching requests, then answer 504 as if the response got lost.

        The client sees a retryable gateway timeout for something that did happen; its retry must
        adopt the result (one server/machine, not two).
        """
        self.fail_next(route, 504, times=times, code="timeout", message="gateway timeout (response lost)", commit=True)

    def hang_next(self, route: str, *, times: int = 1, seconds: float = 10.0, commit: bool = False) -> None:
        """Hold the next matching requests for `seconds` (or until the fake stops) without answering."""
        with self.lock:
            self._faults.append(Fault(route, "hang", times, seconds=seconds, commit=commit))

    def clear_faults(self) -> None:
        with self.lock:
            self._faults.clear()

    def calls(self, route: str) -> list[RecordedRequest]:
        """Recorded requests matching `route` (same wildcard syntax as faults)."""
        with self.lock:
            return [r for r in self.requests if fnmatch.fnmatchcase(r.route, route)]

    def _take_fault(self, method: str, path: str) -> Fault | None:
        with self.lock:
            for fault in self._faults:
                if fault.times > 0 and fault.matches(method, path):
                    fault.times -= 1
                    if fault.times == 0:
                        self._faults.remove(fault)
                    return fault
        return None

    # -- request pipeline ------------------------------------------------------------------------

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        path = request.path
        if path.startswith(self.prefix):
            path = path[len(self.prefix) :] or "/"
        body: Any = None
        if request.can_read_body:
            raw = await request.read()
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                body = raw.decode(errors="replace")
        query: dict[str, list[str]] = {}
        for k, v in request.query.items():
            query.setdefault(k, []).append(v)
        record = RecordedRequest(request.method, path, query, body)
        with self.lock:
            self.requests.append(record)
        request[JSON_BODY] = body

        response = await self._respond(request, handler, path)
        record.status = response.status
        self.decorate(response)
        return response

    async def _respond(self, request: web.Request, handler: Handler, path: str) -> web.StreamResponse:
        if not self.check_auth(request):
            return self.unauthorized()
        fault = self._take_fault(request.method, path)
        if fault is not None and fault.commit:
            with self.lock:
                self.before_request()
            await self._call(request, handler)
        if fault is not None and fault.kind == "hang":
            await self._hang(fault.seconds)
            return self.error_response(504, "timeout", "fake hang ended")
        if fault is not None:
            if isinstance(fault.body, str):
                resp = web.Response(status=fault.status, text=fault.body, headers=fault.headers)
            elif fault.body is not None:
                resp = web.json_response(fault.body, status=fault.status, headers=fault.headers)
            else:
                resp = self.error_response(fault.status, fault.code, fault.message, fault.headers)
            return resp
        with self.lock:
            self.before_request()
        return await self._call(request, handler)

    async def _call(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status == 404:
                return self.error_response(404, "not_found", f"no route for {request.method} {request.path}")
            if exc.status == 405:
                return self.error_response(405, "method_not_allowed", "method not allowed")
            raise

    async def _hang(self, seconds: float) -> None:
        assert self._closing is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closing.wait(), timeout=seconds)

    # -- lifecycle ---------------------------------------------------------------------------------

    def build_app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware], client_max_size=4 * 1024 * 1024)
        self.add_routes(app.router)
        return app

    async def start(self) -> str:
        """Listen on 127.0.0.1:<random port> in the running loop; returns the API base URL."""
        self._loop = asyncio.get_running_loop()
        self._closing = asyncio.Event()
        self._runner = web.AppRunner(self.build_app(), access_log=None, shutdown_timeout=2.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        self.base_url = f"http://127.0.0.1:{self.port}{self.prefix}"
        return self.base_url

    async def aclose(self) -> None:
        if self._closing is not None:
            self._closing.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def start_in_thread(self) -> str:
        """Run the fake on its own event loop in a daemon thread; returns the API base URL."""
        ready = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self.start())
            except BaseException as exc:  # surfaced to the caller below
                errors.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        self._thread = threading.Thread(target=run, name=f"{type(self).__name__}-loop", daemon=True)
        self._thread.start()
        ready.wait(10)
        if errors:
            raise errors[0]
        assert self.base_url is not None
        return self.base_url

    def stop(self) -> None:
        """Stop a fake started with `start_in_thread`."""
        if self._thread is None or self._loop is None:
            return
        loop = self._loop
        asyncio.run_coroutine_threadsafe(self.aclose(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        self._thread.join(10)
        self._thread = None

    async def __aenter__(self) -> FakeApiServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __enter__(self) -> FakeApiServer:
        self.start_in_thread()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
