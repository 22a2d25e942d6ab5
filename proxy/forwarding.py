"""A call on its way upstream and its answer on the way back.

The upstream request is the client's, with its credential swapped for the backend's (or
the agent's own key, or a federated access token). The answer streams through unbuffered,
metered as it passes (proxy/metering.py); an open call whose access is withdrawn is closed
(docs/decisions.md); and when the call ends its usage is counted in place of what it
reserved (proxy/policy.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from yarl import URL

from broker.kinds import AuthScheme, ProviderError, provider_for
from broker.services.tokens import proxy_base_url
from proxy.access import AccessCache, AccessDenied, Route
from proxy.errors import KeyInvalid, UpstreamFailed
from proxy.federation import federated_secret, federation_cache
from proxy.keys import (
    FAILOVER_STATUSES,
    REJECTED_STATUSES,
    SERVER_ERROR_STATUSES,
    RouteKey,
    key_choose,
    key_cool,
    key_rejected,
)
from proxy.metering import UsageMeter, meterable_accept_encoding
from proxy.policy import BATCH_PATH, policy_gate
from proxy.providers import wire_for
from proxy.record import Exchange
from proxy.upstream import upstream_session, upstream_timeout

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]

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


def header_value(headers: Headers, name: bytes) -> str:
    for key, value in headers:
        if key == name:
            return value.decode("latin-1")
    return ""


async def upstream_secret(headers: Headers, route: Route) -> tuple[AuthScheme, str]:
    """What the call carries upstream: a federated backend's access token, the backend's
    stored key, or for a client-key backend the agent's own."""
    if route.federation is not None:
        return await federated_secret(route.federation)
    if not route.client_key:
        if route.keys and all(key.invalid for key in route.keys):
            raise KeyInvalid(route.name)
        if route.keys:
            chosen = await key_choose(route.name, route.keys)
            if chosen is not None:
                return chosen.scheme, chosen.secret
        if route.scheme is None:
            raise UpstreamFailed(f"backend {route.name} has no usable key")
        return route.scheme, route.secret
    key = header_value(headers, CLIENT_KEY_HEADER).strip()
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


@dataclass(frozen=True)
class UpstreamRequest:
    """What goes upstream. Its headers hold the upstream credential: never log them."""

    method: str
    url: str
    # As aiohttp takes them, text: decoded once, as they were sorted.
    headers: list[tuple[str, str]] = field(repr=False)
    body: bytes | AsyncIterator[bytes] = field(repr=False)
    route: Route
    # A batch's JSON answer is rewritten (results_url): it is asked for uncompressed.
    rewritten: bool = False
    # Called when the upstream answers 401, before the answer goes out.
    on_unauthorized: Callable[[], None] | None = None
    # The pool's key it carries, and the same request with another key (a body held whole
    # can be sent again; a streamed one cannot).
    key: RouteKey | None = None
    rekey: Callable[[RouteKey], UpstreamRequest] | None = field(default=None, repr=False)


_NOT_FORWARDED = HOP_BY_HOP | CREDENTIAL_HEADERS


def upstream_headers(
    headers: Headers,
    route: Route,
    secret: tuple[AuthScheme, str],
    *,
    body_streamed: bool,
    rewritten: bool,
) -> list[tuple[str, str]]:
    """The client's headers as they go upstream, in one pass: hop-by-hop headers and every
    credential dropped, the provider's defaults added where absent, the upstream's
    credential set, everything else verbatim."""
    forwarded: list[tuple[str, str]] = []
    present: set[bytes] = set()
    betas: list[str] = []
    asked: list[bytes] = []
    declared = ""
    for name, value in headers:
        if name in _NOT_FORWARDED:
            if name == b"content-length":
                declared = value.decode("latin-1")
            continue
        if name == b"accept-encoding":
            asked.append(value)
            continue
        present.add(name)
        text = value.decode("latin-1")
        if name == b"anthropic-beta":
            betas.append(text)
        forwarded.append((name.decode("latin-1"), text))
    forwarded.extend(
        (name.decode("latin-1"), value.decode("latin-1"))
        for name, value in wire_for(route.kind).default_headers
        if name not in present
    )
    scheme, key = secret
    credential = scheme.headers(key, anthropic_beta=",".join(betas) or None)
    if "anthropic-beta" in credential:
        forwarded = [(k, v) for k, v in forwarded if k != "anthropic-beta"]
    forwarded.extend(credential.items())
    if body_streamed and declared.isdigit():
        forwarded.append(("content-length", declared))
    # Only codings the meter reads are asked for (br or zstd would leave usage unread); a
    # client that did not ask for compression must never get it.
    encoding = b"identity" if rewritten else meterable_accept_encoding(b", ".join(asked) or None)
    forwarded.append(("accept-encoding", encoding.decode("latin-1")))
    return forwarded


def upstream_request(
    *,
    method: str,
    path: str,
    url: str,
    headers: Headers,
    body: bytes | AsyncIterator[bytes],
    route: Route,
    secret: tuple[AuthScheme, str],
) -> UpstreamRequest:
    """The client's request as it goes upstream (its headers: ``upstream_headers``)."""
    rewritten = path.startswith(BATCH_PATH)
    forwarded = upstream_headers(
        headers, route, secret, body_streamed=not isinstance(body, bytes), rewritten=rewritten
    )
    key = secret[1]
    on_unauthorized: Callable[[], None] | None = None
    if route.federation is not None:
        federation = route.federation

        def on_unauthorized() -> None:
            # The upstream no longer takes this access token (revoked, or the rule changed):
            # the next call exchanges for a new one instead of failing until it expires.
            federation_cache().forget(federation, key)

    pooled = route.federation is None and not route.client_key
    chosen = next((k for k in route.keys if k.secret == key), None) if pooled else None
    rekey: Callable[[RouteKey], UpstreamRequest] | None = None
    if chosen is not None and isinstance(body, bytes) and len(route.keys) > 1:

        def rekey(other: RouteKey) -> UpstreamRequest:
            return upstream_request(
                method=method,
                path=path,
                url=url,
                headers=headers,
                body=body,
                route=route,
                secret=(other.scheme, other.secret),
            )

    return UpstreamRequest(
        method=method,
        url=url,
        headers=forwarded,
        body=body,
        route=route,
        rewritten=rewritten,
        on_unauthorized=on_unauthorized,
        key=chosen,
        rekey=rekey,
    )


async def forward(
    request: UpstreamRequest,
    receive: Receive,
    send: Send,
    exchange: Exchange,
    access_cache: AccessCache,
) -> None:
    """Send the request upstream and its answer to the client, then record the call.

    An answer that says the key cannot serve now (429, 529, 500, 502, 503, 504, 401), or a
    call that never reached the upstream, is sent again once with another key of the pool,
    before anything reached the client (proxy/keys.py)."""
    # A body read whole leaves receive() with nothing but the hang-up to tell: one watcher
    # for the whole call. A streamed body is read through receive() while it is sent.
    hangup = Hangup(receive) if isinstance(request.body, bytes) else None
    try:
        await _forward(request, receive, send, exchange, access_cache, hangup)
    finally:
        if hangup is not None:
            hangup.close()


async def _forward(
    request: UpstreamRequest,
    receive: Receive,
    send: Send,
    exchange: Exchange,
    access_cache: AccessCache,
    hangup: Hangup | None,
) -> None:
    route = request.route
    while True:
        exchange.key_fingerprint = request.key.fingerprint if request.key else ""
        try:
            answered = await _ask(request, exchange, hangup)
        except Unreached as unreached:
            again = await _failover(request, exchange, status=None, error=unreached.reason)
            if again is None:
                raise unreached.failed from None
            request = again
            continue
        if answered is None:
            return
        upstream = answered
        again = await _failover(
            request,
            exchange,
            status=upstream.status,
            retry_after=upstream.headers.get("retry-after", ""),
            should_retry=upstream.headers.get("x-should-retry", ""),
        )
        if again is None:
            break
        upstream.close()
        request = again
    exchange.status = upstream.status
    if upstream.status == 401 and request.on_unauthorized is not None:
        request.on_unauthorized()  # before the answer goes out, so the client's retry sees it
    exchange.ttfb_ms = round((time.perf_counter() - exchange.started) * 1000, 2)
    exchange.request_id = upstream.headers.get("request-id", "")[:100]
    try:
        if request.rewritten and _is_json(upstream):
            await _send_rewritten(send, upstream, route, exchange)
        elif upstream.content.is_eof() and not _is_event_stream(upstream):
            await _send_whole(send, upstream, exchange)
        else:
            await _stream(receive, send, upstream, exchange, access_cache, hangup)
    finally:
        if exchange.body_complete:
            upstream.release()  # read to the end: the connection goes back to the pool
        else:
            upstream.close()
    if exchange.outcome == "ok" and upstream.status >= 400:
        exchange.outcome = "upstream_error"
    exchange.record(exchange.note)


async def _failover(
    request: UpstreamRequest,
    exchange: Exchange,
    *,
    status: int | None,
    retry_after: str = "",
    should_retry: str = "",
    error: str = "",
) -> UpstreamRequest | None:
    """What this attempt's outcome (the upstream's ``status``, or None: not reached, for
    ``error``) says of the request's key, and the request to send instead (None: the
    outcome goes to the client). Only for a pool of several keys, and once per call."""
    key, route = request.key, request.route
    if key is None or len(route.keys) < 2:
        return None
    if status is not None and status not in FAILOVER_STATUSES:
        return None
    if status in SERVER_ERROR_STATUSES and should_retry.strip().lower() == "false":
        return None  # the upstream says this request would fail again: not the key's fault
    if status in REJECTED_STATUSES:
        await key_rejected(route.name, key)
    else:
        await key_cool(route.name, key, status=status, retry_after=retry_after, error=error)
    if exchange.retried or request.rekey is None:
        return None
    other = await key_choose(route.name, route.keys, exclude=(key,))
    if other is None:
        return None  # every other key is cooling down: this outcome stands
    exchange.retried = True
    exchange.failed_key_fingerprint = key.fingerprint
    exchange.failed_status = status
    exchange.failed_error = error
    return request.rekey(other)


class Unreached(Exception):
    """The upstream was not reached, or dropped the connection without an answer: nothing
    reached the client, and another key may be tried. ``failed`` is the client's answer
    otherwise (502, or 504 for a connect timeout)."""

    def __init__(self, failed: UpstreamFailed, reason: str) -> None:
        super().__init__(reason)
        self.failed = failed
        self.reason = reason


class Hangup:
    """Tells a call that waits on the upstream that its client hung up, by cancelling the
    call's own task: one watcher task per call, where a task for the upstream request and
    a wait on both cost a JSON call about a tenth of keybroker's own time (issue 13).

    Armed only around the waits it may cut short (``watching``); a hang-up while disarmed
    is kept and seen by the next ``watching`` or by ``gone``."""

    def __init__(self, receive: Receive) -> None:
        self._call = asyncio.current_task()
        self.task: asyncio.Future[None] = asyncio.ensure_future(wait_for_disconnect(receive))
        self._armed = False
        self._fired = False
        self.task.add_done_callback(self._done)

    def _done(self, task: asyncio.Future[None]) -> None:
        if task.cancelled():
            return
        task.exception()  # retrieved: a receive() that failed means the client is gone too
        if self._armed and self._call is not None:
            self._fired = True
            self._call.cancel()

    @property
    def gone(self) -> bool:
        return self.task.done() and not self.task.cancelled()

    @contextlib.asynccontextmanager
    async def watching(self) -> AsyncIterator[None]:
        """Cancels what runs inside when the client hangs up; raises ClientGone then."""
        if self.gone:
            raise ClientGone
        self._armed = True
        try:
            yield
        except asyncio.CancelledError:
            if not self._fired or self._call is None or self._call.uncancel() > 0:
                raise  # cancelled from outside (a shutdown), not by the hang-up
            raise ClientGone from None
        finally:
            self._armed = False

    def close(self) -> None:
        self._armed = False
        self.task.cancel()


async def _ask(
    request: UpstreamRequest, exchange: Exchange, hangup: Hangup | None
) -> aiohttp.ClientResponse | None:
    """The upstream's answer (its headers), or None when the client hung up first (the
    call is recorded then)."""
    route = request.route
    sent = time.perf_counter()
    asking = upstream_session().request(
        request.method,
        # As built and checked: no re-quoting or path normalisation by the client.
        URL(request.url, encoded=True),
        headers=request.headers,
        data=request.body or None,
        allow_redirects=False,
        timeout=upstream_timeout(),
    )
    try:
        if hangup is not None:
            try:
                # Cancelled on a hang-up: aiohttp closes the upstream connection, so a long
                # call nobody waits for does not go on (and bill).
                async with hangup.watching():
                    upstream = await asking
            except ClientGone:
                exchange.outcome = "client_gone"
                exchange.record("the client hung up before the upstream answered")
                return None
        else:
            upstream = await asking  # receive() is the body's until it is sent
    except Exception as exc:
        # A streamed request body can fail the request from the client's side too.
        if exchange.outcome == "client_gone":
            exchange.record("the client hung up while sending its request")
            return None
        if exchange.body_refused is not None:
            raise exchange.body_refused from None
        exchange.upstream_seconds += time.perf_counter() - sent
        if isinstance(exc, aiohttp.ConnectionTimeoutError):
            failed = UpstreamFailed(f"upstream {route.name} timed out", timed_out=True)
            raise Unreached(failed, "connect timeout") from None
        if isinstance(exc, TimeoutError):
            # Silent for the idle timeout after the request went: it may be running
            # upstream, and it has waited long enough. Never sent again.
            raise UpstreamFailed(f"upstream {route.name} timed out", timed_out=True) from None
        if isinstance(exc, aiohttp.ClientConnectionError):
            # Refused, reset, or closed with no answer: nothing came back to pass on.
            name = type(exc).__name__
            failed = UpstreamFailed(f"upstream {route.name} unreachable ({name})")
            raise Unreached(failed, f"unreachable ({name})") from None
        if isinstance(exc, aiohttp.ClientError):
            raise UpstreamFailed(
                f"upstream {route.name} unreachable ({type(exc).__name__})"
            ) from None
        raise
    exchange.upstream_seconds += time.perf_counter() - sent
    return upstream


def _response_headers(upstream: aiohttp.ClientResponse) -> Headers:
    return [
        (name.lower(), value)
        for name, value in upstream.raw_headers
        if (name.lower() not in HOP_BY_HOP or name.lower() == b"content-length")
        and name.lower() not in UPSTREAM_ONLY_HEADERS
    ]


def _start_answer(upstream: aiohttp.ClientResponse, exchange: Exchange) -> Message:
    """The answer's start as the client gets it, and the meter that reads its body."""
    headers = _response_headers(upstream)
    content_type = upstream.headers.get("content-type", "")
    if content_type.startswith("text/event-stream"):
        headers.append((b"x-accel-buffering", b"no"))
    headers.append(exchange.server_timing())
    exchange.meter = UsageMeter(
        content_type=content_type,
        content_encoding=upstream.headers.get("content-encoding", ""),
        jsonl=bool(exchange.batch_results) and upstream.status == 200,
        dialect=exchange.wire.dialect,
    )
    return {"type": "http.response.start", "status": upstream.status, "headers": headers}


async def _send_whole(send: Send, upstream: aiohttp.ClientResponse, exchange: Exchange) -> None:
    """An answer that had fully arrived with its headers (most JSON answers): passed on at
    once, with nothing left to wait for upstream and so nothing to watch."""
    start = _start_answer(upstream, exchange)
    body = upstream.content.read_nowait()
    assert exchange.meter is not None
    exchange.meter.feed(body)
    exchange.body_complete = True
    await send(start)
    await send({"type": "http.response.body", "body": body})


async def _stream(
    receive: Receive,
    send: Send,
    upstream: aiohttp.ClientResponse,
    exchange: Exchange,
    access_cache: AccessCache,
    watcher: Hangup | None,
) -> None:
    content_type = upstream.headers.get("content-type", "")
    await send(_start_answer(upstream, exchange))
    pump = asyncio.ensure_future(_pump(send, upstream, exchange))
    # The call's watcher when it has one (Hangup.close ends it), else one for the answer.
    hangup = (
        watcher.task if watcher is not None else asyncio.ensure_future(wait_for_disconnect(receive))
    )
    withdrawn = access_cache.watch(exchange.token_digest, exchange.backend)
    waiting: set[asyncio.Future[Any]] = {pump, hangup, withdrawn}
    try:
        await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if watcher is None:
            hangup.cancel()
        reason = withdrawn.result() if withdrawn.done() and not withdrawn.cancelled() else ""
        access_cache.unwatch(exchange.token_digest, withdrawn)
        if not pump.done():
            # The client hung up, its access was withdrawn, or this task was cancelled:
            # stop reading upstream.
            pump.cancel()
            exchange.outcome = "revoked" if reason else "client_gone"
            with contextlib.suppress(asyncio.CancelledError):
                await pump
    if exchange.outcome == "revoked":
        await _close_withdrawn(send, content_type, exchange, reason)
    elif exchange.outcome != "client_gone":
        pump.result()  # re-raises UpstreamBroke


async def _close_withdrawn(send: Send, content_type: str, exchange: Exchange, reason: str) -> None:
    """End a call whose access was withdrawn: an SSE stream between two events gets an
    error event the SDKs raise, anything else has its connection cut."""
    message = f"{reason}: this call was closed"
    if not (content_type.startswith("text/event-stream") and exchange.at_frame_end):
        raise AccessWithdrawn(message)
    error = AccessDenied(401, "authentication_error", message).body_in(exchange.wire)
    frame = exchange.wire.stream_error_frame(error)
    await send({"type": "http.response.body", "body": frame, "more_body": False})
    exchange.note = message


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
    send: Send, upstream: aiohttp.ClientResponse, route: Route, exchange: Exchange
) -> None:
    """A batch's ``results_url`` points at the upstream; the client must call the proxy."""
    reading = time.perf_counter()
    try:
        raw = await upstream.read()
    except (TimeoutError, aiohttp.ClientError) as exc:
        raise UpstreamFailed(f"upstream {route.name} broke off ({type(exc).__name__})") from None
    exchange.upstream_seconds += time.perf_counter() - reading
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
    headers = [(k, v) for k, v in _response_headers(upstream) if k != b"content-length"]
    headers.append((b"content-length", str(len(body)).encode()))
    headers.append(exchange.server_timing())
    await send({"type": "http.response.start", "status": upstream.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


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


def _is_json(response: aiohttp.ClientResponse) -> bool:
    return response.headers.get("content-type", "").startswith("application/json")


def _is_event_stream(response: aiohttp.ClientResponse) -> bool:
    return response.headers.get("content-type", "").startswith("text/event-stream")


async def wait_for_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def usage_settle(exchange: Exchange) -> None:
    """Count a metered call's usage in place of what it reserved at admission.

    record() has finished the meter: its usage is the whole call's, streamed or not, and
    counts toward the window the call started in. Usage the meter could not read leaves
    the reservation standing; a call that got no answer gives it back. The cost is the one
    record() put on the audit event: None (unknown) counts nothing toward USD budgets.
    """
    ticket = exchange.ticket
    if ticket is None:
        return
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
            gate.settle_batch(ticket, exchange.batch_results, tokens, exchange.cost_usd)
        return
    gate.settle(ticket, tokens, exchange.cost_usd)
