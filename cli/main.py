"""`slopbox`: dev | api | web | worker | proxy | mail-sink | migrate | user create/admin/exempt | session create |
secrets rotate."""

from __future__ import annotations

import argparse
import asyncio
import sys

from settings import MissingSetting, Settings, load_settings_or_exit
from telemetry.logs import configure_logging
from telemetry.tracing import configure_tracing


def _cmd_api(settings: Settings, _args: argparse.Namespace) -> int:
    import uvicorn

    from api.app import create_app

    configure_logging("api", settings.log_level)
    configure_tracing("slopbox-api", settings)
    app = create_app(settings)
    uvicorn.run(app, host=settings.api_host, port=settings.api_port, log_config=None,
                access_log=False, proxy_headers=False)
    return 0


def _cmd_web(settings: Settings, _args: argparse.Namespace) -> int:
    import uvicorn

    from telemetry.tracing import instrument_fastapi
    from web.app import create_app

    configure_logging("web", settings.log_level)
    configure_tracing("slopbox-web", settings)
    app = create_app(settings)
    instrument_fastapi(app)
    uvicorn.run(app, host=settings.web_host, port=settings.web_port, log_config=None,
                access_log=False, proxy_headers=False)
    return 0


def _cmd_worker(settings: Settings, _args: argparse.Namespace) -> int:
    import worker

    configure_logging("worker", settings.log_level)
    configure_tracing("slopbox-worker", settings)
    asyncio.run(worker.run(settings))
    return 0


def _cmd_proxy(settings: Settings, _args: argparse.Namespace) -> int:
    from proxy.app import run

    configure_logging("proxy", settings.log_level)
    configure_tracing("slopbox-proxy", settings)
    run(settings)
    return 0


def _cmd_mail_sink(settings: Settings, _args: argparse.Namespace) -> int:
    from notifications.sink import run

    configure_logging("mail", settings.log_level)
    asyncio.run(run("127.0.0.1", settings.mail_sink_port))
    return 0


def _cmd_migrate(settings: Settings, _args: argparse.Namespace) -> int:
    from cli.embedded import database_available
    from db.migrate import migrate_and_seed

    with database_available(settings) as url:
        migrate_and_seed(url, local_provider=settings.local_provider_enabled)
    print("database migrated to head and seeded")
    return 0


def _cmd_user(settings: Settings, args: argparse.Namespace) -> int:
    """`user create | admin | exempt`: one database change each; the user's id is the last line printed."""
    from cli.embedded import database_available
    from cli.users import UserError, create_user, set_admin, set_usage_exempt

    try:
        with database_available(settings) as url:
            if args.user_command == "create":
                user_id = create_user(url, email=args.email, plan=args.plan, admin=args.admin, name=args.name)
                said = f"created user {args.email}"
            elif args.user_command == "admin":
                user_id = set_admin(url, email=args.email, admin=not args.revoke)
                said = f"{'revoked admin from' if args.revoke else 'made admin:'} {args.email}"
            else:
                user_id = set_usage_exempt(url, email=args.email, exempt=not args.off)
                said = (f"{args.email} is no longer exempt: usage limits apply again" if args.off else
                        f"{args.email} is exempt from usage limits: never stopped or cut off for usage")
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(said)
    print(user_id)
    return 0



def _cmd_session_create(settings: Settings, args: argparse.Namespace) -> int:
    from cli.embedded import database_available
    from cli.session import SessionError, resolve_target, serve_login_link

    try:
        with database_available(settings) as url:
            target = resolve_target(url, settings, args.user, args.agent)
            expires = serve_login_link(settings, url, target, valid_for_s=args.valid_for)
    except SessionError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if expires is None:
        print("the link expired unused; no session was created", file=sys.stderr)
        return 1
    print(f"signed in: a browser session for {target.email} until {expires:%Y-%m-%d %H:%M} UTC")
    return 0


def _cmd_secrets_rotate(settings: Settings, _args: argparse.Namespace) -> int:
    from sqlalchemy import create_engine

    from cli.embedded import database_available
    from db.encryption import Keyring
    from db.rotation import rotate_all

    with database_available(settings) as url:
        engine = create_engine(url)
        try:
            with engine.begin() as conn:
                count = rotate_all(conn, Keyring(settings.secret_keys()))
        finally:
            engine.dispose()
    print(f"re-encrypted {count} secret(s) under the newest key; older keys can now be removed")
    return 0


def _cmd_dev(settings: Settings, _args: argparse.Namespace) -> int:
    from cli.dev import run_dev

    return run_dev(settings)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slopbox", description="Slopbox control plane")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("dev", help="run the whole stack on this machine (embedded Postgres and Temporal)")
    sub.add_parser("api", help="run the HTTP API")
    sub.add_parser("web", help="run the web app (WEB_HOST:WEB_PORT, default 127.0.0.1:3000)")
    sub.add_parser("worker", help="run a Temporal worker (workflows + activities)")
    sub.add_parser("proxy", help="run the gateway proxy and the agents' forward proxy")
    sub.add_parser("mail-sink", help="a local SMTP sink that logs every message (run by `slopbox dev`)")
    sub.add_parser("migrate", help="upgrade the database to head and seed plans and VPS configs")
    user = sub.add_parser("user", help="manage users").add_subparsers(dest="user_command", required=True)
    create = user.add_parser("create", help="create a user; prints its id on the last line")
    create.add_argument("--email", required=True)
    create.add_argument("--name")
    create.add_argument("--plan", help="plan name (default: the default plan)")
    create.add_argument("--admin", action="store_true", help="the user may call the admin API (/admin/...)")
    grant = user.add_parser("admin", help="grant an existing user the admin flag (the admin API); --revoke takes it")
    grant.add_argument("--email", required=True)
    grant.add_argument("--revoke", action="store_true")
    exempt = user.add_parser("exempt", help="exempt a user from usage enforcement (never stopped or cut off); "
                                            "prints its id on the last line")
    exempt.add_argument("--email", required=True)
    exempt.add_argument("--off", action="store_true", help="end the exemption")
    session = sub.add_parser("session", help="browser sessions (dev)").add_subparsers(dest="session_command",
                                                                                  required=True)
    login = session.add_parser("create", help="print a single-use link that signs a browser in on this machine "
                                              "and opens the agent's Control UI (loopback proxy only)")
    login.add_argument("--user", required=True, help="email or user id")
    login.add_argument("--agent", help="agent id (default: the user's newest agent)")
    login.add_argument("--valid-for", type=float, default=600.0, metavar="SECONDS",
                       help="how long the link can be opened (default 600)")
    secrets_cmd = sub.add_parser("secrets", help="secrets at rest").add_subparsers(dest="secrets_command",
                                                                                  required=True)
    secrets_cmd.add_parser("rotate", help="re-encrypt every stored secret under the first SLOPBOX_ENCRYPTION_KEYS key")
    return parser


COMMANDS = {
    "dev": _cmd_dev, "api": _cmd_api, "web": _cmd_web, "worker": _cmd_worker, "proxy": _cmd_proxy,
    "migrate": _cmd_migrate,
    "mail-sink": _cmd_mail_sink, "user": _cmd_user, "secrets": _cmd_secrets_rotate, "session": _cmd_session_create,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = load_settings_or_exit()
    try:
        return COMMANDS[args.command](settings, args)
    except MissingSetting as err:
        print(f"configuration error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
