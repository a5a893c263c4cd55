"""Connecting to Temporal with the pydantic data converter, and registering search attributes."""

from __future__ import annotations

import logging

from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import AddSearchAttributesRequest, ListSearchAttributesRequest
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.runtime import Runtime
from temporalio.service import RPCError

from orchestration.search_attributes import SEARCH_ATTRIBUTES
from settings import Settings
from telemetry.tracing import temporal_interceptors

log = logging.getLogger(__name__)


async def connect(settings: Settings, runtime: Runtime | None = None) -> Client:
    """`runtime`: the worker passes one whose telemetry exports the SDK's metrics (worker.py). With
    tracing on, the client carries the tracing interceptor, and so does every worker built on it."""
    return await Client.connect(
        settings.temporal_target,
        namespace=settings.temporal_namespace,
        data_converter=pydantic_data_converter,
        runtime=runtime,
        interceptors=temporal_interceptors(),
    )


async def ensure_search_attributes(client: Client, namespace: str) -> bool:
    """Register UserId/AgentId/VpsId; False where the server does not allow it (e.g. Temporal Cloud)."""
    try:
        existing = await client.operator_service.list_search_attributes(
            ListSearchAttributesRequest(namespace=namespace)
        )
        missing = {
            key.name: IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD
            for key in SEARCH_ATTRIBUTES
            if key.name not in existing.custom_attributes
        }
        if missing:
            await client.operator_service.add_search_attributes(
                AddSearchAttributesRequest(namespace=namespace, search_attributes=missing)
            )
            log.info("registered search attributes", extra={"attributes": sorted(missing)})
        return True
    except RPCError as err:
        log.warning("cannot register search attributes", extra={"error": str(err)})
        return False
