"""RFC 9457 problem+json answers, with our security headers, as the API gives them."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from proxy.headers import OUR_CSP, SECURITY_HEADERS

__all__ = ["problem"]


def problem(status: int, title: str, detail: str, *, instance: str | None = None,
            headers: dict[str, str] | None = None, **extra: Any) -> web.Response:
    body: dict[str, Any] = {"type": "about:blank", "title": title, "status": status, "detail": detail}
    if instance is not None:
        body["instance"] = instance
    body.update({k: v for k, v in extra.items()})
    return web.Response(status=status, text=json.dumps(body), content_type="application/problem+json",
                        headers={**SECURITY_HEADERS, "Content-Security-Policy": OUR_CSP,
                                 "Cache-Control": "no-store", **(headers or {})})
