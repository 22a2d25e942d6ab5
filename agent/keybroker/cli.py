"""`keybroker`, the agent-side command: enroll, wait for approval, mint short-lived tokens.

It runs on the agent's machine, so it needs httpx and the standard library only: importing
Django (or anything from the project but the version string) here would drag the whole server
onto every agent. Usage and exit codes are documented in docs/agent-cli.md.
"""

from __future__ import annotations

import argparse
import contextlib
import email.utils
import getpass
import json
import os
import random
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import quote, urlsplit

import httpx

from keybroker import __version__
from keybroker.wire import duration_format, duration_parse, is_loopback_host, redact

EXIT_OK = 0
EXIT_ERROR = 1  # the server refused the request, or anything else went wrong
EXIT_USAGE = 2  # argparse's own code for a bad command line
EXIT_NOT_APPROVED = 3  # pending, rejected, or no grant for that backend
EXIT_TIMEOUT = 4  # still pending when --timeout ran out
EXIT_UNREACHABLE = 5  # no answer from the server at all
EXIT_NOT_ENROLLED = 6  # no config, or the server no longer knows this agent
EXIT_INTERRUPTED = 130  # the shell's convention for Ctrl-C

ENROLL_HINT = "run keybroker enroll URL --name N --can BACKEND"
# The token cache beside the config, and its lock (keybroker/credentials.py).
CACHE_FILE = "tokens.json"
CACHE_LOCK_FILE = "tokens.lock"
VEND_TOKEN_START = "ckr_"  # noqa: S105 (the kind of a vend token, not one)
DEFAULT_TIMEOUT = 600.0
DEFAULT_POLL_INTERVAL = 2.0
MAX_POLL_INTERVAL = 10.0  # an admin who approves should not wait long for the agent to notice
HTTP_TIMEOUT = httpx.Timeout(30.0, connect=10.0)

# Server messages are redacted server-side already; this is the last line of defence so that
# no vend token (ckr_), client secret (cks_) or access token (crd_) ever reaches stderr.


class CliError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Config:
    url: str
    name: str
    agent_id: str | int
    vend_token: str
    # OAuth client credentials for /oauth/token, created on first use (identity-token).
    client_id: str | None = None
    client_secret: str | None = None


def _note(message: str) -> None:
    print("keybroker: " + redact(message, keep_kind=True), file=sys.stderr, flush=True)


# --- durations -------------------------------------------------------------------------------


def parse_duration(text: str) -> float:
    """`90s`, `5m`, `1h` or plain seconds, as seconds (argparse's type for durations)."""
    try:
        return duration_parse(text, whole=False)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


# --- config ----------------------------------------------------------------------------------


def config_path(override: str | None = None) -> Path:
    """--config, then $KEYBROKER_CONFIG, then the XDG location."""
    chosen = override or os.environ.get("KEYBROKER_CONFIG")
    if chosen:
        return Path(chosen).expanduser()
    xdg = os.environ.get("XDG_CONFIG_HOME", "")
    # The XDG spec says a relative XDG_CONFIG_HOME is invalid and must be ignored.
    root = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".config"
    return root / "keybroker" / "config.json"


def load_config(path: Path) -> Config | None:
    try:
        raw = path.read_text(encoding="utf-8")
        mode = path.stat().st_mode
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise CliError(EXIT_ERROR, f"cannot read {path} ({exc.strerror})") from None
    if mode & 0o077:
        _note(f"warning: {path} is readable by other users; run chmod 600 {path}")
    broken = CliError(EXIT_ERROR, f"{path} is not a keybroker config; delete it and enroll again")
    try:
        data = json.loads(raw)
    except ValueError:
        raise broken from None
    if not isinstance(data, dict):
        raise broken
    url, name, agent_id, token = (data.get(k) for k in ("url", "name", "agent_id", "vend_token"))
    if not (isinstance(url, str) and isinstance(name, str) and isinstance(token, str)):
        raise broken
    if not isinstance(agent_id, str | int):
        raise broken
    try:
        url = server_url(url)
    except CliError:
        raise broken from None
    client_id, client_secret = data.get("client_id"), data.get("client_secret")
    if not (isinstance(client_id, str) and isinstance(client_secret, str)):
        client_id = client_secret = None  # created again when needed
    return Config(
        url=url,
        name=name,
        agent_id=agent_id,
        vend_token=token,
        client_id=client_id,
        client_secret=client_secret,
    )


def require_config(path: Path) -> Config:
    config = load_config(path)
    if config is None:
        raise CliError(EXIT_NOT_ENROLLED, f"not enrolled; {ENROLL_HINT}")
    return config


def save_config(path: Path, config: Config) -> None:
    """Write atomically, private from the first byte: the vend token is a long-lived secret."""
    directory = path.parent
    try:
        if not directory.exists():
            directory.mkdir(mode=0o700, parents=True)
            # mkdir's mode is filtered through the umask; this directory must be private anyway.
            directory.chmod(0o700)
    except OSError as exc:
        raise CliError(EXIT_ERROR, f"cannot write {path} ({exc.strerror})") from None
    # Fields never set stay out, so a config reads the same as before they existed.
    fields = {key: value for key, value in asdict(config).items() if value is not None}
    write_private(path, json.dumps(fields, indent=2) + "\n", prefix=".config-")


def write_private(path: Path, text: str, *, prefix: str = ".keybroker-") -> None:
    """Replace ``path`` atomically with a file only its owner can read, whatever the umask:
    a reader sees the old content or the new, never a part, and never a readable secret."""
    try:
        # mkstemp creates the file 0600 whatever the umask, so the secret is never exposed.
        fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=prefix, suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
            raise
    except OSError as exc:
        raise CliError(EXIT_ERROR, f"cannot write {path} ({exc.strerror})") from None


# --- HTTP ------------------------------------------------------------------------------------


def server_url(text: str) -> str:
    parts = urlsplit(text.strip())
    if (
        parts.scheme not in ("http", "https")
        or not parts.hostname
        or parts.username is not None
        or parts.query
        or parts.fragment
    ):
        raise CliError(
            EXIT_USAGE, f"{text!r} is not a server URL; use e.g. https://keys.example.com"
        )
    return text.strip().rstrip("/")


class Server:
    def __init__(self, url: str, vend_token: str | None = None) -> None:
        headers = {"User-Agent": f"keybroker-cli/{__version__}", "Accept": "application/json"}
        if vend_token is not None:
            headers["Authorization"] = f"Bearer {vend_token}"
        self.url = url
        self._client = httpx.Client(base_url=url, headers=headers, timeout=HTTP_TIMEOUT)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._client.close()

    def request(
        self, method: str, path: str, body: object = None, *, form: dict[str, str] | None = None
    ) -> httpx.Response:
        try:
            return self._client.request(method, path, json=body, data=form)
        except httpx.TimeoutException:
            raise CliError(EXIT_UNREACHABLE, f"cannot reach {self.url} (timed out)") from None
        except httpx.TransportError as exc:
            reason = str(exc) or type(exc).__name__
            raise CliError(EXIT_UNREACHABLE, f"cannot reach {self.url} ({reason})") from None
        except httpx.RequestError as exc:
            raise CliError(EXIT_ERROR, f"bad answer from {self.url} ({exc})") from None


def expect(response: httpx.Response, *ok: int) -> Any:
    """The decoded JSON of an expected answer (None for an empty one), else a CliError."""
    if response.status_code not in ok:
        raise error_for(response)
    if not response.content:
        return None
    try:
        return response.json()
    except ValueError:
        raise CliError(
            EXIT_ERROR,
            f"HTTP {response.status_code} from {response.url} is not JSON; "
            "is that a keybroker server?",
        ) from None


def retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after", "").strip()
    if not value:
        return None
    with contextlib.suppress(ValueError):
        return max(0.0, float(value))
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    seconds: float = when.timestamp() - time.time()
    return max(0.0, seconds)


def _server_message(response: httpx.Response) -> str:
    with contextlib.suppress(ValueError, TypeError, KeyError):
        message = response.json()["error"]["message"]
        if isinstance(message, str) and message.strip():
            return " ".join(message.split())  # one line, whatever the server sent
    return f"the server answered HTTP {response.status_code} {response.reason_phrase}".rstrip()


def error_for(response: httpx.Response) -> CliError:
    message = _server_message(response)
    status = response.status_code
    if status == 401:
        return CliError(
            EXIT_NOT_ENROLLED,
            f"{message}; the server does not know this agent (unenrolled?); {ENROLL_HINT}",
        )
    if status == 403:
        return CliError(EXIT_NOT_APPROVED, message)
    if status == 429 and (wait := retry_after(response)) is not None:
        return CliError(EXIT_ERROR, f"{message} (retry in {duration_format(round(wait))})")
    return CliError(EXIT_ERROR, message)


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise CliError(EXIT_ERROR, f"unexpected {what} from the server")
    return value


def _words(value: Any) -> str:
    if isinstance(value, list) and value:
        return ", ".join(str(item) for item in value)
    return "none"


# --- enroll ----------------------------------------------------------------------------------


def _jittered(seconds: float) -> float:
    # Only ever later, never sooner: a Retry-After is a minimum. Jitter keeps a fleet of agents
    # enrolled at the same moment from polling in lockstep; it is not a security measure.
    return seconds * random.uniform(1.0, 1.2)  # noqa: S311


def wait_for_verdict(server: Server, timeout: float, interval: float) -> dict[str, Any]:
    """Poll /v1/enroll/status while pending, up to the deadline; the last status seen.

    A broker that restarts or sheds load while we wait must not end a wait that has time left,
    so unreachable, 429 and 5xx answers are retried; only the last one counts at the deadline.
    """
    deadline = time.monotonic() + timeout
    delay = interval
    while True:
        pause = delay
        last: dict[str, Any] | CliError
        try:
            response = server.request("GET", "/v1/enroll/status")
        except CliError as exc:
            if exc.code != EXIT_UNREACHABLE:
                raise
            last = exc
        else:
            if response.status_code == 429 or response.status_code >= 500:
                pause = retry_after(response) or delay
                last = error_for(response)
            else:
                last = _object(expect(response, 200), "enrollment status")
                if last.get("status") != "pending":
                    return last
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            if isinstance(last, CliError):
                raise last
            return last
        time.sleep(min(_jittered(pause), remaining))
        delay = min(delay * 1.5, MAX_POLL_INTERVAL)


def cmd_enroll(args: argparse.Namespace, path: Path) -> int:
    url = server_url(args.url)
    if args.poll_interval <= 0:
        raise CliError(EXIT_USAGE, "--poll-interval must be more than 0")
    config = load_config(path)
    fresh = config is None
    if config is None:
        parts = urlsplit(url)
        if parts.scheme == "http" and not is_loopback_host(parts.hostname or ""):
            _note(f"warning: {url} is plain http; every token will cross the network unencrypted")
        body: dict[str, Any] = {"name": args.name, "scopes": args.can}
        if args.description:
            body["description"] = args.description
        with Server(url) as server:
            data = _object(expect(server.request("POST", "/v1/enroll", body), 201), "answer")
        token, agent_id = data.get("vend_token"), data.get("id")
        if not isinstance(token, str) or not isinstance(agent_id, str | int):
            raise CliError(EXIT_ERROR, "the server's enrollment answer has no vend token or id")
        config = Config(url=url, name=args.name, agent_id=agent_id, vend_token=token)
        save_config(path, config)
    elif (config.url, config.name) != (url, args.name):
        raise CliError(
            EXIT_ERROR,
            f"{path} already holds {config.name} at {config.url}; run keybroker unenroll "
            "first, or pass --config PATH for another agent",
        )
    who = f"{config.name} (id {config.agent_id})"
    admin = f"{config.url}/admin/"
    if fresh and args.timeout == 0:
        _note(f"enrolled as {who}; an admin must approve it at {admin}; see keybroker status")
        return EXIT_OK
    waiting = f"waiting up to {duration_format(args.timeout)}" if args.timeout else "checking"
    _note(
        f"{'enrolled' if fresh else 'already enrolled'} as {who}; "
        f"{waiting} for an admin to approve it at {admin}"
    )
    with Server(config.url, config.vend_token) as server:
        status = wait_for_verdict(server, args.timeout, args.poll_interval)
    verdict = status.get("status")
    if verdict == "approved":
        print(f"{config.name} is approved for: {_words(status.get('scopes'))}")
        return EXIT_OK
    if verdict == "rejected":
        rejection = status.get("rejection")
        reason = rejection.get("reason") if isinstance(rejection, dict) else None
        why = f" ({reason})" if isinstance(reason, str) and reason else ""
        raise CliError(
            EXIT_NOT_APPROVED, f"an admin rejected {config.name}{why}; it gets no tokens"
        )
    if verdict != "pending":
        raise CliError(EXIT_NOT_APPROVED, f"{config.name} is {verdict}; it gets no tokens")
    if args.timeout == 0:
        _note(f"{config.name} is still {verdict}; an admin must approve it at {admin}")
        return EXIT_OK
    raise CliError(
        EXIT_TIMEOUT,
        f"{config.name} is still {verdict} after {duration_format(args.timeout)}; the enrollment "
        f"is kept in {path}: run the same keybroker enroll again to keep waiting",
    )


def cmd_login(args: argparse.Namespace, path: Path) -> int:
    """Use a vend token an admin created (`manage.py agent create`): checked with the server,
    then written to the config as `enroll` writes it."""
    url = server_url(args.url)
    if args.vend_token == "-":  # noqa: S105 (stdin, not a token)
        token = sys.stdin.readline().strip()
    elif sys.stdin.isatty():
        token = getpass.getpass("vend token (ckr_…, not echoed): ").strip()
    else:
        raise CliError(EXIT_USAGE, "give the vend token on stdin with --vend-token -")
    if not token.startswith(VEND_TOKEN_START):
        raise CliError(
            EXIT_USAGE,
            f"a vend token starts with {VEND_TOKEN_START} (what `manage.py agent create` printed)",
        )
    existing = load_config(path)
    with Server(url, token) as server:
        data = _object(expect(server.request("GET", "/v1/enroll/status"), 200), "status")
    name, agent_id = data.get("name"), data.get("id")
    if not isinstance(name, str) or not isinstance(agent_id, str | int):
        raise CliError(EXIT_ERROR, "the server's status answer has no name or id")
    if existing is not None and (existing.url, existing.name) != (url, name):
        raise CliError(
            EXIT_ERROR,
            f"{path} already holds {existing.name} at {existing.url}; run keybroker unenroll "
            "first, or pass --config PATH for another agent",
        )
    save_config(path, Config(url=url, name=name, agent_id=agent_id, vend_token=token))
    print(
        f"logged in as {name} at {url} ({data.get('status')}; may use "
        f"{_words(data.get('scopes'))}); config in {path}"
    )
    return EXIT_OK


# --- the other commands ----------------------------------------------------------------------


def cmd_status(args: argparse.Namespace, path: Path) -> int:
    config = require_config(path)
    with Server(config.url, config.vend_token) as server:
        response = server.request("GET", "/v1/status")
        if response.status_code == 403:
            # /v1/status serves approved agents only; the enrollment view answers while
            # pending or rejected, so `status` always says where the agent stands.
            response = server.request("GET", "/v1/enroll/status")
        data = _object(expect(response, 200), "status")
    if args.json:
        print(json.dumps(data, indent=2))
        return EXIT_OK
    print(f"name:       {data.get('name', config.name)}")
    print(f"id:         {data.get('id', config.agent_id)}")
    print(f"server:     {config.url}")
    print(f"status:     {data.get('status')}")
    print(f"scopes:     {_words(data.get('scopes'))}")
    print(f"requested:  {_words(data.get('requested_scopes'))}")
    grants = data.get("grants")
    if isinstance(grants, list):
        print("grants:" if grants else "grants:     none")
        for item in grants:
            grant = _object(item, "grant")
            bounds = grant.get("ttl")
            if not isinstance(bounds, dict):
                bounds = {}
            ttl = "/".join(
                duration_format(v) if isinstance(v, int | float) else "?"
                for v in (bounds.get("min"), bounds.get("default"), bounds.get("max"))
            )
            print(f"  {grant.get('backend')}  {grant.get('base_url')}  ttl min/default/max {ttl}")
            limits = grant.get("limits")
            for line in _limit_lines(limits) if isinstance(limits, dict) else ():
                print(f"    {line}")
    rejection = data.get("rejection")
    if isinstance(rejection, dict):
        print(f"rejected:   {_rejection_words(rejection)}")
    return EXIT_OK


def _rejection_words(rejection: dict[str, Any]) -> str:
    """What an admin declined and why, as `status` and `enroll` say it."""
    reason = rejection.get("reason")
    declined = _words(rejection.get("declined"))
    return f"{declined} ({reason})" if isinstance(reason, str) and reason else declined


# /v1/status names its limits by their policy field; people read these.
# A window's usage comes back bit by bit ("more in"); a budget renews all at once.
_COUNTED = (
    ("rpm", "requests/min", "requests", "more in"),
    ("tpm", "tokens/min", "tokens", "more in"),
    ("daily_tokens", "tokens today", "tokens", "renews in"),
    ("daily_usd", "USD today", "USD", "renews in"),
    ("monthly_usd", "USD this month", "USD", "renews in"),
)


def _limit_lines(limits: dict[str, Any]) -> list[str]:
    """A grant's limits and what is left of them, one per line; "no limits" when none."""
    lines = []
    for field, what in (("models", "models"), ("paths", "paths")):
        if isinstance(allowed := limits.get(field), list) and allowed:
            lines.append(f"{what}: {', '.join(str(glob) for glob in allowed)}")
    if (cap := limits.get("max_tokens")) is not None:
        lines.append(f"max_tokens per request: {cap}")
    if (concurrent := limits.get("max_concurrent")) is not None:
        lines.append(f"calls at once: {concurrent}")
    for field, label, unit, comes_back in _COUNTED:
        counted = limits.get(field)
        if not isinstance(counted, dict):
            continue
        used, remaining, resets = (counted.get(k) for k in ("used", "remaining", "resets_in"))
        line = f"{label}: {counted.get('limit')}"
        if used is None:
            line += " (usage cannot be read now)"
        else:
            line += f", used {used}, {remaining} {unit} left"
            spent = used not in (0, "0", "0.00")
            if isinstance(resets, int | float) and resets > 0 and (spent or "renews" in comes_back):
                line += f", {comes_back} {duration_format(round(resets))}"
        lines.append(line)
    return lines or ["no limits"]


def mint(config: Config, backend: str, ttl: str | None) -> dict[str, Any]:
    # The server parses TTLs (and names its bounds when one is out of range); pass it verbatim.
    body = {} if ttl is None else {"ttl": ttl}
    with Server(config.url, config.vend_token) as server:
        response = server.request("POST", f"/v1/credentials/{quote(backend, safe='')}", body)
        data = _object(expect(response, 201), "credential")
    if not isinstance(data.get("token"), str) or not isinstance(data.get("base_url"), str):
        raise CliError(EXIT_ERROR, "the server's credential answer has no token or base_url")
    return data


def cmd_get(args: argparse.Namespace, path: Path) -> int:
    if args.cached:
        data = cached_token(path, args.backend, args.ttl)
    else:
        data = mint(require_config(path), args.backend, args.ttl)
    print(json.dumps(data, indent=2) if args.json else data["token"])
    return EXIT_OK


def cached_token(path: Path, backend: str, ttl: str | None) -> dict[str, Any]:
    """A live token from the shared cache beside the config, or a new one (cached)."""
    # Loaded here: keybroker.credentials builds on this module.
    from keybroker.credentials import CredentialsError, TokenStore, token_is_live

    try:
        # An apiKeyHelper has no force_refresh: the server is asked whether the cached token
        # is still live (revoked early?) before it is handed out again.
        cached = TokenStore(path).token(backend, ttl, live=token_is_live)
    except CredentialsError as exc:
        raise CliError(exc.code, str(exc)) from None
    expires = datetime.fromtimestamp(cached.expires, UTC).isoformat().replace("+00:00", "Z")
    return {
        "id": cached.id,
        "token": cached.token,
        "backend": cached.backend,
        "expires_at": expires,
        "ttl": cached.ttl,
        "base_url": cached.base_url,
    }


CLAUDE_SETTINGS = Path(".claude") / "settings.json"


def cmd_claude_settings(args: argparse.Namespace, path: Path) -> int:
    from keybroker.credentials import renew_margin

    data = cached_token(path, args.backend, args.ttl)
    command = [*_self_command(), "--config", str(path.resolve()), "get", args.backend, "--cached"]
    if args.ttl:
        command += ["--ttl", args.ttl]
    # Claude Code keeps the helper's key this long: half the time a cached token is still
    # served for, so the key it holds always has a quarter of that left at least.
    helper_ms = int(renew_margin(data["ttl"]) / 2 * 1000)
    settings: dict[str, Any] = {
        "apiKeyHelper": shlex.join(command),
        "env": {
            "ANTHROPIC_BASE_URL": data["base_url"],
            "CLAUDE_CODE_API_KEY_HELPER_TTL_MS": str(helper_ms),
        },
    }
    if not args.write:
        print(json.dumps(settings, indent=2))
        return EXIT_OK
    target = Path.cwd() / CLAUDE_SETTINGS
    merged = _json_object(target)
    merged["apiKeyHelper"] = settings["apiKeyHelper"]
    env = merged.get("env")
    merged["env"] = {**(env if isinstance(env, dict) else {}), **settings["env"]}
    target.parent.mkdir(parents=True, exist_ok=True)
    write_private(target, json.dumps(merged, indent=2) + "\n", prefix=".settings-")
    print(f"wrote apiKeyHelper and env to {target}")
    return EXIT_OK


def _self_command() -> list[str]:
    """How Claude Code can run this very keybroker, whatever its PATH."""
    script = Path(sys.argv[0])
    if script.name == "keybroker" and script.is_file():
        return [str(script.resolve())]
    found = shutil.which("keybroker")
    return [found] if found else [sys.executable, "-m", "keybroker.cli"]


def _json_object(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise CliError(EXIT_ERROR, f"{path} is not readable JSON ({exc}); fix or move it") from None
    if not isinstance(data, dict):
        raise CliError(EXIT_ERROR, f"{path} is not a JSON object; fix or move it")
    return data


def cmd_env(args: argparse.Namespace, path: Path) -> int:
    data = mint(require_config(path), args.backend, args.ttl)
    print(f"# keybroker: {args.backend} token, expires {data.get('expires_at')}")
    base_url, token = shlex.quote(data["base_url"]), shlex.quote(data["token"])
    if data.get("kind") == "openai":
        # What the OpenAI SDKs (and the tools built on them) read.
        print(f"export OPENAI_BASE_URL={base_url}")
        print(f"export OPENAI_API_KEY={token}")
        return EXIT_OK
    # The SDKs and Claude Code send ANTHROPIC_API_KEY as x-api-key next to the bearer token,
    # so a real key left in the environment would travel to keybroker and shadow the token.
    print("unset ANTHROPIC_API_KEY")
    print(f"export ANTHROPIC_BASE_URL={base_url}")
    print(f"export ANTHROPIC_AUTH_TOKEN={token}")
    return EXIT_OK


def cmd_ls(args: argparse.Namespace, path: Path) -> int:
    config = require_config(path)
    with Server(config.url, config.vend_token) as server:
        rows = expect(server.request("GET", "/v1/active"), 200)
    if not isinstance(rows, list):
        raise CliError(EXIT_ERROR, "unexpected token list from the server")
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    if not rows:
        _note("no live tokens")
        return EXIT_OK
    columns = ("id", "backend", "prefix", "expires_at")
    table = [[c.upper() for c in columns]]
    table += [[str(_object(row, "token").get(c, "")) for c in columns] for row in rows]
    _print_table(table)
    return EXIT_OK


def _print_table(table: list[list[str]]) -> None:
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    for line in table:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        )


USAGE_COLUMNS = (
    ("calls", "CALLS"), ("errors", "ERRORS"), ("refusals", "REFUSALS"), ("input_tokens", "IN"),
    ("output_tokens", "OUT"), ("cache_read_tokens", "CACHE READ"),
    ("cache_write_tokens", "CACHE WRITE"), ("cost_usd", "COST USD"),
)  # fmt: skip


def _usage_line(row: dict[str, Any]) -> list[str]:
    cells = [str(row.get(name, "")) for name, _ in USAGE_COLUMNS]
    unknown = row.get("cost_unknown_calls")
    if unknown:
        cells[-1] += f" +{unknown} unknown"  # never counted as 0
    return cells


def cmd_usage(args: argparse.Namespace, path: Path) -> int:
    config = require_config(path)
    params = {"since": args.since, "group_by": args.by}
    if args.until:
        params["until"] = args.until
    with Server(config.url, config.vend_token) as server:
        query = "&".join(f"{name}={quote(value, safe=',')}" for name, value in params.items())
        data = _object(expect(server.request("GET", f"/v1/usage?{query}"), 200), "usage")
    if args.json:
        print(json.dumps(data, indent=2))
        return EXIT_OK
    group_by = [str(name) for name in data.get("group_by") or []]
    headers = [name.upper() for name in group_by] + [title for _, title in USAGE_COLUMNS]
    table = [headers]
    for item in data.get("groups") or []:
        group = _object(item, "usage group")
        table.append([str(group.get(name, "")) for name in group_by] + _usage_line(group))
    total = ["TOTAL"] + [""] * (len(group_by) - 1) if group_by else ["TOTAL"]
    if not group_by:
        table[0] = ["", *table[0]]
    table.append(total + _usage_line(_object(data.get("totals"), "usage totals")))
    print(f"{data.get('since')} to {data.get('until')} (UTC)")
    _print_table(table)
    return EXIT_OK


def cmd_revoke(args: argparse.Namespace, path: Path) -> int:
    config = require_config(path)
    with Server(config.url, config.vend_token) as server:
        rows = expect(server.request("GET", "/v1/active"), 200)
        token_id = _one_live_token(rows if isinstance(rows, list) else [], args.id)
        expect(server.request("DELETE", f"/v1/active/{quote(token_id, safe='')}"), 204)
    print(f"revoked {token_id}")
    return EXIT_OK


def _one_live_token(rows: list[Any], given: str) -> str:
    """The id of the live token ``given`` names: its id, the start of its id as `ls` shows
    it, or its display prefix (``crd_x7Kq2p``); an error unless exactly one matches."""
    tokens = [_object(row, "token") for row in rows]
    ids = [str(token.get("id", "")) for token in tokens]
    if given in ids:
        return given
    matching = [
        token_id
        for token_id, token in zip(ids, tokens, strict=True)
        if given and (token_id.startswith(given) or str(token.get("prefix", "")).startswith(given))
    ]
    if not matching:
        raise CliError(EXIT_ERROR, f"no live token matches {given} (keybroker ls lists them)")
    if len(matching) > 1:
        raise CliError(
            EXIT_ERROR,
            f"{given} matches {len(matching)} live tokens ({', '.join(matching)}); "
            "give more of the id",
        )
    return matching[0]


def cmd_request(args: argparse.Namespace, path: Path) -> int:
    config = require_config(path)
    with Server(config.url, config.vend_token) as server:
        response = server.request("POST", "/v1/request", {"scopes": args.can})
        data = _object(expect(response, 202), "status")
    print(
        f"requested {', '.join(args.can)}; an admin must approve it at {config.url}/admin/ "
        f"(granted now: {_words(data.get('scopes'))})"
    )
    return EXIT_OK


def cmd_unenroll(args: argparse.Namespace, path: Path) -> int:
    config = require_config(path)
    with Server(config.url, config.vend_token) as server:
        response = server.request("DELETE", "/v1/self")
    if response.status_code == 401:
        # Already gone on the server (unenrolled elsewhere, or removed by an admin): what the
        # user asked for is true, so finish the job locally rather than strand the config.
        _note(f"the server no longer knows {config.name}; removing the local config only")
    else:
        expect(response, 204)
    # The token cache beside it (keybroker/credentials.py) holds only revoked tokens now.
    for gone in (path, path.parent / CACHE_FILE, path.parent / CACHE_LOCK_FILE):
        with contextlib.suppress(FileNotFoundError):
            gone.unlink()
    print(f"unenrolled {config.name}; its tokens are revoked and {path} is deleted")
    return EXIT_OK


# --- identity tokens (workload identity) -----------------------------------------------------

GRANT_HINT = "an admin must allow it: manage.py agent grant-identity {name} --audience {audience}"


def client_credentials(config: Config, path: Path, *, renew: bool = False) -> Config:
    """The config with OAuth client credentials, created once (POST /v1/clients) and kept in
    it: the client secret is a long-lived secret like the vend token, so it lives in the
    same private file."""
    if config.client_id and config.client_secret and not renew:
        return config
    with Server(config.url, config.vend_token) as server:
        data = _object(expect(server.request("POST", "/v1/clients"), 201), "client")
    client_id, secret = data.get("client_id"), data.get("client_secret")
    if not isinstance(client_id, str) or not isinstance(secret, str):
        raise CliError(EXIT_ERROR, "the server's client answer has no client_id or secret")
    config = replace(config, client_id=client_id, client_secret=secret)
    save_config(path, config)
    _note(f"created OAuth client {client_id} for {config.name}; its secret is kept in {path}")
    return config


def _oauth_error(response: httpx.Response) -> tuple[str, str]:
    """RFC 6749's ``{error, error_description}``, which /oauth/token answers with."""
    with contextlib.suppress(ValueError, TypeError, AttributeError):
        body = response.json()
        error, description = body.get("error"), body.get("error_description")
        if isinstance(error, str):
            return error, " ".join(str(description or error).split())
    return "", _server_message(response)


def identity_token(config: Config, path: Path, audience: str) -> tuple[str, int]:
    """A fresh JWT for ``audience`` and its lifetime in seconds."""
    config = client_credentials(config, path)
    for attempt in (1, 2):
        form = {
            "grant_type": "client_credentials",
            "client_id": config.client_id or "",
            "client_secret": config.client_secret or "",
            "audience": audience,
        }
        with Server(config.url) as server:
            response = server.request("POST", "/oauth/token", form=form)
        if response.status_code == 200:
            break
        error, message = _oauth_error(response)
        if error == "invalid_client" and attempt == 1:
            # The stored client is gone on the server (revoked); the vend token may still be
            # good, so ask for a new one once rather than strand the agent.
            config = client_credentials(config, path, renew=True)
            continue
        if error == "invalid_target":
            hint = GRANT_HINT.format(name=config.name, audience=shlex.quote(audience))
            raise CliError(EXIT_NOT_APPROVED, f"{message}; {hint}")
        if error == "unauthorized_client":
            raise CliError(EXIT_NOT_APPROVED, message)
        if response.status_code == 401:
            raise CliError(EXIT_NOT_ENROLLED, f"{message}; {ENROLL_HINT}")
        raise CliError(EXIT_ERROR, message)
    data = _object(expect(response, 200), "token")
    token, expires_in = data.get("access_token"), data.get("expires_in")
    if not isinstance(token, str) or not isinstance(expires_in, int) or expires_in <= 0:
        raise CliError(EXIT_ERROR, "the server's token answer has no access_token or expires_in")
    return token, expires_in


def cmd_identity_token(args: argparse.Namespace, path: Path) -> int:
    config = require_config(path)
    out = Path(args.out).expanduser() if args.out else None
    if args.refresh and out is None:
        raise CliError(EXIT_USAGE, "--refresh needs --out FILE: it keeps that file fresh")
    token, lifetime = identity_token(config, path, args.audience)
    if out is None:
        print(token)
        return EXIT_OK
    while True:
        write_private(out, token + "\n", prefix=f".{out.name}-")
        _note(
            f"wrote an identity token for {args.audience} to {out}; "
            f"it expires in {duration_format(lifetime)}"
        )
        if not args.refresh:
            return EXIT_OK
        expires = time.monotonic() + lifetime
        # Halfway through its life: whoever reads the file always finds time left on it.
        time.sleep(max(1.0, lifetime / 2))
        token, lifetime = _renewed(path, args.audience, expires)


RETRY_SECONDS = 10.0


def _renewed(path: Path, audience: str, expires: float) -> tuple[str, int]:
    """The next token for --refresh. A server that is briefly away is retried while the
    token in the file is still good; a refusal (not allowed, not enrolled) ends the loop."""
    while True:
        try:
            # Read again: the client credentials may have been created or renewed meanwhile.
            return identity_token(require_config(path), path, audience)
        except CliError as exc:
            left = expires - time.monotonic()
            if exc.code in (EXIT_NOT_APPROVED, EXIT_NOT_ENROLLED) or left <= 1:
                raise
            wait = min(RETRY_SECONDS, left / 2)
            _note(f"{exc.message}; trying again in {duration_format(round(wait))}")
            time.sleep(wait)


# --- command line ----------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, like every other error, instead of argparse's usage dump.
        self.exit(EXIT_USAGE, f"keybroker: {message} (see {self.prog} --help)\n")


Handler = Callable[[argparse.Namespace, Path], int]


def build_parser() -> argparse.ArgumentParser:
    # --config is accepted before or after the command; SUPPRESS keeps the subcommand's
    # absent option from overwriting one given before it.
    common = _Parser(add_help=False)
    common.add_argument("--config", metavar="PATH", default=argparse.SUPPRESS, help="config file")
    parser = _Parser(
        prog="keybroker",
        parents=[common],
        description="Enroll this agent with a keybroker server and mint short-lived tokens.",
        epilog="Docs and exit codes: docs/agent-cli.md",
    )
    parser.add_argument("--version", action="version", version=f"keybroker {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, handler: Handler, what: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, parents=[common], help=what, description=what)
        sub.set_defaults(handler=handler)
        return sub

    enroll = command("enroll", cmd_enroll, "enroll and wait for an admin's approval")
    enroll.add_argument(
        "url", metavar="URL", help="the keybroker server, e.g. https://keys.example.com"
    )
    enroll.add_argument("--name", required=True, help="this agent's unique name")
    enroll.add_argument(
        "--can", action="append", required=True, metavar="BACKEND", help="a backend to ask for"
    )
    enroll.add_argument("--description", help="a note for the approving admin")
    enroll.add_argument(
        "--timeout",
        type=parse_duration,
        default=DEFAULT_TIMEOUT,
        metavar="DURATION",
        help="how long to wait for approval (default 10m; 0 = do not wait)",
    )
    enroll.add_argument(
        "--poll-interval",
        type=parse_duration,
        default=DEFAULT_POLL_INTERVAL,
        metavar="DURATION",
        help="first pause between status checks; it grows to 10s (default 2s)",
    )

    login = command(
        "login", cmd_login, "use a vend token an admin created (manage.py agent create)"
    )
    login.add_argument("url", metavar="URL", help="the keybroker server")
    login.add_argument(
        "--vend-token",
        metavar="-",
        choices=["-"],
        help="read the vend token from stdin (without it, it is asked for without echo)",
    )

    status = command("status", cmd_status, "show name, status, scopes, grants and limits")
    status.add_argument("--json", action="store_true", help="print the server's answer")

    for name, handler, what in (
        ("get", cmd_get, "mint a token and print only the token"),
        ("env", cmd_env, "mint a token and print shell exports for the backend's SDK"),
    ):
        sub = command(name, handler, what)
        sub.add_argument("backend", metavar="BACKEND")
        sub.add_argument("--ttl", help="token lifetime: 90s, 30m, 1h or seconds")
        if name == "get":
            sub.add_argument("--json", action="store_true", help="print the whole answer")
            sub.add_argument(
                "--cached",
                action="store_true",
                help="a live token from the cache shared by this agent's processes, or a new one "
                "(for Claude Code's apiKeyHelper)",
            )
    claude = command(
        "claude-settings",
        cmd_claude_settings,
        "print Claude Code settings that use `keybroker get --cached` as its apiKeyHelper",
    )
    claude.add_argument(
        "backend", metavar="BACKEND", nargs="?", default="anthropic", help="default: anthropic"
    )
    claude.add_argument("--ttl", help="token lifetime: 90s, 30m, 1h or seconds")
    claude.add_argument(
        "--write", action="store_true", help="merge them into ./.claude/settings.json instead"
    )

    ls = command("ls", cmd_ls, "list this agent's live tokens")
    ls.add_argument("--json", action="store_true", help="print the server's answer")
    usage = command("usage", cmd_usage, "this agent's calls, tokens and cost (UTC)")
    usage.add_argument("--since", default="7d", help="date, time or a duration back (7d)")
    usage.add_argument("--until", help="date, time or a duration back (now)")
    usage.add_argument("--by", default="", help="group by any of backend,model,day,hour")
    usage.add_argument("--json", action="store_true", help="print the server's answer")
    command("revoke", cmd_revoke, "revoke one token at once").add_argument(
        "id", metavar="ID", help="its id, the start of it, or its prefix (crd_…), as ls shows"
    )
    command("request", cmd_request, "ask for more backends").add_argument(
        "--can", action="append", required=True, metavar="BACKEND"
    )
    command("unenroll", cmd_unenroll, "delete this agent and every token, then the config")
    identity = command(
        "identity-token",
        cmd_identity_token,
        "get an identity token (a JWT from keybroker) for ANTHROPIC_IDENTITY_TOKEN_FILE",
    )
    identity.add_argument(
        "--audience", required=True, metavar="URL", help="e.g. https://api.anthropic.com"
    )
    identity.add_argument(
        "--out", metavar="FILE", help="write it to FILE (mode 0600, atomically) instead of stdout"
    )
    identity.add_argument(
        "--refresh",
        action="store_true",
        help="keep running and rewrite FILE at half of each token's lifetime",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler: Handler = args.handler
    try:
        return handler(args, config_path(getattr(args, "config", None)))
    except CliError as exc:
        _note(exc.message)
        return exc.code
    except KeyboardInterrupt:
        _note("interrupted")
        return EXIT_INTERRUPTED
    except Exception as exc:
        # A traceback is useless to an agent's operator and could quote a token; one line is not.
        _note(f"unexpected error: {type(exc).__name__}: {exc}")
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
