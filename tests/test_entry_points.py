"""The deployment files and the command line name things that exist, and bad config stops the process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from cli.main import COMMANDS, build_parser

ROOT = Path(__file__).resolve().parent.parent


def test_every_compose_service_runs_a_real_entry_point() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["slopbox"]' in dockerfile
    ours = {name: svc for name, svc in compose["services"].items() if svc.get("image") == "slopbox:latest"}
    assert set(ours) == {"migrate", "api", "worker", "proxy"}
    parser = build_parser()
    for name, svc in ours.items():
        args = parser.parse_args(svc["command"])
        assert args.command in COMMANDS, name
    for required in ("postgres", "temporal", "temporal-ui"):
        assert required in compose["services"]
    # Every top-level package the code imports is copied into the image.
    for pkg in ("api", "proxy", "workflows", "activities", "db", "cli", "orchestration", "providers", "openclaw"):
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


def test_only_the_api_and_the_proxy_are_published_beyond_loopback() -> None:
    """Temporal's frontend (7233) and Web UI (8233) have no authentication (issue 9 item 14)."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    for name, svc in compose["services"].items():
        if name in ("api", "proxy"):
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
