"""Pure pieces of the proxy: path normalisation, frame parsing and policy, egress classification,
limits, header hygiene, hello-ok sanitising, overage arithmetic; and that the relay identity the
proxy uses is exactly the one provisioning pairs."""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import uuid

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from db.models import Plan
from openclaw.methods import METHOD_SCOPES
from proxy.egress import EgressPolicy, EgressRefused, forbidden_reason, parse_host, system_resolver
from proxy.enforcement import GIB, UsageSnapshot, overage_verdict
from proxy.frames import FrameViolation, blocked, parse_client_frame
from proxy.gateway import rewrite_html
from proxy.headers import (
    RESOURCE_CSP,
    accepted_encodings,
    document_csp,
    forwarded_for,
    response_headers,
    upstream_request_headers,
    valid_host,
)
from proxy.limits import ConnectionLimiter, RateLimiter, retry_after_header
from proxy.methods import ALLOWED_METHODS, DENIED_METHODS, check_method
from proxy.paths import BadPath, RouteKind, control_ui_route, parse_gateway_path, rewrite_location
from proxy.preauth import token_hash
from proxy.ws_relay import sanitize_hello

AGENT = uuid.UUID("11111111-2222-4333-8444-555555555555")
P = f"/agents/{AGENT}/gateway"


# -- paths ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "upstream"), [
    (P + "/", "/openclaw/"),
    (P, "/openclaw/"),
    (P + "/assets/app.js", "/openclaw/assets/app.js"),
    (P + "//assets///app.js", "/openclaw/assets/app.js"),
    (P + "/a/./b/../c/", "/openclaw/a/c/"),
    (P + "/a/b/..", "/openclaw/a/"),
    (P + "/sp%20ace/%C3%A9?x=%2F&y=1", "/openclaw/sp%20ace/%C3%A9?x=%2F&y=1"),
    (P + "/control-ui-config.json", "/openclaw/control-ui-config.json"),
    (P + "/a%3Bb;c=d", "/openclaw/a;b;c=d"),
])
def test_paths_map_into_the_base_path(raw: str, upstream: str) -> None:
    assert parse_gateway_path(raw).upstream("/openclaw") == upstream


@pytest.mark.parametrize(("raw", "status"), [
    (P + "/tools/invoke", 403), (P + "/Tools/INVOKE/", 403), (P + "/openclaw/tools/invoke", 403),
    (P + "/x/../tools/invoke", 403), (P + "/%74ools/invoke", 403), (P + "/tools/invoke;a=b", 403),
    (P + "/tools%2Finvoke", 400), (P + "/tools%5cinvoke", 400), (P + "/tools\\invoke", 400),
    (P + "/..", 400), (P + "/%2e%2e/x", 400), (P + "/a/%2E%2E/%2e%2E/x", 400), (P + "/bad%zz", 400),
    (P + "/%ff", 400), (P + "/nul%00", 400), (P + "/tab%09", 400),
    ("/agents/not-a-uuid/gateway/", 404), ("/agents/" + str(AGENT) + "/gatewayx/", 404), ("/healthz", 404),
])
def test_bad_paths_are_refused(raw: str, status: int) -> None:
    with pytest.raises(BadPath) as err:
        parse_gateway_path(raw)
    assert err.value.status == status


def test_location_rewrite() -> None:
    kw = {"upstream_base": "/openclaw", "upstream_origin": "http://10.0.0.5:18789", "prefix": P,
          "request_path": "/openclaw/a/b"}
    assert rewrite_location("/openclaw/", **kw) == P + "/"
    assert rewrite_location("/openclaw?x=1", **kw) == P + "?x=1"
    assert rewrite_location("http://10.0.0.5:18789/openclaw/a", **kw) == P + "/a"
    assert rewrite_location("relative/x", **kw) == P + "/a/relative/x"
    assert rewrite_location("../c", **kw) == P + "/c"


@pytest.mark.parametrize("location", [
    "http://10.0.0.5:18789/other",  # would reveal the VM
    "https://github.com/login", "//127.0.0.1:5432/", "//127.0.0.1:8080/agents/x/gateway/", "http://localhost:8080/api",
    "HTTP://LOCALHOST:8080/", "/\\evil.example/", "\\\\evil.example", "/openclaw/../../api/x", "../../../../api",
    "/openclaw/%2e%2e/%2e%2e/x", "/openclaw/a%2fb", " //evil.example", "/openclaw/\nx", "javascript:alert(1)",
    "/api/v1/admin/rpc", "",
])
def test_hostile_locations_are_dropped(location: str) -> None:
    kw = {"upstream_base": "/openclaw", "upstream_origin": "http://10.0.0.5:18789", "prefix": P,
          "request_path": "/openclaw/a/b"}
    assert rewrite_location(location, **kw) is None


@pytest.mark.parametrize(("tail", "method", "accept", "kind"), [
    ((), "GET", "", RouteKind.DOCUMENT), (("chat",), "GET", "text/html", RouteKind.DOCUMENT),
    (("assets", "index-Ab1.js"), "GET", "*/*", RouteKind.RESOURCE),
    (("control-ui-config.json",), "GET", "", RouteKind.RESOURCE), (("sw.js",), "HEAD", "", RouteKind.RESOURCE),
    (("themes", "rose.css"), "GET", "", RouteKind.RESOURCE), (("avatar", "main"), "GET", "", RouteKind.RESOURCE),
    (("__openclaw__", "workspace-icon", "x"), "GET", "", RouteKind.RESOURCE),
    (("api", "chat", "media", "outgoing", "s", "f"), "GET", "", RouteKind.RESOURCE),
    (("approve", "abc"), "GET", "text/html", None), (("approve",), "GET", "text/html", None),
    (("share", "session", "x"), "GET", "text/html", None), (("plugins", "x"), "GET", "text/html", None),
    (("chat",), "GET", "application/json", None), ((), "POST", "", None), (("assets", "a.js"), "PUT", "", None),
    (("api", "v1", "admin", "rpc"), "GET", "", None), (("hooks", "wake"), "GET", "", None),
    (("control-ui-config.json\n",), "GET", "", None), (("Assets", "a.js"), "GET", "", None),
    (("__openclaw__", "cap", "x"), "GET", "", None), (("sessions", "k", "kill"), "GET", "", None),
])
def test_control_ui_routes_are_an_allow_list(tail: tuple[str, ...], method: str, accept: str,
                                             kind: RouteKind | None) -> None:
    assert control_ui_route(tail, method, accept) == kind


def test_html_rewrite_touches_attributes_only() -> None:
    html = ('<html data-openclaw-control-ui-base-path="/openclaw" lang="en"><link href="/openclaw/favicon.svg">'
            '<script type="module" src="/openclaw/assets/a.js"></script><script>x="/openclaw/"</script>'
            '<a href="/openclawish/">')
    out = rewrite_html(html, "/openclaw", P)
    assert f'data-openclaw-control-ui-base-path="{P}"' in out
    assert f'href="{P}/favicon.svg"' in out and f'src="{P}/assets/a.js"' in out
    assert 'x="/openclaw/"' in out and 'href="/openclawish/"' in out
    assert rewrite_html(html, P, P) == html


# -- frames -----------------------------------------------------------------------------------------


def _refused(method: str, params: object = None) -> bool:
    """Refused with FORBIDDEN, or (an empty name) a protocol violation that closes the socket."""
    try:
        req = parse_client_frame(json.dumps({"type": "req", "id": "1", "method": method, "params": params}))
    except FrameViolation:
        return True
    return blocked(req) is not None


@pytest.mark.parametrize("method", [
    "config.get", "config.patch", "CONFIG.SET", "exec.approvals.get", "exec.approval.resolve", "approval.resolve",
    "update.run", "update.status", "device.scopes.requestUpgrade", "device.pair.approve", "device.token.rotate",
    "terminal.input", "plugins.install", "secrets.store.set", "tools.invoke", "node.pair.approve",
    "gateway.restart.request", "wizard.next", "web.login.start", "skills.upload.begin", "connect", "",
    "con fig", "config\u2024patch", "x" * 200, "logs.tail", "exec.approval.request", "sessions.compact",
    "node.event", "no.such.method", "Health", "health\n", "tools.invoke\n", "connect\n",
    "exec.approval.resolve\n", "chat.send\r\n", " health", "health\x00",
])
def test_blocked_methods(method: str) -> None:
    assert _refused(method)


@pytest.mark.parametrize("method", [
    "health", "chat.send", "chat.history", "chat.abort", "sessions.list", "sessions.subscribe", "agents.list",
    "models.list", "question.list", "exec.approval.list", "approval.get", "tasks.list", "cron.list",
    "agents.files.get", "plugins.list", "status", "last-heartbeat", "system-presence", "models.authStatus",
    "talk.catalog", "tts.status", "chat.startup", "board.get", "sessions.patch",
])
def test_allowed_methods(method: str) -> None:
    assert not _refused(method)


def test_allow_list_is_derived_from_the_scope_table() -> None:
    relay_ok = {"operator.read", "operator.write", "operator.approvals", "operator.questions", "operator.talk"}
    assert ALLOWED_METHODS == {m for m, s in METHOD_SCOPES.items() if s in relay_ok} - DENIED_METHODS
    assert not {m for m in ALLOWED_METHODS if METHOD_SCOPES[m] in ("operator.admin", "operator.pairing", "node")}
    refusal = check_method("sessions.compact")
    assert refusal is not None and refusal.rule == "scope" and refusal.required_scope == "operator.admin"
    assert check_method("no.such.method") == check_method("tools.invoke\n")


@pytest.mark.parametrize(("method", "params", "refused"), [
    ("sessions.patch", {"key": "k", "permissionMode": "full"}, True),
    ("sessions.patch", {"key": "k", "sandboxMode": "off"}, True),
    ("sessions.patch", {"key": "k", "permissionMode": "default", "label": "x"}, False),
    ("sessions.patchMany", {"keys": ["k"], "patch": {"permissionMode": "full"}}, True),
    ("sessions.patchMany", {"keys": ["k"], "patch": {"pinned": True}}, False),
    ("sessions.create", {"toolOverrides": {}}, True), ("sessions.create", {"incognito": True}, True),
    ("sessions.create", {"label": "x"}, False),
])
def test_admin_only_session_params_are_refused(method: str, params: dict[str, object], refused: bool) -> None:
    assert _refused(method, params) is refused


def test_names_are_matched_in_full() -> None:
    """`$` matches before a trailing newline; every check must match the whole name."""
    assert valid_host("example.com") and not valid_host("example.com\n") and not valid_host("h:80\n")
    with pytest.raises(EgressRefused):
        parse_host("localhost\n")  # egress strips whitespace first: the name checked is the name used


def test_frame_parsing_is_strict() -> None:
    assert parse_client_frame('{"type":"req","id":"1","method":"\\u0063onfig.patch"}').method == "config.patch"
    for bad in ('{"type":"req","id":"1","method":"a","method":"b"}', '{"type":"req","id":"1","method":"a"} x',
                b'\xff', "[]", '{"type":"req","id":"","method":"a"}', '{"type":"req","id":"1","method":1}',
                '{"type":"req","id":"1","method":"a","params":Infinity}', "[" * 100_000):
        with pytest.raises(FrameViolation):
            parse_client_frame(bad)


def test_hello_ok_is_sanitised() -> None:
    frame = {"type": "res", "id": "relay-1", "ok": True, "payload": {
        "auth": {"method": "device-token", "scopes": ["operator.read"], "deviceToken": "s", "deviceTokens": ["s"],
                 "issuedAtMs": 1, "recoveryMigrationAllowed": True, "someOtherToken": "s"},
        "features": {"methods": ["health", "device.scopes.requestUpgrade", "Device.Scopes.waitUpgrade"]},
        "policy": {"maxPayload": 26_214_400}}}
    out = sanitize_hello(frame, "c9", 1000)
    assert out["id"] == "c9"
    assert out["payload"]["auth"] == {"method": "device-token", "scopes": ["operator.read"]}
    assert out["payload"]["features"]["methods"] == ["health"]
    assert out["payload"]["policy"]["maxPayload"] == 1000


# -- egress -----------------------------------------------------------------------------------------


async def test_localhost_resolves_to_loopback_and_is_refused() -> None:
    answers = await system_resolver("localhost")  # /etc/hosts; no network traffic
    assert answers
    policy = EgressPolicy()
    for answer in answers:
        with pytest.raises(EgressRefused):
            policy.check_address(ipaddress.ip_address(answer), 80)
    with pytest.raises(EgressRefused):
        await policy.check("localhost", 80)


async def test_allowed_targets_are_exact() -> None:
    async def resolver(host: str) -> list[str]:
        return ["127.0.0.1"]

    policy = EgressPolicy(resolver, allowed_targets=[("127.0.0.1", 8080)])
    assert (await policy.check("svc.example.test", 8080)).ip == ipaddress.ip_address("127.0.0.1")
    with pytest.raises(EgressRefused):
        await policy.check("svc.example.test", 8081)


@pytest.mark.parametrize("address", ["8.8.8.8", "93.184.215.14", "2606:4700:4700::1111"])
def test_public_addresses_pass(address: str) -> None:
    assert forbidden_reason(ipaddress.ip_address(address)) is None


def test_host_spellings() -> None:
    assert parse_host("[::1]") == ipaddress.ip_address("::1")
    assert parse_host("2130706433") == ipaddress.ip_address("127.0.0.1")
    assert parse_host("Example.COM.") == "example.com"
    for bad in ("[fe80::1%eth0]", "a..b", "-x.example", "1.2.3.4.5", "0x1g.1"):
        with pytest.raises(EgressRefused):
            parse_host(bad)


# -- limits -----------------------------------------------------------------------------------------


def test_token_bucket() -> None:
    now = [0.0]
    limiter = RateLimiter(rate=2.0, burst=3, clock=lambda: now[0])
    assert [limiter.acquire("u") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.acquire("u") == pytest.approx(0.5)
    assert limiter.acquire("other") == 0.0
    now[0] = 0.5
    assert limiter.acquire("u") == 0.0
    assert retry_after_header(0.2) == "1" and retry_after_header(2.1) == "3"


def test_connection_limiter() -> None:
    limiter = ConnectionLimiter(2)
    assert limiter.try_acquire("u") and limiter.try_acquire("u") and not limiter.try_acquire("u")
    limiter.release("u")
    assert limiter.try_acquire("u")


# -- headers ----------------------------------------------------------------------------------------


def test_forwarded_headers_are_overwritten_with_the_real_client() -> None:
    incoming = CIMultiDictProxy(CIMultiDict({
        "X-Forwarded-For": "6.6.6.6", "Cookie": "a=b", "Authorization": "Bearer x", "Accept": "text/html",
        "Accept-Encoding": "gzip, br", "X-OpenClaw-Scopes": "operator.admin", "Content-Type": "application/json"}))
    out = upstream_request_headers(incoming, client_ip="203.0.113.9", scheme="https", host="app.example.com",
                                   bearer="relay-tok", identity_only=True)
    assert out.getall("X-Forwarded-For") == ["203.0.113.9"]
    assert out["X-Forwarded-Proto"] == "https" and out["X-Forwarded-Host"] == "app.example.com"
    assert out["Authorization"] == "Bearer relay-tok" and "Cookie" not in out and "X-OpenClaw-Scopes" not in out
    assert out["Accept-Encoding"] == "identity" and out["Host"] == "app.example.com"
    local = upstream_request_headers(incoming, client_ip="127.0.0.1", scheme="http", host="127.0.0.1:8080",
                                     bearer=None)
    assert not [h for h in local if h.lower().startswith("x-forwarded")] and "Authorization" not in local
    assert local["Accept-Encoding"] == "br, gzip"
    bare = upstream_request_headers(CIMultiDictProxy(CIMultiDict()), client_ip=None, scheme="http", host="h",
                                    bearer=None)
    assert bare["Accept-Encoding"] == "identity"  # not aiohttp's default gzip on the client's behalf
    assert forwarded_for("::ffff:127.0.0.1") is None and forwarded_for("2001:db8::1") == "2001:db8::1"


def test_accepted_encodings() -> None:
    assert accepted_encodings(None) == {"identity"}
    assert accepted_encodings("gzip;q=1.0, br;q=0, x-evil") == {"gzip", "identity"}
    assert accepted_encodings("*;q=0") == set()
    assert "zstd" in accepted_encodings("*")


def test_response_headers_are_allow_listed_with_one_csp() -> None:
    upstream = CIMultiDictProxy(CIMultiDict([
        ("Content-Type", "text/html"), ("Set-Cookie", "a=b"), ("Service-Worker-Allowed", "/"),
        ("Clear-Site-Data", '"*"'), ("Access-Control-Allow-Origin", "*"), ("Content-Security-Policy", "x"),
        ("X-Frame-Options", "SAMEORIGIN"), ("Location", "//127.0.0.1:5432/")]))
    out = response_headers(upstream, csp=RESOURCE_CSP)
    assert set(out) == {"Content-Type", "Content-Security-Policy", "X-Frame-Options", "X-Content-Type-Options",
                        "Referrer-Policy", "Cross-Origin-Resource-Policy"}
    assert out["X-Frame-Options"] == "DENY" and out.getall("Content-Security-Policy") == [RESOURCE_CSP]
    assert "sandbox" in RESOURCE_CSP and "script-src" not in RESOURCE_CSP and "default-src 'none'" in RESOURCE_CSP


def test_document_csp_hashes_the_inline_scripts_we_serve() -> None:
    html = '<script>boot()</script><script type="module" src="/a.js"></script><SCRIPT>x=1</SCRIPT>'
    csp = document_csp(html)
    script_src = next(d for d in csp.split("; ") if d.startswith("script-src"))
    hashes = [t for t in script_src.split()[1:] if t.startswith("'sha256-")]
    expected = {"'sha256-" + base64.b64encode(hashlib.sha256(c.encode()).digest()).decode() + "'"
                for c in ("boot()", "x=1")}
    assert set(hashes) == expected and "'unsafe-inline'" not in script_src
    assert "frame-ancestors 'none'" in csp and "object-src 'none'" in csp


# -- overage ----------------------------------------------------------------------------------------


def _plan(rate: int) -> Plan:
    return Plan(name="p", display_name="P", max_agents=1, max_vpses=1, max_bandwidth_bytes=10 * GIB,
                max_storage_bytes=10 * GIB, max_cpu_ms=10, max_memory_mb_seconds=10,
                overage_bandwidth_cost_per_gb_cents=rate, overage_storage_cost_per_gb_cents=rate,
                overage_cpu_cost_per_hour_cents=rate, overage_memory_cost_per_gb_hour_cents=rate)


def _usage(plan: Plan, bandwidth: int, budget: int) -> UsageSnapshot:
    return UsageSnapshot(plan=plan, budget_cents=budget, vps_ids=frozenset(), bandwidth_bytes=bandwidth, cpu_ms=0,
                         memory_mb_seconds=0, storage_bytes=0)


def test_overage_verdicts() -> None:
    assert overage_verdict(_usage(_plan(2), 10 * GIB, 0)).allowed
    assert not overage_verdict(_usage(_plan(2), 11 * GIB, 0)).allowed  # 2 cents over, budget 0
    assert overage_verdict(_usage(_plan(2), 11 * GIB, 2)).allowed  # exactly the budget
    assert not overage_verdict(_usage(_plan(2), 11 * GIB, 2), extra_bandwidth=GIB).allowed
    no_overage = overage_verdict(_usage(_plan(0), 10 * GIB + 1, 10_000))
    assert not no_overage.allowed and "no overage" in (no_overage.reason or "")


# -- one relay identity ------------------------------------------------------------------------------


def test_relay_identity_matches_provisioning(settings: object) -> None:
    from activities import gateway as provisioning
    from db.models import Agent
    from openclaw.agent_env import render_input
    from openclaw.relay import RELAY_CLIENT, RELAY_SCOPES, relay_origin

    assert provisioning.RELAY_CLIENT == RELAY_CLIENT
    assert tuple(provisioning.RELAY_SCOPES) == RELAY_SCOPES
    assert "operator.admin" not in RELAY_SCOPES
    agent = Agent(id=uuid.uuid4(), user_id=uuid.uuid4(), name="m", gateway_token="t" * 40, gateway_token_last4="t")
    assert render_input(settings, agent, local=True).allowed_origins == [relay_origin(settings)]  # type: ignore[arg-type]


def test_token_hash_memo_is_the_plain_digest() -> None:
    """The memoised token hash is SHA-256 of the token, again and again; long tokens are not kept."""
    import hashlib

    from proxy import preauth

    preauth._token_hash.cache_clear()
    for token in ("abc", "abc", "x" * 255, "y" * 5000, "y" * 5000):
        assert token_hash(token) == hashlib.sha256(token.encode()).digest()
    assert preauth._token_hash.cache_info().currsize == 2  # "abc" and the 255 x's; never the 5000 y's


@pytest.mark.parametrize("header", [
    "", "a=b", "a=b; authjs.session-token=tok", 'a="quoted; value"', "a=1; a=2", "a=b;;c=d", "=novalue; x=y",
    "a=b; Path=/; Secure", "__Secure-authjs.session-token=abc; authjs.session-token=def", "a=%41%42",
    "bad name=v; good=v", "a=b, c=d", "a", "a=\u00e9",
])
def test_the_fast_front_reads_a_cookie_header_as_aiohttp_does(header: str) -> None:
    """The front parses cookies with aiohttp's own private parser (`aiohttp._cookie_helpers`): an
    aiohttp upgrade that changes or moves it shows up here, not as a session read differently."""
    from aiohttp.test_utils import make_mocked_request

    from proxy import http_fast

    assert dict(http_fast._cookies(header)) == dict(make_mocked_request("GET", "/", headers={"Cookie": header}).cookies)
