"""VM providers behind one interface: Hetzner Cloud, Fly.io Machines and local gateway processes.

`build_provider(kind, settings)` picks one by name. Provider modules are imported lazily so that
using the local provider does not import hcloud, and vice versa.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from providers.base import (
    GATEWAY_PORT,
    MANAGED_BY,
    MAX_REQUEST_TIMEOUT_S,
    CapacityUnavailable,
    ProviderError,
    ProviderFatal,
    ProviderRetryable,
    VmInfo,
    VmNotFound,
    VmProvider,
    VmSpec,
    VmState,
    is_gone,
)

if TYPE_CHECKING:
    from settings import Settings

ProviderFactory = Callable[..., VmProvider]

__all__ = [
    "GATEWAY_PORT",
    "MANAGED_BY",
    "MAX_REQUEST_TIMEOUT_S",
    "CapacityUnavailable",
    "ProviderError",
    "ProviderFatal",
    "ProviderRetryable",
    "VmInfo",
    "VmNotFound",
    "VmProvider",
    "VmSpec",
    "VmState",
    "build_provider",
    "is_gone",
    "provider_kinds",
    "register_provider",
]


def _hetzner(settings: Settings, **overrides: Any) -> VmProvider:
    from providers.hetzner import HetznerProvider

    return HetznerProvider.from_settings(settings, **overrides)


def _fly(settings: Settings, **overrides: Any) -> VmProvider:
    from providers.fly import FlyProvider

    return FlyProvider.from_settings(settings, **overrides)


def _local(settings: Settings, **overrides: Any) -> VmProvider:
    from providers.local import LocalProvider

    return LocalProvider.from_settings(settings, **overrides)


_REGISTRY: dict[str, ProviderFactory] = {"hetzner": _hetzner, "fly": _fly, "local": _local}


def register_provider(kind: str, factory: ProviderFactory) -> None:
    """Add or replace a provider kind (tests use this to plug in doubles)."""
    _REGISTRY[kind] = factory


def provider_kinds() -> list[str]:
    return sorted(_REGISTRY)


def build_provider(kind: str, settings: Settings, **overrides: Any) -> VmProvider:
    """The provider for `kind`, configured from settings; `overrides` go to its constructor.

    Raises ProviderFatal for an unknown kind or missing credentials.
    """
    factory = _REGISTRY.get(kind)
    if factory is None:
        raise ProviderFatal(f"unknown provider {kind!r}; expected one of {', '.join(provider_kinds())}")
    return factory(settings, **overrides)
