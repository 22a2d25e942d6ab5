"""A fake Anthropic API on a real socket, speaking the real wire format.

It records every request (method, path, headers) so tests can assert what reached the
upstream, and can be told which keys are valid, which are forbidden and how long to hang.
It answers /v1/models, /v1/messages (JSON, or SSE when asked to stream, with a configurable
number of deltas and gap between them), count_tokens and message batches; it can answer
the next request with a scripted error, cut a stream midway, or gzip its JSON.

It is also a workload identity federation relying party: ``POST /v1/oauth/token`` takes an
RFC 7523 jwt-bearer assertion, fetches the issuer's discovery document and JWKS over HTTP,
verifies the signature (with joserfc, not keybroker's PyJWT), ``iss``, ``aud``, ``exp`` and
the rule's subject, refuses a ``jti`` it saw before, and answers an ``sk-ant-oat01-…`` access
token that its API then accepts as a Bearer token.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import secrets
import threading
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx
import uvicorn
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet

from tests.waiting import wait_until

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

OAUTH_BETA = "oauth-2025-04-20"
FEDERATION_BETA = "oidc-federation-2026-04-01"
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
ANTHROPIC_AUDIENCE = "https://api.anthropic.com"
MODELS = [
    {
        "type": "model",
        "id": "claude-sonnet-4-5-20250929",
        "display_name": "Claude Sonnet 4.5",
        "created_at": "2025-09-29T00:00:00Z",
    },
    {
        "type": "model",
        "id": "claude-haiku-4-5-20251001",
        "display_name": "Claude Haiku 4.5",
        "created_at": "2025-10-01T00:00:00Z",
    },
]


@dataclass
class SeenRequest:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes


async def received(scope: Scope, receive: Receive) -> SeenRequest:
    """The whole request as a fake upstream sees it, its body read to the end."""
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
    return SeenRequest(
        scope["method"], scope["path"], scope["query_string"].decode(), headers, body
    )


@dataclass(frozen=True)
class FederationRule:
    """What the Claude Console's issuer + federation rule say: trust ``issuer``'s JWTs whose
    ``aud`` is ``audience`` (and ``sub`` is ``subject``, when set) for this organization."""

    issuer: str
    organization_id: str
    subject: str | None = None
    audience: str = ANTHROPIC_AUDIENCE
    service_account_id: str | None = None


@dataclass
class SeenExchange:
    claims: dict[str, Any]
    header: dict[str, Any]
    request: dict[str, Any]  # the body without the assertion
    headers: dict[str, str]
    access_token: str


class AssertionRefused(Exception):
    pass


@dataclass
class FakeAnthropic:
    valid_keys: set[str] = field(default_factory=set)
    forbidden_keys: set[str] = field(default_factory=set)
    hang_seconds: float = 0.0
    requests: list[SeenRequest] = field(default_factory=list)
    url: str = ""
    stream_deltas: int = 5
    stream_gap_seconds: float = 0.0
    cut_stream_after: int | None = None
    gzip_json: bool = False
    scripted: list[tuple[int, dict[str, str], Any]] = field(default_factory=list)
    batches: dict[str, dict[str, Any]] = field(default_factory=dict)
    streams_abandoned: int = 0
    federation_rules: dict[str, FederationRule] = field(default_factory=dict)
    exchanges: list[SeenExchange] = field(default_factory=list)
    exchange_refusals: list[str] = field(default_factory=list)
    access_token_lifetime: int = 3600
    exchange_delay: float = 0.0
    seen_jtis: set[str] = field(default_factory=set)
    # custom_ids whose batch result is "errored" (no usage) instead of "succeeded".
    results_errored: set[str] = field(default_factory=set)
    # x-api-key → the answer every request with that key gets (a rate-limited key, say).
    key_answers: dict[str, tuple[int, dict[str, str], Any]] = field(default_factory=dict)

    def reset(self) -> None:
        self.federation_rules.clear()
        self.exchanges.clear()
        self.exchange_refusals.clear()
        self.access_token_lifetime = 3600
        self.exchange_delay = 0.0
        self.seen_jtis.clear()
        self.results_errored.clear()
        self.key_answers.clear()
        self.valid_keys.clear()
        self.forbidden_keys.clear()
        self.hang_seconds = 0.0
        self.requests.clear()
        self.stream_deltas = 5
        self.stream_gap_seconds = 0.0
        self.cut_stream_after = None
        self.gzip_json = False
        self.scripted.clear()
        self.batches.clear()
        self.streams_abandoned = 0

    def answer_next(self, status: int, payload: Any, **headers: str) -> None:
        """The next request gets this answer, whatever it asked."""
        self.scripted.append(
            (status, {k.replace("_", "-"): v for k, v in headers.items()}, payload)
        )

    def answer_key(self, key: str, status: int, payload: Any, **headers: str) -> None:
        """Every request carrying ``key`` gets this answer, until told otherwise."""
        self.key_answers[key] = (
            status,
            {k.replace("_", "-"): v for k, v in headers.items()},
            payload,
        )

    def seen_keys(self) -> list[str]:
        """The x-api-key of each request, in order."""
        return [seen.headers.get("x-api-key", "") for seen in self.requests]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        seen = await received(scope, receive)
        self.requests.append(seen)
        headers, body = seen.headers, seen.body
        if self.hang_seconds:
            await asyncio.sleep(self.hang_seconds)
        if self.scripted:
            status, extra, payload = self.scripted.pop(0)
            await self._json(send, status, payload, extra)
            return
        if headers.get("x-api-key") in self.key_answers:
            status, extra, payload = self.key_answers[headers["x-api-key"]]
            await self._json(send, status, payload, extra)
            return
        if (scope["method"], scope["path"]) == ("POST", "/v1/oauth/token"):
            status, payload = await self._oauth_token(headers, body)
            await self._json(send, status, payload)
            return
        method, path = scope["method"], scope["path"]
        status, payload = self._route(method, path, headers)
        if status == 200 and method == "POST" and path == "/v1/messages":
            request = json.loads(body)
            if request.get("stream"):
                await self._stream(receive, send, request)
                return
            payload = message_body(request)
        elif status == 200 and path.startswith("/v1/messages/batches"):
            status, payload = self._batches(method, path, json.loads(body or b"{}"))
            if path.endswith("/results") and status == 200:
                await self._results(send, payload)
                return
        accepts_gzip = "gzip" in headers.get("accept-encoding", "")
        await self._json(send, status, payload, gzip_it=self.gzip_json and accepts_gzip)

    async def _oauth_token(self, headers: dict[str, str], body: bytes) -> tuple[int, Any]:
        """The jwt-bearer exchange, checked the way a relying party must check it."""
        betas = [flag.strip() for flag in headers.get("anthropic-beta", "").split(",")]
        if OAUTH_BETA not in betas or FEDERATION_BETA not in betas:
            return 400, oauth_error("invalid_request", "anthropic-beta lacks the federation flags")
        try:
            request = json.loads(body)
        except ValueError:
            return 400, oauth_error("invalid_request", "body is not JSON")
        if request.get("grant_type") != JWT_BEARER:
            return 400, oauth_error("unsupported_grant_type", "use the jwt-bearer grant")
        rule = self.federation_rules.get(request.get("federation_rule_id", ""))
        try:
            if rule is None or request.get("organization_id") != rule.organization_id:
                raise AssertionRefused("no such federation rule in this organization")
            if rule.service_account_id and (
                request.get("service_account_id") != rule.service_account_id
            ):
                raise AssertionRefused("service account does not match the rule")
            header, claims = await self._verify(str(request.get("assertion", "")), rule)
        except AssertionRefused as refused:
            self.exchange_refusals.append(str(refused))
            return 401, oauth_error("invalid_grant", str(refused))
        if self.exchange_delay:
            await asyncio.sleep(self.exchange_delay)
        token = f"sk-ant-oat01-{secrets.token_urlsafe(32)}"
        self.valid_keys.add(token)
        self.exchanges.append(
            SeenExchange(
                claims=claims,
                header=header,
                request={k: v for k, v in request.items() if k != "assertion"},
                headers=headers,
                access_token=token,
            )
        )
        return 200, {
            "access_token": token,
            "token_type": "Bearer",
            "expires_in": self.access_token_lifetime,
            "scope": "workspace:inference",
        }

    async def _verify(
        self, assertion: str, rule: FederationRule
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        try:
            payload = assertion.split(".")[1]
            unverified = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
            issuer = unverified["iss"]
        except (IndexError, ValueError, KeyError, TypeError):
            raise AssertionRefused("assertion is not a JWT with an iss") from None
        if issuer != rule.issuer:
            raise AssertionRefused(f"issuer {issuer} is not trusted by this rule")
        # As Anthropic does: discovery first, then the JWKS it names, both over HTTP.
        async with httpx.AsyncClient(timeout=10) as http:
            discovery = (await http.get(f"{issuer}/.well-known/openid-configuration")).json()
            if discovery.get("issuer") != issuer:
                raise AssertionRefused("discovery document names another issuer")
            jwks = (await http.get(discovery["jwks_uri"])).json()
        try:
            token = jwt.decode(
                assertion, KeySet.import_key_set(jwks), algorithms=["ES256", "RS256"]
            )
        except JoseError as exc:
            raise AssertionRefused(f"signature: {exc.error}: {exc.description}") from None
        claims = dict(token.claims)
        expected: dict[str, Any] = {
            "iss": {"essential": True, "value": issuer},
            "aud": {"essential": True, "value": rule.audience},
            "exp": {"essential": True},
            "iat": {"essential": True},
        }
        if rule.subject is not None:
            expected["sub"] = {"essential": True, "value": rule.subject}
        try:
            jwt.JWTClaimsRegistry(**expected).validate(claims)
        except JoseError as exc:
            raise AssertionRefused(f"claims: {exc.error}: {exc.description}") from None
        jti = claims.get("jti")
        if jti is not None:
            if jti in self.seen_jtis:
                raise AssertionRefused("jti was already used (replay)")
            self.seen_jtis.add(jti)
        return dict(token.header), claims

    def _credential(self, headers: dict[str, str]) -> tuple[str, str] | None:
        if "x-api-key" in headers:
            return "x-api-key", headers["x-api-key"]
        auth = headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            return "bearer", auth[7:]
        return None

    def _route(self, method: str, path: str, headers: dict[str, str]) -> tuple[int, Any]:
        credential = self._credential(headers)
        if credential is None:
            return 401, error("authentication_error", "x-api-key header is required")
        scheme, secret = credential
        if scheme == "bearer" and OAUTH_BETA not in headers.get("anthropic-beta", ""):
            return 401, error(
                "authentication_error", "OAuth authentication is currently not supported."
            )
        if secret in self.forbidden_keys:
            return 403, error(
                "permission_error",
                "Your API key does not have permission to use the specified resource.",
            )
        if secret not in self.valid_keys:
            return 401, error("authentication_error", "invalid x-api-key")
        if method == "POST" and path == "/v1/messages/count_tokens":
            return 200, {"input_tokens": 42}
        if path == "/v1/messages" or path.startswith("/v1/messages/batches"):
            return 200, None
        if method == "GET" and path == "/v1/models":
            return 200, {
                "data": MODELS,
                "has_more": False,
                "first_id": MODELS[0]["id"],
                "last_id": MODELS[-1]["id"],
            }
        return 404, error("not_found_error", f"Not found: {path}")

    @staticmethod
    async def _json(
        send: Send,
        status: int,
        payload: Any,
        extra: dict[str, str] | None = None,
        *,
        gzip_it: bool = False,
    ) -> None:
        # Bytes are sent as they are: a test's hostile body (a bomb, a lie).
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"request-id", f"req_{uuid.uuid4().hex[:24]}".encode()),
            *[(k.encode(), v.encode()) for k, v in (extra or {}).items()],
        ]
        if gzip_it:
            body = gzip.compress(body)
            headers.append((b"content-encoding", b"gzip"))
        headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _stream(self, receive: Receive, send: Send, request: dict[str, Any]) -> None:
        """SSE frames; a client that hangs up mid-stream is counted in streams_abandoned."""
        streaming = asyncio.ensure_future(self._send_frames(send, request))
        hangup = asyncio.ensure_future(receive())
        await asyncio.wait({streaming, hangup}, return_when=asyncio.FIRST_COMPLETED)
        if not streaming.done():
            streaming.cancel()
            self.streams_abandoned += 1
            return
        hangup.cancel()
        streaming.result()

    async def _send_frames(self, send: Send, request: dict[str, Any]) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"text/event-stream; charset=utf-8"),
                    (b"cache-control", b"no-cache"),
                    (b"request-id", f"req_{uuid.uuid4().hex[:24]}".encode()),
                ],
            }
        )
        for number, frame in enumerate(sse_frames(request, self.stream_deltas)):
            if self.cut_stream_after is not None and number >= self.cut_stream_after:
                raise ConnectionAbortedError("the fake upstream cuts the stream")
            if number > 2 and self.stream_gap_seconds:
                await asyncio.sleep(self.stream_gap_seconds)
            await send({"type": "http.response.body", "body": frame, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    def _batches(self, method: str, path: str, body: dict[str, Any]) -> tuple[int, Any]:
        parts = path.removeprefix("/v1/messages/batches").strip("/").split("/")
        if method == "POST" and parts == [""]:
            batch_id = f"msgbatch_{uuid.uuid4().hex[:24]}"
            self.batches[batch_id] = {
                "id": batch_id,
                "type": "message_batch",
                "processing_status": "ended",
                "request_counts": {
                    "processing": 0,
                    "succeeded": len(body.get("requests", [])),
                    "errored": 0,
                    "canceled": 0,
                    "expired": 0,
                },
                "created_at": "2026-11-23T00:00:00Z",
                "ended_at": "2026-11-23T00:01:00Z",
                "expires_at": "2026-11-24T00:00:00Z",
                "archived_at": None,
                "cancel_initiated_at": None,
                "results_url": f"{self.url}/v1/messages/batches/{batch_id}/results",
                "_custom_ids": [r.get("custom_id") for r in body.get("requests", [])],
            }
            return 200, {k: v for k, v in self.batches[batch_id].items() if k[0] != "_"}
        batch = self.batches.get(parts[0])
        if batch is None:
            return 404, error("not_found_error", f"batch {parts[0]} not found")
        if parts[1:] == ["results"]:
            return 200, batch
        return 200, {k: v for k, v in batch.items() if k[0] != "_"}

    async def _results(self, send: Send, batch: dict[str, Any]) -> None:
        """JSON Lines as Anthropic sends them; a succeeded message carries its usage."""
        failed = {
            "type": "errored",
            "error": error("invalid_request_error", "max_tokens: field required"),
        }
        lines = [
            json.dumps(
                {
                    "custom_id": custom_id,
                    "result": failed
                    if custom_id in self.results_errored
                    else {"type": "succeeded", "message": message_body({"model": "claude"})},
                }
            )
            for custom_id in batch["_custom_ids"]
        ]
        body = ("\n".join(lines) + "\n").encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/binary")],
            }
        )
        await send({"type": "http.response.body", "body": body})


def message_body(request: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": f"msg_{uuid.uuid4().hex[:24]}",
        "type": "message",
        "role": "assistant",
        "model": request.get("model", "claude-haiku-4-5"),
        "content": [{"type": "text", "text": "Hello from the fake."}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {
            "input_tokens": 12,
            "output_tokens": 6,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 3,
        },
    }


def sse_frames(request: dict[str, Any], deltas: int) -> list[bytes]:
    """A streamed message as Anthropic sends it, one frame per list item."""

    def frame(event: str, data: dict[str, Any]) -> bytes:
        return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()

    start = message_body(request)
    start.update(content=[], stop_reason=None)
    start["usage"] = {**start["usage"], "output_tokens": 1}
    frames = [
        frame("message_start", {"type": "message_start", "message": start}),
        frame(
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            },
        ),
        frame("ping", {"type": "ping"}),
    ]
    for number in range(deltas):
        frames.append(
            frame(
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "text_delta", "text": f"word{number} "},
                },
            )
        )
    frames += [
        frame("content_block_stop", {"type": "content_block_stop", "index": 0}),
        frame(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": deltas * 2},
            },
        ),
        frame("message_stop", {"type": "message_stop"}),
    ]
    return frames


def oauth_error(error: str, description: str) -> dict[str, str]:
    return {"error": error, "error_description": description}


def error(error_type: str, message: str) -> dict[str, Any]:
    return {
        "type": "error",
        "error": {"type": error_type, "message": message},
        "request_id": f"req_{uuid.uuid4().hex[:24]}",
    }


def serve_in_thread(
    app: Any,
    port: int,
    *,
    lifespan: Literal["auto", "on", "off"] = "off",
    host: str = "127.0.0.1",
    keep_alive: int = 5,  # uvicorn's default, as many upstreams close idle connections
) -> uvicorn.Server:
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=host,
            port=port,
            lifespan=lifespan,
            timeout_keep_alive=keep_alive,
            log_level="warning",
            # As serve runs it by default: no forwarded headers are believed.
            proxy_headers=False,
        )
    )
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    server.thread = thread  # type: ignore[attr-defined]
    wait_until(lambda: server.started, timeout=15, what=f"uvicorn to start on port {port}")
    return server
