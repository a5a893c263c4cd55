"""The control-plane API as the web app sees it: the shared key plus the user it vouches for."""

from __future__ import annotations

import uuid
from typing import Any

import httpx


class ApiError(Exception):
    """A problem+json answer; `detail` is the API's own readable sentence, safe to show."""

    def __init__(self, status: int, title: str, detail: str) -> None:
        super().__init__(f"{status} {title}: {detail}")
        self.status = status
        self.title = title
        self.detail = detail


class ControlPlane:
    def __init__(self, client: httpx.AsyncClient, user_id: uuid.UUID | None) -> None:
        """`user_id` None: a visitor; only what the API shows without `X-User-Id` (the plans)."""
        self._client = client
        self._headers = {"X-User-Id": str(user_id)} if user_id is not None else {}

    async def call(self, method: str, path: str, json: Any = None) -> Any:
        try:
            resp = await self._client.request(method, path, json=json, headers=self._headers)
        except httpx.HTTPError:
            raise ApiError(503, "Control plane unreachable",
                           "The control plane did not answer; try again in a moment.") from None
        if resp.status_code >= 400:
            try:
                body = resp.json()
            except ValueError:
                body = {}
            title = str(body.get("title") or resp.reason_phrase) if isinstance(body, dict) else resp.reason_phrase
            detail = str(body.get("detail") or title) if isinstance(body, dict) else title
            raise ApiError(resp.status_code, title, detail)
        return resp.json() if resp.content else None

    async def get(self, path: str) -> Any:
        return await self.call("GET", path)

    async def post(self, path: str, json: Any = None) -> Any:
        return await self.call("POST", path, json)
