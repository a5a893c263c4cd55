"""Proxy process skeleton: health endpoints now; the gateway and forward proxies land with their issue.

Until then every gateway route answers 503 with a problem body, so nothing is silently
passed through unfiltered.
"""

from __future__ import annotations

import json

from aiohttp import web

from settings import Settings


async def healthz(_request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def gateway_unavailable(request: web.Request) -> web.Response:
    body = {
        "type": "about:blank", "title": "Gateway proxy not available", "status": 503,
        "detail": "The gateway proxy is not enabled in this build.", "instance": request.path,
    }
    return web.Response(status=503, text=json.dumps(body), content_type="application/problem+json")


def create_app() -> web.Application:
    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_route("*", "/agents/{agent_id}/gateway/{path:.*}", gateway_unavailable)
    return app


def run(settings: Settings) -> None:
    web.run_app(create_app(), host=settings.proxy_host, port=settings.proxy_port, print=None,
                access_log=None)
