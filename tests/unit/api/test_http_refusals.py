"""What aiohttp refuses by itself still answers a registered ErrorCode (issue 21: the middleware made up
``AGENT.HTTP_<status>`` codes that neither the Code registry nor the OpenAPI document knew)."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp import web

from agent.api.middleware import error_middleware
from agent.api.routes import openapi_document
from agent.errors import Code


@pytest.mark.parametrize(
    "refusal", [web.HTTPLengthRequired, web.HTTPUnsupportedMediaType, web.HTTPRequestHeaderFieldsTooLarge]
)
async def test_an_http_refusal_answers_a_registered_code(aiohttp_client: Any, refusal: Any) -> None:
    async def handler(request: web.Request) -> web.Response:
        raise refusal()

    app = web.Application(middlewares=[error_middleware])
    app.router.add_get("/x", handler)
    client = await aiohttp_client(app)
    answer = await client.get("/x")
    assert answer.status == refusal.status_code
    body = await answer.json()
    assert body["code"] == Code.HTTP_REFUSED.value
    assert str(refusal.status_code) in body["details"]
    schema = openapi_document()["components"]["schemas"]["ErrorCode"]["properties"]["code"]
    assert body["code"] in schema["enum"]
