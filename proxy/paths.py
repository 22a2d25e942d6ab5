"""Where a proxied request may go: a path on the backend's own host, and nowhere else."""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from keybroker.wire import PROXY_PREFIX

PREFIX = PROXY_PREFIX.encode()
_BACKEND = re.compile(rb"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
# Encoded slashes, backslashes and dots would let a path be read differently upstream; a
# ? or # in the path would start the URL's query or fragment and drop the client's query;
# control bytes and spaces have no place in a request line.
_SMUGGLING = re.compile(r"%(2f|5c|2e|00)|[\\?#\x00-\x20\x7f]", re.IGNORECASE)


class PathRefused(ValueError):
    pass


@dataclass(frozen=True)
class ProxyPath:
    backend: str
    path: str  # raw, as the client sent it: "/v1/messages"


def proxy_path_parse(raw_path: bytes) -> ProxyPath | None:
    """``/v1/proxy/{backend}/{path}`` split in two; None when it is not a proxy path."""
    if not raw_path.startswith(PREFIX):
        return None
    backend, slash, rest = raw_path[len(PREFIX) :].partition(b"/")
    if not _BACKEND.match(backend):
        return None
    try:
        # The bare base URL (clients probe it with HEAD) is the upstream's root.
        path = (slash + rest).decode("ascii") or "/"
    except UnicodeDecodeError:
        raise PathRefused("the path must be ASCII (percent-encode anything else)") from None
    return ProxyPath(backend.decode(), path)


def upstream_url(base_url: str, path: str, query: bytes) -> str:
    """The backend's base URL plus the client's path; refuses anything that could leave it."""
    if not path.startswith("/") or path.startswith("//"):
        raise PathRefused("the path after the backend name must start with a single /")
    if _SMUGGLING.search(path):
        raise PathRefused(
            "the path holds encoded slashes, dots, backslashes, ? or # or control bytes"
        )
    if "/." in path and any(segment in {".", ".."} for segment in path.split("/")):
        raise PathRefused("the path must not hold . or .. segments")
    base = urlsplit(base_url)
    url = f"{base.scheme}://{base.netloc}{base.path}{path}"
    if query:
        try:
            url += "?" + query.decode("ascii")
        except UnicodeDecodeError:
            raise PathRefused("the query must be ASCII") from None
        if b"#" in query:
            raise PathRefused("the query must not hold # (it would end the query upstream)")
    parsed = urlsplit(url)
    if (parsed.scheme, parsed.netloc) != (base.scheme, base.netloc):
        raise PathRefused("the path would leave the backend's host")
    return url
