"""The Django shape: an async view that returns a ``StreamingHttpResponse``."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from django.http import HttpRequest, HttpResponse, StreamingHttpResponse
from django.http.response import HttpResponseBase
from django.views.decorators.csrf import csrf_exempt

from bench.candidates.clients import Answer, from_env, response_headers, upstream_headers

CLIENT, UPSTREAM, KEY = from_env()


async def _relay(answer: Answer) -> AsyncIterator[bytes]:
    try:
        async for chunk in answer.chunks():
            yield chunk
    finally:
        # Django closes this generator when the client disconnects (ASGIHandler cancels
        # the response task), so this is where the upstream request ends.
        await answer.aclose()


@csrf_exempt
async def proxy(request: HttpRequest, backend: str, path: str) -> HttpResponseBase:
    query = request.META.get("QUERY_STRING")
    url = f"{UPSTREAM}/{path}" + (f"?{query}" if query else "")
    try:
        answer = await CLIENT.open(
            request.method or "GET", url, upstream_headers(request.headers.items(), KEY),
            request.body,
        )  # fmt: skip
    except Exception as exc:
        error = {"type": "error", "error": {"type": "api_error", "message": str(exc)}}
        return HttpResponse(json.dumps(error), status=502, content_type="application/json")
    response = StreamingHttpResponse(_relay(answer), status=answer.status)
    del response.headers["Content-Type"]
    for name, value in response_headers(answer.headers):
        response.headers[name.decode("latin-1")] = value.decode("latin-1")
    response.headers["X-Accel-Buffering"] = "no"
    return response
