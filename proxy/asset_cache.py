"""The Control UI's fingerprinted assets, answered from the proxy's memory instead of a VM.

Every gateway of one openclaw version serves the same `<base>/assets/<name>-<hash>.<ext>` files
(reference §8: Vite-fingerprinted, `Cache-Control: public, max-age=31536000, immutable`), and a
page load fetches dozens of them. The proxy keeps the ones it relayed, bounded in bytes (least
recently used out first), and answers later requests itself, after the same session, ownership,
VPS-state and rate checks as any request (the cache is consulted only in `_forward`).

What is cached: a GET of `assets/<one segment>` whose name looks fingerprinted, without a query,
answered 200 with `immutable` in the gateway's Cache-Control, a known length under the per-entry
cap, no Set-Cookie, identity/br/gzip coding (one entry per coding; a client gets only a coding
it accepts). Never the document, `sw.js`, themes, icons, config, media or anything else.

Whose entries are shared. The VM is the user's: its gateway may answer anything (the agent runs
code there), so a body one user's gateway sent must never reach another user unverified, or one
user could plant script in everyone's Control UI. So:

- with a trusted `asset-manifest.json` of the Control UI build the VMs run
  (`PROXY_CONTROL_UI_MANIFEST`, from the openclaw package the control plane installs), a body
  whose SHA-256 equals the manifest's entry for that path (`.br`/`.gz` siblings included) is
  stored under the manifest's build generation and served to every user;
- anything else is stored per user, keyed (user, build, path): it only ever goes back to the
  user whose own gateway sent it. `build` is the Control UI build id the proxy last saw in that
  VM's document (`data-openclaw-control-ui-build-id`), or the VM itself until one is seen.

Cached answers carry `Cache-Control: public, max-age=31536000, immutable`, `Vary: Accept-Encoding`
and our usual security headers and CSP; no `Last-Modified` (it differs per VM). Bytes answered
from the cache never crossed the VM, so they are not metered as VM traffic.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import re
import uuid
from collections import OrderedDict
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.headers import RESOURCE_CSP, SCRIPT_CSP, response_headers
from proxy.http_fast import FastResponse

__all__ = ["IMMUTABLE", "AssetCache", "CachedAsset", "TrustedManifest", "asset_name", "build_id_of"]

log = logging.getLogger(__name__)

IMMUTABLE = "public, max-age=31536000, immutable"
_HASHED_NAME = re.compile(r"[A-Za-z0-9_.-]*-[A-Za-z0-9_-]{8}\.[a-z0-9]{1,8}")
_SIBLING = {"identity": "", "br": ".br", "gzip": ".gz"}
_PREFERENCE = ("br", "gzip", "identity")
_BUILD_ID = re.compile(r'data-openclaw-control-ui-build-id="([A-Za-z0-9._:+-]{1,200})"')


@functools.lru_cache(maxsize=512)  # per request: a pure function, and page loads repeat their paths
def asset_name(tail: tuple[str, ...], query: str, method: str) -> str | None:
    """`assets/<name>` when this request may be answered from the cache, else None."""
    if method != "GET" or query or len(tail) != 2 or tail[0] != "assets":
        return None
    name = tail[1]
    if name.endswith((".br", ".gz")) or not _HASHED_NAME.fullmatch(name):
        return None
    return "assets/" + name


def build_id_of(html: str) -> str | None:
    """The Control UI build id the gateway stamps on its document (reference §8)."""
    match = _BUILD_ID.search(html[:4096])
    return match.group(1) if match else None


@dataclass(frozen=True)
class TrustedManifest:
    """`dist/control-ui/asset-manifest.json` of a Control UI build we trust: path -> SHA-256."""

    generation: str
    sha256: dict[str, str]

    @classmethod
    def load(cls, path: Path) -> TrustedManifest:
        data = json.loads(path.read_text(encoding="utf-8"))
        return cls(generation=str(data["generation"]),
                   sha256={str(a["path"]): str(a["sha256"]).lower() for a in data["assets"]})

    def verifies(self, name: str, coding: str, body: bytes) -> bool:
        expected = self.sha256.get(name + _SIBLING[coding])
        return expected is not None and hashlib.sha256(body).hexdigest() == expected


@dataclass(frozen=True)
class CachedAsset:
    body: bytes
    content_type: str
    coding: str

    @functools.cached_property
    def headers(self) -> CIMultiDictProxy[str]:
        """The answer's headers, a function of the entry alone: built once, read-only."""
        upstream: CIMultiDict[str] = CIMultiDict({"Content-Type": self.content_type, "Cache-Control": IMMUTABLE,
                                                  "Vary": "Accept-Encoding"})
        if self.coding != "identity":
            upstream["Content-Encoding"] = self.coding
        ctype = self.content_type.lower()
        script = "javascript" in ctype or "ecmascript" in ctype
        return response_headers(upstream, csp=SCRIPT_CSP if script else RESOURCE_CSP)

    def response(self) -> web.Response:
        return web.Response(status=200, body=self.body, headers=self.headers)  # copies the headers

    def fast_response(self) -> FastResponse:
        """The same answer for the fast front (`proxy.http_fast`), which only reads the headers."""
        return FastResponse(200, None, self.headers, self.body, small=len(self.content_type) <= 256)


class AssetCache:
    def __init__(self, *, max_bytes: int, max_entry_bytes: int, manifest: TrustedManifest | None = None) -> None:
        self.max_bytes = max_bytes
        self.max_entry_bytes = min(max_entry_bytes, max_bytes)
        self.manifest = manifest
        self.size = 0
        self.hits = 0
        self.fills = 0
        self._entries: OrderedDict[Hashable, CachedAsset] = OrderedDict()
        self._builds: dict[int, str] = {}
        """VPS (its id as an int: hashed in C, unlike a `uuid.UUID`) -> the Control UI build id its
        gateway's document last carried."""

    def saw_document(self, vps_id: uuid.UUID, html: str) -> None:
        build = build_id_of(html)
        if build is not None:
            self._builds[vps_id.int] = build
            if len(self._builds) > 100_000:
                self._builds.clear()

    def _user_key(self, user_id: uuid.UUID, vps_id: uuid.UUID, name: str, coding: str) -> Hashable:
        return ("user", user_id.int, self._builds.get(vps_id.int, vps_id.int), name, coding)

    def _shared_key(self, name: str, coding: str) -> Hashable | None:
        return ("build", self.manifest.generation, name, coding) if self.manifest is not None else None

    def lookup(self, user_id: uuid.UUID, vps_id: uuid.UUID, name: str, accepted: frozenset[str]
               ) -> CachedAsset | None:
        # The coding the gateway itself would pick (br, else gzip, else identity): a client that
        # accepts br gets br, fetched once, rather than a larger identity copy already held.
        coding = next(c for c in _PREFERENCE if c == "identity" or c in accepted)
        for key in (self._shared_key(name, coding), self._user_key(user_id, vps_id, name, coding)):
            if key is None:
                continue
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                self.hits += 1
                return entry
        return None

    def cacheable(self, status: int, headers: Mapping[str, str], length: int | None) -> str | None:
        """The coding to store this upstream answer under, or None when it must not be cached."""
        get = headers.get
        if status != 200 or length is None or length > self.max_entry_bytes or self.max_bytes <= 0:
            return None
        if "immutable" not in get("Cache-Control", "").lower() or get("Set-Cookie") is not None:
            return None
        if get("Content-Range") is not None:
            return None
        coding = get("Content-Encoding", "").strip().lower() or "identity"
        return coding if coding in _SIBLING else None

    def store(self, user_id: uuid.UUID, vps_id: uuid.UUID, name: str, coding: str, body: bytes,
              content_type: str) -> bool:
        """Keep one answer; True when it was verified against the trusted manifest (shared by all users)."""
        if len(body) > self.max_entry_bytes:
            return False
        shared = self.manifest is not None and self.manifest.verifies(name, coding, body)
        key = self._shared_key(name, coding) if shared else self._user_key(user_id, vps_id, name, coding)
        assert key is not None
        old = self._entries.pop(key, None)
        if old is not None:
            self.size -= len(old.body)
        self._entries[key] = CachedAsset(body, content_type, coding)
        self.size += len(body)
        self.fills += 1
        while self.size > self.max_bytes and self._entries:
            _, evicted = self._entries.popitem(last=False)
            self.size -= len(evicted.body)
        return shared
