"""The streaming proxy: ``ANY /v1/proxy/{backend}/{path}`` as a plain ASGI application.

It runs beside Django rather than inside it (see docs/decisions.md): no middleware and no
request object stand between the socket and the upstream, so a chunk goes out as soon as
it arrives and a client that hangs up closes the upstream request at once. Django's
settings, models and database are used for everything off the hot path.

This module reads the request (its path, token and body) and decides whether it may go
on: proxy/access.py says who may call, proxy/policy.py what the grant allows. What goes
upstream and comes back is proxy/forwarding.py's; the audit record, proxy/record.py's.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

from django.conf import settings
from django.db import Error as DatabaseError

from broker.infra.loops import LoopLocal
from broker.infra.secrets import secret_digest
from broker.services.access import token_misplaced
from broker.services.policy import HoldRule
from proxy.access import AccessCache, AccessDenied, Route, TokenAccess
from proxy.errors import BadRequest, ProxyError
from proxy.forwarding import (
    BATCH_RESULTS_PATH,
    ClientGone,
    Headers,
    Receive,
    Scope,
    Send,
    UpstreamBroke,
    forward,
    header_value,
    upstream_request,
    upstream_secret,
    usage_settle,
)
from proxy.hold import hold_desk
from proxy.paths import PathRefused, proxy_path_parse, upstream_url
from proxy.policy import (
    hold_match,
    policy_check_request,
    policy_demand,
    policy_gate,
    process_load,
)
from proxy.providers import ANTHROPIC, Wire, wire_for
from proxy.record import Exchange

# A body nothing needs to read is held up to this much, then streamed upstream.
STREAM_BODY_AFTER = 1024 * 1024


async def respond_error(send: Send, error: ProxyError, wire: Wire) -> None:
    body = error.body_in(wire)
    await send(
        {
            "type": "http.response.start",
            "status": error.status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"x-keybroker-error", b"1"),
                *error.headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def credential_of(headers: Headers) -> str | None:
    """The crd_ token from ``x-api-key`` or ``Authorization: Bearer``."""
    for name, value in headers:
        if name == b"x-api-key" and value:
            return value.decode("latin-1").strip()
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


def request_facts(path: str, body: bytes, wire: Wire = ANTHROPIC) -> dict[str, Any]:
    """Model, streaming, whether a system prompt was sent, a batch's size: never the
    content itself. Read by content, as policy reads it, whatever the Content-Type says."""
    if not path.startswith(wire.metered_paths) or not body:
        return {}
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return {}
    if not isinstance(payload, dict):
        return {}
    facts: dict[str, Any] = {"system": bool(payload.get("system"))}
    if isinstance(payload.get("model"), str):
        facts["model"] = payload["model"][:100]
    facts["stream"] = payload.get("stream") is True
    max_tokens = wire.max_tokens(payload)
    if _whole_number(max_tokens):
        facts["max_tokens"] = max_tokens
    requests = payload.get("requests")
    if isinstance(requests, list):
        params = [item.get("params") for item in requests if isinstance(item, dict)]
        facts["batch_requests"] = len(requests)
        facts["batch_max_tokens"] = sum(
            p["max_tokens"]
            for p in params
            if isinstance(p, dict) and _whole_number(p.get("max_tokens"))
        )
    return facts


async def _body_stream(
    first: list[bytes], receive: Receive, exchange: Exchange, limit: int
) -> AsyncIterator[bytes]:
    """The rest of a request body, sent on as it arrives; only what was read ahead is held."""
    for chunk in first:
        yield chunk
    process_load.release_body(exchange.body_held)
    sent, exchange.body_held = exchange.body_held, 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            exchange.outcome = "client_gone"
            raise ClientGone
        chunk = message.get("body", b"")
        sent += len(chunk)
        if sent > limit:
            exchange.body_refused = _body_too_large(limit)
            raise exchange.body_refused
        yield chunk
        if not message.get("more_body"):
            return


def _body_too_large(limit: int) -> BadRequest:
    return BadRequest(413, "request_too_large", f"request body is over {limit} bytes")


def _whole_number(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


class ProxyApp:
    def __init__(self) -> None:
        self._caches = LoopLocal(AccessCache)

    def access_cache(self) -> AccessCache:
        return self._caches.get()

    def startup(self) -> None:
        """Follow access changes from the start, so no request waits on a Redis read."""
        self.access_cache().listen()

    async def shutdown(self) -> None:
        await hold_desk().close()  # its held calls are denied: nobody can approve them now
        await self.access_cache().close()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        client = scope.get("client")
        exchange = Exchange(
            method=scope["method"],
            path=scope.get("raw_path", scope["path"].encode()).decode("latin-1"),
            address=client[0] if client else None,
            started=time.perf_counter(),
        )
        try:
            await self._handle(scope, receive, send, exchange)
        except ProxyError as error:
            exchange.answered_by(error)
            await respond_error(send, error, await self._wire_of(exchange))
            exchange.record(error.message)
        except UpstreamBroke as broke:
            exchange.outcome = broke.outcome
            exchange.record(str(broke))
            raise
        finally:
            usage_settle(exchange)

    async def _wire_of(self, exchange: Exchange) -> Wire:
        """The shape of an answer of keybroker's own: its backend's provider's, when the
        backend is known even if the call was refused before its route was read."""
        if exchange.wire_known or not exchange.backend:
            return exchange.wire
        try:
            route = await self.access_cache().route(exchange.backend, trusted=True)
        except Exception:  # the database is down: the refusal still goes out
            return exchange.wire
        return wire_for(route.kind) if route is not None else exchange.wire

    async def _handle(self, scope: Scope, receive: Receive, send: Send, exchange: Exchange) -> None:
        try:
            target = proxy_path_parse(scope.get("raw_path") or scope["path"].encode())
        except PathRefused as refused:
            raise BadRequest(400, "invalid_request_error", str(refused)) from None
        if target is None:
            raise BadRequest(404, "not_found_error", "no such proxy path")
        exchange.backend, exchange.path = target.backend, target.path
        headers: Headers = scope["headers"]
        token = credential_of(headers)
        if token is None:
            raise AccessDenied(
                401,
                "authentication_error",
                "send a crd_ token as x-api-key or Authorization: Bearer",
            )
        misplaced = token_misplaced(token)
        if misplaced is not None:
            raise AccessDenied(misplaced.status, misplaced.anthropic_type, misplaced.message)
        exchange.token_digest = secret_digest(token)
        try:
            access, route = await self.access_cache().authorize(
                exchange.token_digest, target.backend
            )
        except DatabaseError:
            # A token the cache does not hold while the database is down (tests/faults): a
            # clear answer to retry, and an audit event, rather than a bare 500.
            raise AccessDenied(
                503,
                "api_error",
                "keybroker cannot check this token right now (its database is unreachable); "
                "retry shortly",
                headers=[(b"retry-after", b"1")],
            ) from None
        exchange.access, exchange.wire, exchange.wire_known = access, wire_for(route.kind), True
        try:
            url = upstream_url(route.base_url, target.path, scope.get("query_string", b""))
        except PathRefused as refused:
            raise BadRequest(400, "invalid_request_error", str(refused)) from None
        with process_load.call(access.policy, agent=access.agent_name, backend=target.backend):
            try:
                await self._call(scope, receive, send, exchange, target.path, access, route, url)
            finally:
                process_load.release_body(exchange.body_held)

    async def _call(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        exchange: Exchange,
        path: str,
        access: TokenAccess,
        route: Route,
        url: str,
    ) -> None:
        headers: Headers = scope["headers"]
        # Held whole only when something must read it: policy, or the audit's facts and
        # the reservation of a messages call. Anything else (file uploads) streams through.
        policy = access.policy
        must_read = path.startswith(exchange.wire.metered_paths) or (
            policy is not None and (policy.reads_body or policy.hold is not None)
        )
        body = await self._read_body(headers, receive, exchange, whole=must_read)
        if body is None:
            exchange.outcome = "client_gone"
            exchange.record("the client hung up while sending its request")
            return
        whole = body if isinstance(body, bytes) else b""
        exchange.facts = request_facts(path, whole, exchange.wire)
        results = BATCH_RESULTS_PATH.match(path)
        if results and scope["method"] == "GET":
            exchange.batch_results = results[1]
        if access.policy is not None:
            # Before anything goes upstream; rates and budgets cost Redis only when set.
            policy_check_request(
                access.policy,
                path=path,
                headers=headers,
                body=whole,
                agent=access.agent_name,
                backend=route.name,
                wire=exchange.wire,
            )
            # Before the rates and budgets: a call waiting for a person takes none of them.
            if access.policy.hold is not None and not await self._held(
                receive, exchange, access.policy.hold, path, headers, whole
            ):
                return
            exchange.ticket = await policy_gate().admit(
                access.policy,
                agent=access.agent_name,
                backend=route.name,
                demand=policy_demand(scope["method"], path, exchange.facts, len(whole)),
            )
        request = upstream_request(
            method=scope["method"],
            path=path,
            url=url,
            headers=headers,
            body=body,
            route=route,
            secret=await upstream_secret(headers, route),
        )
        await forward(request, receive, send, exchange, self.access_cache())

    async def _held(
        self,
        receive: Receive,
        exchange: Exchange,
        rule: HoldRule,
        path: str,
        headers: Headers,
        body: bytes,
    ) -> bool:
        """Whether the call may go on: not held, or held and approved. False when its
        client hung up while it was held (recorded here)."""
        matched = hold_match(rule, path=path, headers=headers, body=body, wire=exchange.wire)
        if matched is None:
            return True
        if await hold_desk().hold(exchange, rule=matched, timeout=rule.timeout, receive=receive):
            # A hold can outlast a revocation: what the approval lets through must still be
            # allowed to go on, as an open call must (AccessCache.watch).
            reason = await self.access_cache().withdrawn(exchange.token_digest, exchange.backend)
            if reason:
                raise AccessDenied(
                    403, "permission_error", f"approved while held, but meanwhile: {reason}"
                )
            return True
        exchange.outcome = "client_gone"
        exchange.record("the client hung up while the call was held for approval")
        return False

    async def _read_body(
        self,
        headers: Headers,
        receive: Receive,
        exchange: Exchange,
        *,
        whole: bool,
    ) -> bytes | AsyncIterator[bytes] | None:
        """The request body: whole, held against the process' body budget, or past
        STREAM_BODY_AFTER bytes (when nothing needs to read it) as a stream to send on.
        None when the client went away."""
        limit = settings.PROXY_MAX_BODY_BYTES
        declared = header_value(headers, b"content-length")
        if declared.isdigit() and int(declared) > limit:
            raise _body_too_large(limit)
        chunks: list[bytes] = []
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            if exchange.body_held + len(chunk) > limit:
                raise _body_too_large(limit)
            process_load.hold_body(len(chunk))
            exchange.body_held += len(chunk)
            chunks.append(chunk)
            if not message.get("more_body"):
                return b"".join(chunks)
            if not whole and exchange.body_held > STREAM_BODY_AFTER:
                return _body_stream(chunks, receive, exchange, limit)


proxy_application = ProxyApp()
