"""The streaming proxy: ``ANY /v1/proxy/{backend}/{path}`` as a plain ASGI application.

It runs beside Django rather than inside it (see docs/decisions.md): no middleware and no
request object stand between the socket and the upstream, so a chunk goes out as soon as
it arrives and a client that hangs up closes the upstream request at once. Django's
settings, models and database are used for everything off the hot path.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from django.conf import settings
from yarl import URL

from audit.recorder import audit_enqueue
from broker.infra.loops import LoopLocal
from broker.infra.secrets import secret_digest
from broker.kinds import ANTHROPIC_VERSION, AuthScheme, ProviderError, provider_for
from broker.services.tokens import proxy_base_url
from proxy.access import AccessCache, AccessDenied, Route, TokenAccess
from proxy.errors import BadRequest, ProxyError, UpstreamFailed
from proxy.federation import federated_secret, federation_cache
from proxy.metering import UsageMeter, meterable_accept_encoding
from proxy.paths import PathRefused, proxy_path_parse, upstream_url
from proxy.policy import (
    BATCH_PATH,
    PolicyDenied,
    Ticket,
    policy_check_request,
    policy_demand,
    policy_gate,
    process_load,
)
from proxy.upstream import upstream_session, upstream_timeout

logger = logging.getLogger(__name__)

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

HOP_BY_HOP = frozenset(
    {
        b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te",
        b"trailer", b"transfer-encoding", b"upgrade", b"host", b"content-length",
        b"proxy-connection",
    }
)  # fmt: skip
# Credentials of the caller never travel upstream, and nothing of keybroker's own either.
CREDENTIAL_HEADERS = frozenset({b"authorization", b"x-api-key", b"cookie", b"x-anthropic-key"})
CLIENT_KEY_HEADER = b"x-anthropic-key"
METERED_REQUEST_PATHS = ("/v1/messages",)
# A body nothing needs to read is held up to this much, then streamed upstream.
STREAM_BODY_AFTER = 1024 * 1024
BATCH_RESULTS_PATH = re.compile(r"^/v1/messages/batches/([A-Za-z0-9_-]{1,100})/results$")
# keybroker's server sends its own Date; who the upstream runs is none of the client's business.
UPSTREAM_ONLY_HEADERS = frozenset({b"server", b"date"})


class ClientGone(Exception):
    """The client hung up while its request body was being streamed upstream."""


class UpstreamBroke(Exception):
    """The upstream stopped mid-stream; the client's connection is cut so it sees a break."""

    outcome = "upstream_broke"


class AccessWithdrawn(UpstreamBroke):
    """The token of an open call was revoked (or its agent, grant or backend withdrawn)."""

    outcome = "revoked"


async def respond_error(send: Send, error: ProxyError) -> None:
    body = error.body
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


def credential_of(headers: list[tuple[bytes, bytes]]) -> str | None:
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


def request_facts(path: str, body: bytes) -> dict[str, Any]:
    """Model, streaming, whether a system prompt was sent, a batch's size: never the
    content itself. Read by content, as policy reads it, whatever the Content-Type says."""
    if not path.startswith(METERED_REQUEST_PATHS) or not body:
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
    if _whole_number(payload.get("max_tokens")):
        facts["max_tokens"] = payload["max_tokens"]
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


@dataclass
class Exchange:
    """One proxied call, as the audit trail will see it."""

    method: str
    path: str
    address: str | None
    started: float
    access: TokenAccess | None = None
    backend: str = ""
    status: int = 0
    ttfb_ms: float | None = None
    request_id: str = ""
    outcome: str = "ok"
    body_complete: bool = False
    facts: dict[str, Any] | None = None
    meter: UsageMeter | None = None
    error: ProxyError | None = None  # what keybroker answered in the upstream's place
    ticket: Ticket | None = None  # where a metered grant's usage is counted
    token_digest: str = ""  # of the crd_ token, to close the call if it is revoked
    note: str = ""  # why the call ended as it did, when it was cut short
    at_frame_end: bool = True  # whether what was sent so far ends between SSE events
    body_held: int = 0  # request-body bytes held in memory, against the process' budget
    body_refused: BadRequest | None = None  # why a streamed request body was cut off
    batch_created: str = ""  # the id of the message batch this call created
    batch_results: str = ""  # the id of the message batch whose results this call read

    def record(self, message: str = "") -> None:
        usage = self.meter.finish() if self.meter is not None else None
        facts = self.facts or {}
        error = self.error
        outcome = error.outcome if error is not None else self.outcome
        action = error.action if error is not None else "proxy.request"
        denied = error is not None and error.denied
        fields: dict[str, Any] = {
            "method": self.method,
            "path": self.path,
            "status": self.status,
            "outcome": outcome,
            "duration_ms": round((time.perf_counter() - self.started) * 1000, 2),
            "ttfb_ms": self.ttfb_ms,
            "request_id": self.request_id,
            "model": (usage.model if usage and usage.model else facts.get("model", "")),
            "system_prompt": facts.get("system"),
            "streamed": facts.get("stream"),
            "policy_result": "denied" if denied else ("allowed" if self.access else ""),
            "policy_reason": message if denied else "",
        }
        if usage is not None:
            fields["input_tokens"] = usage.tokens.get("input_tokens")
            fields["output_tokens"] = usage.tokens.get("output_tokens")
            fields["cache_read_tokens"] = usage.tokens.get("cache_read_input_tokens")
            fields["cache_write_tokens"] = usage.tokens.get("cache_creation_input_tokens")
            fields["stop_reason"] = usage.stop_reason
            if usage.error_type:
                fields["error_type"] = usage.error_type  # not a column: kept in detail
            if usage.unmetered:
                fields["unmetered"] = usage.unmetered  # why the tokens are missing or partial
            if self.batch_results:
                fields["batch_id"] = self.batch_results
                fields["batch_requests"] = usage.requests
        if self.batch_created:
            fields["batch_id"] = self.batch_created
        if "batch_requests" in facts:
            fields["batch_requests"] = facts["batch_requests"]
        if isinstance(error, PolicyDenied):
            fields["policy_rule"] = error.rule
        if self.access is not None:
            fields["token_id"] = self.access.token_id
            fields["token"] = self.access.token_prefix
        audit_enqueue(
            action=action,
            agent=self.access.agent_name if self.access else "",
            backend=self.backend,
            message=message,
            address=self.address,
            **fields,
        )


class ProxyApp:
    def __init__(self) -> None:
        self._caches = LoopLocal(AccessCache)

    def access_cache(self) -> AccessCache:
        return self._caches.get()

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
            exchange.status, exchange.error = error.status, error
            if isinstance(error, AccessDenied) and exchange.access is None:
                exchange.access = error.access
            await respond_error(send, error)
            exchange.record(error.message)
        except UpstreamBroke as broke:
            exchange.outcome = broke.outcome
            exchange.record(str(broke))
            raise
        finally:
            if exchange.ticket is not None:
                _settle(exchange, exchange.ticket)

    async def _handle(self, scope: Scope, receive: Receive, send: Send, exchange: Exchange) -> None:
        try:
            target = proxy_path_parse(scope.get("raw_path") or scope["path"].encode())
        except PathRefused as refused:
            raise BadRequest(400, "invalid_request_error", str(refused)) from None
        if target is None:
            raise BadRequest(404, "not_found_error", "no such proxy path")
        exchange.backend, exchange.path = target.backend, target.path
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        token = credential_of(headers)
        if token is None:
            raise AccessDenied(
                401,
                "authentication_error",
                "send a crd_ token as x-api-key or Authorization: Bearer",
            )
        exchange.token_digest = secret_digest(token)
        access, route = await self.access_cache().authorize(exchange.token_digest, target.backend)
        exchange.access = access
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
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        # Held whole only when something must read it: policy, or the audit's facts and
        # the reservation of a messages call. Anything else (file uploads) streams through.
        must_read = path.startswith(METERED_REQUEST_PATHS) or (
            access.policy is not None and access.policy.reads_body
        )
        body = await self._read_body(headers, receive, exchange, whole=must_read)
        if body is None:
            exchange.outcome = "client_gone"
            return
        whole = body if isinstance(body, bytes) else b""
        exchange.facts = request_facts(path, whole)
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
            )
            exchange.ticket = await policy_gate().admit(
                access.policy,
                agent=access.agent_name,
                backend=route.name,
                demand=policy_demand(scope["method"], path, exchange.facts, len(whole)),
            )
        if route.federation is not None:
            secret = await federated_secret(route.federation)
        else:
            secret = _upstream_secret(headers, route)
        upstream_headers = self._upstream_headers(headers, route, secret)
        declared = _header(headers, b"content-length")
        if not isinstance(body, bytes) and declared.isdigit():
            upstream_headers.append((b"content-length", declared.encode()))
        refused: Callable[[], None] | None = None
        if route.federation is not None:
            federation = route.federation

            def refused() -> None:
                # The upstream no longer takes this access token (revoked, or the rule
                # changed): the next call exchanges for a new one instead of failing until
                # it expires. Before the answer goes out, so the client's retry sees it.
                federation_cache().forget(federation, secret[1])

        await self._forward(
            scope, receive, send, exchange, route, url, upstream_headers, body, refused
        )

    async def _read_body(
        self,
        headers: list[tuple[bytes, bytes]],
        receive: Receive,
        exchange: Exchange,
        *,
        whole: bool,
    ) -> bytes | AsyncIterator[bytes] | None:
        """The request body: whole, held against the process' body budget, or past
        STREAM_BODY_AFTER bytes (when nothing needs to read it) as a stream to send on.
        None when the client went away."""
        limit = settings.PROXY_MAX_BODY_BYTES
        declared = _header(headers, b"content-length")
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

    @staticmethod
    def _upstream_headers(
        headers: list[tuple[bytes, bytes]], route: Route, secret: tuple[AuthScheme, str]
    ) -> list[tuple[bytes, bytes]]:
        forwarded = [
            (name, value)
            for name, value in headers
            if name not in HOP_BY_HOP and name not in CREDENTIAL_HEADERS
        ]
        if not any(name == b"anthropic-version" for name, _ in forwarded):
            forwarded.append((b"anthropic-version", ANTHROPIC_VERSION.encode()))
        scheme, key = secret
        beta = ",".join(v.decode("latin-1") for k, v in forwarded if k == b"anthropic-beta")
        credential = scheme.headers(key, anthropic_beta=beta or None)
        if "anthropic-beta" in credential:
            forwarded = [(k, v) for k, v in forwarded if k != b"anthropic-beta"]
        forwarded.extend((k.encode(), v.encode("latin-1")) for k, v in credential.items())
        return forwarded

    async def _forward(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        exchange: Exchange,
        route: Route,
        url: str,
        headers: list[tuple[bytes, bytes]],
        body: bytes | AsyncIterator[bytes],
        unauthorized: Callable[[], None] | None = None,
    ) -> None:
        # Only codings the meter reads are asked for (br or zstd would leave usage unread);
        # a client that did not ask for compression must never get it. Batch answers are
        # rewritten (results_url), so they must arrive uncompressed.
        asked = b", ".join(v for k, v in headers if k == b"accept-encoding") or None
        headers = [(k, v) for k, v in headers if k != b"accept-encoding"]
        batch = exchange.path.startswith(BATCH_PATH)
        headers.append(
            (b"accept-encoding", b"identity" if batch else meterable_accept_encoding(asked))
        )
        try:
            upstream = await upstream_session().request(
                scope["method"],
                # As built and checked: no re-quoting or path normalisation by the client.
                URL(url, encoded=True),
                headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in headers],
                data=body or None,
                allow_redirects=False,
                timeout=upstream_timeout(),
            )
        except Exception as exc:
            # A streamed request body can fail the request from the client's side too.
            if exchange.outcome == "client_gone":
                exchange.record("the client hung up while sending its request")
                return
            if exchange.body_refused is not None:
                raise exchange.body_refused from None
            if isinstance(exc, TimeoutError):
                raise UpstreamFailed(f"upstream {route.name} timed out", timed_out=True) from None
            if isinstance(exc, aiohttp.ClientError):
                raise UpstreamFailed(
                    f"upstream {route.name} unreachable ({type(exc).__name__})"
                ) from None
            raise
        exchange.status = upstream.status
        if upstream.status == 401 and unauthorized is not None:
            unauthorized()
        exchange.ttfb_ms = round((time.perf_counter() - exchange.started) * 1000, 2)
        exchange.request_id = upstream.headers.get("request-id", "")[:100]
        try:
            if exchange.path.startswith(BATCH_PATH) and _is_json(upstream):
                await self._send_rewritten(send, upstream, route, exchange)
            else:
                await self._stream(receive, send, upstream, exchange)
        finally:
            if exchange.body_complete:
                upstream.release()  # read to the end: the connection goes back to the pool
            else:
                upstream.close()
        if exchange.outcome == "ok" and upstream.status >= 400:
            exchange.outcome = "upstream_error"
        exchange.record(exchange.note)

    @staticmethod
    def _response_headers(upstream: aiohttp.ClientResponse) -> list[tuple[bytes, bytes]]:
        return [
            (name.lower(), value)
            for name, value in upstream.raw_headers
            if (name.lower() not in HOP_BY_HOP or name.lower() == b"content-length")
            and name.lower() not in UPSTREAM_ONLY_HEADERS
        ]

    async def _stream(
        self, receive: Receive, send: Send, upstream: aiohttp.ClientResponse, exchange: Exchange
    ) -> None:
        headers = self._response_headers(upstream)
        content_type = upstream.headers.get("content-type", "")
        if content_type.startswith("text/event-stream"):
            headers.append((b"x-accel-buffering", b"no"))
        exchange.meter = UsageMeter(
            content_type=content_type,
            content_encoding=upstream.headers.get("content-encoding", ""),
            jsonl=bool(exchange.batch_results) and upstream.status == 200,
        )
        await send({"type": "http.response.start", "status": upstream.status, "headers": headers})
        pump = asyncio.ensure_future(self._pump(send, upstream, exchange))
        hangup = asyncio.ensure_future(_wait_for_disconnect(receive))
        access = self.access_cache()
        withdrawn = access.watch(exchange.token_digest, exchange.backend)
        waiting: set[asyncio.Future[Any]] = {pump, hangup, withdrawn}
        try:
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        finally:
            hangup.cancel()
            reason = withdrawn.result() if withdrawn.done() and not withdrawn.cancelled() else ""
            access.unwatch(exchange.token_digest, withdrawn)
            if not pump.done():
                # The client hung up, its access was withdrawn, or this task was cancelled:
                # stop reading upstream.
                pump.cancel()
                exchange.outcome = "revoked" if reason else "client_gone"
                with contextlib.suppress(asyncio.CancelledError):
                    await pump
        if exchange.outcome == "revoked":
            await self._close_withdrawn(send, content_type, exchange, reason)
        elif exchange.outcome != "client_gone":
            pump.result()  # re-raises UpstreamBroke

    @staticmethod
    async def _close_withdrawn(
        send: Send, content_type: str, exchange: Exchange, reason: str
    ) -> None:
        """End a call whose access was withdrawn: an SSE stream between two events gets an
        error event the SDKs raise, anything else has its connection cut."""
        message = f"{reason}: this call was closed"
        if not (content_type.startswith("text/event-stream") and exchange.at_frame_end):
            raise AccessWithdrawn(message)
        error = AccessDenied(401, "authentication_error", message).body.decode()
        frame = f"event: error\ndata: {error}\n\n".encode()
        await send({"type": "http.response.body", "body": frame, "more_body": False})
        exchange.note = message

    @staticmethod
    async def _pump(send: Send, upstream: aiohttp.ClientResponse, exchange: Exchange) -> None:
        meter = exchange.meter
        assert meter is not None
        try:
            async for chunk in upstream.content.iter_any():
                meter.feed(chunk)
                exchange.at_frame_end = False
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                exchange.at_frame_end = chunk.endswith((b"\n\n", b"\r\n\r\n"))
        except TimeoutError:
            raise UpstreamBroke("upstream went silent mid-stream (idle timeout)") from None
        except aiohttp.ClientError as exc:
            raise UpstreamBroke(f"upstream cut the stream ({type(exc).__name__})") from None
        exchange.body_complete = True
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _send_rewritten(
        self, send: Send, upstream: aiohttp.ClientResponse, route: Route, exchange: Exchange
    ) -> None:
        """A batch's ``results_url`` points at the upstream; the client must call the proxy."""
        try:
            raw = await upstream.read()
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise UpstreamFailed(
                f"upstream {route.name} broke off ({type(exc).__name__})"
            ) from None
        exchange.body_complete = True
        exchange.meter = None
        try:
            payload = json.loads(raw)
            body = json.dumps(_rewrite_results_urls(payload, route)).encode()
        except (ValueError, UnicodeDecodeError):
            body = raw
        else:
            created = exchange.method == "POST" and exchange.path == BATCH_PATH
            if created and upstream.status == 200 and isinstance(payload, dict):
                batch_id = payload.get("id")
                if isinstance(batch_id, str) and BATCH_RESULTS_PATH.match(
                    f"{BATCH_PATH}/{batch_id}/results"
                ):
                    exchange.batch_created = batch_id
        headers = [(k, v) for k, v in self._response_headers(upstream) if k != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": upstream.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _settle(exchange: Exchange, ticket: Ticket) -> None:
    """Count a metered call's usage in place of what it reserved at admission.

    record() has finished the meter: its usage is the whole call's, streamed or not, and
    counts toward the window the call started in. Usage the meter could not read leaves
    the reservation standing; a call that got no answer gives it back.
    """
    gate = policy_gate()
    usage = exchange.meter.usage if exchange.meter is not None else None
    tokens = None if usage is not None and usage.unmetered else (usage.tokens if usage else {})
    if exchange.batch_created:
        gate.hold_batch(ticket, exchange.batch_created)  # settled when its results are read
        return
    if exchange.batch_results and exchange.status == 200:
        # The results' usage is the batch's, not this read's (which reserved nothing); a
        # read cut short leaves the batch held for the next one.
        if exchange.body_complete:
            gate.settle_batch(ticket, exchange.batch_results, tokens)
        return
    gate.settle(ticket, tokens)


def _rewrite_results_urls(payload: Any, route: Route) -> Any:
    proxy_base = proxy_base_url(route.name)
    if isinstance(payload, dict):
        rewritten = {key: _rewrite_results_urls(value, route) for key, value in payload.items()}
        url = payload.get("results_url")
        if isinstance(url, str) and url.startswith(route.base_url + "/"):
            rewritten["results_url"] = proxy_base + url[len(route.base_url) :]
        return rewritten
    if isinstance(payload, list):
        return [_rewrite_results_urls(item, route) for item in payload]
    return payload


def _upstream_secret(headers: list[tuple[bytes, bytes]], route: Route) -> tuple[AuthScheme, str]:
    """The backend's stored key, or for a client-key backend the agent's own."""
    if not route.client_key:
        if route.scheme is None:
            raise UpstreamFailed(f"backend {route.name} has no usable key")
        return route.scheme, route.secret
    key = _header(headers, CLIENT_KEY_HEADER).strip()
    if not key:
        raise AccessDenied(
            401,
            "authentication_error",
            f"backend {route.name} uses your own key: send it in X-Anthropic-Key",
        )
    try:
        return provider_for(route.kind).auth_scheme(key), key
    except ProviderError:
        raise AccessDenied(
            401, "authentication_error", "X-Anthropic-Key is not an Anthropic key"
        ) from None


def _is_json(response: aiohttp.ClientResponse) -> bool:
    return response.headers.get("content-type", "").startswith("application/json")


def _header(headers: list[tuple[bytes, bytes]], name: bytes) -> str:
    for key, value in headers:
        if key == name:
            return value.decode("latin-1")
    return ""


async def _wait_for_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


proxy_application = ProxyApp()
