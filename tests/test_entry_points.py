"""The deployment files and the command line name things that exist, and bad config stops the process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cli.main import COMMANDS, build_parser

ROOT = Path(__file__).resolve().parent.parent


def test_every_compose_service_runs_a_real_entry_point() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["slopbox"]' in dockerfile
    ours = {name: svc for name, svc in compose["services"].items() if svc.get("image") == "slopbox:latest"}
    assert set(ours) == {"migrate", "api", "worker", "proxy", "web"}
    parser = build_parser()
    for name, svc in ours.items():
        args = parser.parse_args(svc["command"])
        assert args.command in COMMANDS, name
    for required in ("postgres", "temporal", "temporal-ui"):
        assert required in compose["services"]
    # Every top-level package the code imports is copied into the image.
    for pkg in ("api", "proxy", "workflows", "activities", "db", "cli", "orchestration", "providers", "openclaw",
                "web"):
        assert f"COPY {pkg} ./{pkg}" in dockerfile, pkg


def _published_host_ips(ports: list[object]) -> list[str]:
    """Host address of each published port (compose short or long syntax); "" = every interface."""
    out = []
    for entry in ports:
        if isinstance(entry, dict):
            if entry.get("published") is not None:
                out.append(str(entry.get("host_ip", "")))
            continue
        spec = str(entry).split("/", 1)[0]
        if spec.startswith("["):
            out.append(spec[1:spec.index("]")])
        else:
            parts = spec.split(":")
            out.append(parts[0] if len(parts) == 3 else "")  # ip:host:container
    return out


def test_only_the_api_the_proxy_and_the_web_app_are_published_beyond_loopback() -> None:
    """Temporal's frontend (7233) and Web UI (8233) have no authentication (issue 9 item 14); the web
    app is the site people sign in to."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    for name, svc in compose["services"].items():
        if name in ("api", "proxy", "web"):
            continue
        for host_ip in _published_host_ips(svc.get("ports", [])):
            assert host_ip in ("127.0.0.1", "::1"), f"{name} publishes a port on {host_ip or 'every interface'}"
    assert _published_host_ips(compose["services"]["temporal"]["ports"]) == ["127.0.0.1"]
    assert _published_host_ips(compose["services"]["temporal-ui"]["ports"]) == ["127.0.0.1"]
    assert "temporal:7233" in {s.get("environment", {}).get("TEMPORAL_ADDRESS") for s in compose["services"].values()}


def test_console_script_points_at_main() -> None:
    text = (ROOT / "pyproject.toml").read_text()
    assert 'slopbox = "cli.main:main"' in text


def _run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.isupper() or k in ("PATH", "HOME", "LANG")}
    return subprocess.run([sys.executable, "-m", "cli.main", *args], env={**clean, **env}, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def test_malformed_setting_stops_with_one_line_naming_it(tmp_path: Path) -> None:
    for var, value in [("API_PORT", "eighty"), ("DATABASE_URL", "mysql://x"), ("SLOPBOX_ENCRYPTION_KEYS", "short"),
                       ("TEMPORAL_ADDRESS", "nohostport"), ("CONTROL_PLANE_API_KEY", "tiny")]:
        result = _run(["api"], {var: value, "SLOPBOX_DATA_DIR": str(tmp_path)})
        assert result.returncode == 2, (var, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and var in lines[0], (var, result.stderr)


def test_production_mode_requires_the_api_key(tmp_path: Path) -> None:
    result = _run(["api"], {"DATABASE_URL": "postgresql://u@127.0.0.1:1/x", "SLOPBOX_DATA_DIR": str(tmp_path)})
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "configuration error: CONTROL_PLANE_API_KEY is required when DATABASE_URL is set"]


def test_user_create_prints_the_id_last(database_url: str, tmp_path: Path) -> None:
    env = {"DATABASE_URL": database_url, "SLOPBOX_DATA_DIR": str(tmp_path)}
    result = _run(["user", "create", "--email", "Op@Example.com", "--plan", "pro", "--admin"], env)
    assert result.returncode == 0, result.stderr
    user_id = result.stdout.strip().splitlines()[-1]
    import psycopg

    with psycopg.connect(database_url, autocommit=True) as conn:
        row = conn.execute("SELECT u.email, u.is_admin, p.name FROM users u JOIN plans p ON p.id = u.plan_id "
                           "WHERE u.id = %s", (user_id,)).fetchone()
        assert row == ("op@example.com", True, "pro")
        again = _run(["user", "create", "--email", "op@example.com"], env)
        assert again.returncode == 1 and "already exists" in again.stderr
        bad_plan = _run(["user", "create", "--email", "x@example.com", "--plan", "platinum"], env)
        assert bad_plan.returncode == 1 and "no plan named 'platinum'" in bad_plan.stderr
        conn.execute("DELETE FROM users WHERE email = 'op@example.com'")


def test_secrets_rotate_moves_every_secret_to_the_new_key(database_url: str, tmp_path: Path) -> None:
    import psycopg
    from cryptography.fernet import Fernet

    from db.encryption import Keyring

    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    with psycopg.connect(database_url, autocommit=True) as conn:
        user = conn.execute("INSERT INTO users (email) VALUES ('rot@example.com') RETURNING id").fetchone()[0]  # type: ignore[index]
        conn.execute("INSERT INTO agents (user_id, name, gateway_token, gateway_token_last4) VALUES (%s, 'r', %s, "
                     "'abcd')", (user, Keyring([old]).encrypt("t" * 64)))
        try:
            env = {"DATABASE_URL": database_url, "SLOPBOX_DATA_DIR": str(tmp_path), "CONTROL_PLANE_API_KEY": "k" * 40,
                   "SLOPBOX_ENCRYPTION_KEYS": f"{new},{old}"}
            result = _run(["secrets", "rotate"], env)
            assert result.returncode == 0, result.stderr
            assert "re-encrypted 1 secret" in result.stdout
            stored = conn.execute("SELECT gateway_token FROM agents WHERE user_id = %s", (user,)).fetchone()[0]  # type: ignore[index]
            assert Keyring([new]).decrypt(stored) == "t" * 64  # readable without the old key
        finally:
            conn.execute("DELETE FROM users WHERE id = %s", (user,))


# -- `slopbox dev` picks the real gateway by default --------------------------------------------------


def test_the_real_gateway_is_the_default_and_simulator_is_opt_in(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from cli.dev import pick_gateway
    from settings import Settings

    assert Settings(SLOPBOX_DATA_DIR=str(tmp_path)).gateway == "openclaw"  # type: ignore[call-arg]
    chosen = Settings(SLOPBOX_DATA_DIR=str(tmp_path), SLOPBOX_GATEWAY="simulator",  # type: ignore[call-arg]
                      openclaw_bin="/opt/openclaw")
    assert pick_gateway(chosen, tmp_path / "logs") is None
    given = Settings(SLOPBOX_DATA_DIR=str(tmp_path), openclaw_bin="/opt/openclaw")  # type: ignore[call-arg]
    assert pick_gateway(given, tmp_path / "logs") == "/opt/openclaw"
    out = capsys.readouterr().out.splitlines()
    assert out == ["gateway: the simulator (SLOPBOX_GATEWAY=simulator)",
                   "gateway: OpenClaw (/opt/openclaw, from OPENCLAW_BIN)"]
    assert not (tmp_path / "logs").exists()  # nothing was installed


def test_no_registry_reachable_falls_back_to_the_simulator_with_one_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """The real installer, pointed at registries that refuse connections (port 9 on loopback)."""
    from cli.dev import pick_gateway
    from settings import Settings

    tools = tmp_path / "tools"
    monkeypatch.setenv("OPENCLAW_TOOLS_DIR", str(tools))
    monkeypatch.setenv("NODE_SOURCE", "npm")
    for var, value in {"npm_config_registry": "http://127.0.0.1:9/", "npm_config_fetch_retries": "0",
                       "npm_config_cache": str(tmp_path / "npm-cache"), "npm_config_offline": "false",
                       "PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_CONFIG_FILE": os.devnull,
                       "PIP_RETRIES": "0"}.items():
        monkeypatch.setenv(var, value)
    settings = Settings(SLOPBOX_DATA_DIR=str(tmp_path), openclaw_bin=None)  # type: ignore[call-arg]
    assert pick_gateway(settings, tmp_path / "logs") is None
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0].startswith("installing Node 24 and OpenClaw into ")
    assert len(out) == 2 and out[1].startswith("warning: could not install OpenClaw") and "simulator" in out[1], out
    assert (tmp_path / "logs" / "install-openclaw.log").stat().st_size > 0
    assert not (tools / "bin" / "openclaw").exists()


# -- `slopbox session create`: a one-click browser sign-in for the local proxy ---------------------------


def _add_agent(database_url: str, email: str) -> tuple[str, str]:
    import psycopg

    with psycopg.connect(database_url, autocommit=True) as conn:
        user = conn.execute("INSERT INTO users (email, name) VALUES (%s, 'x') RETURNING id", (email,)).fetchone()
        agent = conn.execute("INSERT INTO agents (user_id, name, gateway_token, gateway_token_last4) "
                             "VALUES (%s, 'molty', 'x', 'xxxx') RETURNING id", (user[0],)).fetchone()  # type: ignore[index]
    return str(user[0]), str(agent[0])  # type: ignore[index]


def _get(link: str, host: str | None = None) -> tuple[int, dict[str, str]]:
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(link)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        conn.request("GET", parts.path, headers={"Host": host or parts.netloc})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}
    finally:
        conn.close()


def test_session_create_prints_a_single_use_loopback_link_that_signs_in(database_url: str, tmp_path: Path) -> None:
    import psycopg

    email = f"s-{os.urandom(4).hex()}@example.com"
    user_id, agent_id = _add_agent(database_url, email)
    env = {"DATABASE_URL": database_url, "SLOPBOX_DATA_DIR": str(tmp_path), "PROXY_PORT": "18080"}
    clean = {k: v for k, v in os.environ.items() if not k.isupper() or k in ("PATH", "HOME", "LANG")}
    proc = subprocess.Popen([sys.executable, "-m", "cli.main", "session", "create", "--user", email.upper()],
                            env={**clean, **env}, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(3)]
        link = lines[1].strip()
        assert link.startswith("http://127.0.0.1:") and "/login/" in link, lines
        assert lines[2].strip() == f"It opens http://127.0.0.1:18080/agents/{agent_id}/gateway/"
        with psycopg.connect(database_url, autocommit=True) as conn:
            def sessions() -> list[tuple[str, object]]:
                return conn.execute('SELECT "sessionToken", expires FROM sessions WHERE "userId" = %s',
                                    (user_id,)).fetchall()

            assert _get(link.rsplit("/", 1)[0] + "/guess")[0] == 404
            assert _get(link, host="evil.example:80")[0] == 421  # DNS rebinding
            assert sessions() == []  # nothing exists until the link is opened
            status, headers = _get(link)
            assert status == 302
            assert headers["location"] == f"http://127.0.0.1:18080/agents/{agent_id}/gateway/"
            cookie = headers["set-cookie"]
            assert cookie.startswith("authjs.session-token=") and "HttpOnly" in cookie and "SameSite=Lax" in cookie
            token = cookie.split(";")[0].split("=", 1)[1]
            assert [t for t, _ in sessions()] == [token]
            assert proc.wait(timeout=10) == 0
            assert "signed in" in proc.stdout.read()
            with pytest.raises(OSError):
                _get(link)  # single use: the server is gone
            conn.execute("DELETE FROM users WHERE id = %s", (user_id,))
    finally:
        proc.kill()
        proc.wait()


def test_session_create_is_for_a_loopback_proxy_only_and_expires_unused(database_url: str, tmp_path: Path) -> None:
    import psycopg

    email = f"s-{os.urandom(4).hex()}@example.com"
    user_id, _ = _add_agent(database_url, email)
    env = {"DATABASE_URL": database_url, "SLOPBOX_DATA_DIR": str(tmp_path)}
    remote = _run(["session", "create", "--user", email], {**env, "PROXY_HOST": "10.1.2.3"})
    assert remote.returncode == 1 and "not a loopback address" in remote.stderr
    unused = _run(["session", "create", "--user", user_id, "--valid-for", "0.5"], env)
    assert unused.returncode == 1 and "expired unused" in unused.stderr
    nobody = _run(["session", "create", "--user", "nobody@example.com"], env)
    assert nobody.returncode == 1 and "no user" in nobody.stderr
    with psycopg.connect(database_url, autocommit=True) as conn:
        assert conn.execute('SELECT count(*) FROM sessions WHERE "userId" = %s', (user_id,)).fetchone() == (0,)
        conn.execute("DELETE FROM users WHERE id = %s", (user_id,))
