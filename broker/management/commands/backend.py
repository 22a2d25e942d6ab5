"""`manage.py backend add|ls|inspect|validate|rotate|rm` and the key pool's
`keys|key-add|key-enable|key-disable|key-rm`."""

from __future__ import annotations

import time
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from broker.api.backend_keys import keys_output
from broker.api.backends import BackendOutput
from broker.kinds import DEFAULT_KIND, provider_for
from broker.management.commands._output import as_json, read_secret, service_errors, table
from broker.models import Backend, BackendKey, ValidationState
from broker.selectors.backend_keys import KeyHealth, key_get
from broker.services.backend_keys import key_add, key_disable, key_enable, key_remove
from broker.services.backends import (
    FEDERATION_FIELDS,
    FederationSettings,
    KeyRefused,
    TtlBounds,
    ValidationResult,
    backend_add,
    backend_check_outcome,
    backend_check_secret,
    backend_get,
    backend_remove,
    backend_rotate,
    backend_stores_secret,
    backend_validate,
)
from broker.services.oidc import backend_subject

# `backend validate`'s exit status: 0 valid, these otherwise (README, Server CLI).
EXIT_INVALID = 3
EXIT_UNREACHABLE = 4


def _allow_invalid(parser: CommandParser) -> None:
    parser.add_argument(
        "--allow-invalid",
        action="store_true",
        help="store the key even when the upstream refuses it (by default it is refused, "
        "exit status 3)",
    )


def _summary(backend: Backend) -> ValidationResult | None:
    """The validation a new backend was saved with; None when nothing was checked."""
    backend.refresh_from_db()
    if backend.client_key:
        return None
    return ValidationResult(ValidationState(backend.validation_state), backend.validation_message)


class Command(BaseCommand):
    help = "Manage upstream backends (the real API keys keybroker holds)."

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True)
        add = sub.add_parser("add", help="store a new upstream credential")
        add.add_argument("name")
        add.add_argument("--kind", default=DEFAULT_KIND)
        add.add_argument("--api-key", help="the secret; '-' reads stdin; omitted: prompt")
        add.add_argument(
            "--client-key",
            action="store_true",
            help="store no key: agents send their own in X-Anthropic-Key",
        )
        add.add_argument("--base-url", help="default: the provider's (https://api.anthropic.com)")
        wif = add.add_argument_group(
            "workload identity (--kind anthropic-wif: no key is stored; keybroker exchanges "
            "its own JWT for a short-lived access token)"
        )
        wif.add_argument("--federation-rule-id", metavar="fdrl_…")
        wif.add_argument("--organization-id", metavar="UUID")
        wif.add_argument("--service-account-id", metavar="svac_…")
        wif.add_argument("--workspace-id", metavar="wrkspc_…|default")
        wif.add_argument(
            "--audience", help="aud of keybroker's JWT (default https://api.anthropic.com)"
        )
        add.add_argument("--ttl-min", type=int, default=60, help="seconds (default 60)")
        _allow_invalid(add)
        add.add_argument("--ttl-default", type=int, default=600, help="seconds (default 600)")
        add.add_argument("--ttl-max", type=int, default=3600, help="seconds (default 3600)")
        sub.add_parser("ls", help="list backends")
        inspect = sub.add_parser("inspect", help="show one backend")
        inspect.add_argument("name")
        inspect.add_argument("--json", action="store_true")
        validate = sub.add_parser("validate", help="check the secret against the upstream now")
        validate.add_argument("name")
        rotate = sub.add_parser("rotate", help="replace the secret; agents keep working")
        rotate.add_argument("name")
        rotate.add_argument("--api-key", help="the new secret; '-' reads stdin; omitted: prompt")
        rotate.add_argument(
            "--fingerprint", help="the key to replace, when the backend has several (see `keys`)"
        )
        _allow_invalid(rotate)
        keys = sub.add_parser("keys", help="list a backend's keys (state, weight, health)")
        keys.add_argument("name")
        keys.add_argument("--json", action="store_true")
        key_add_ = sub.add_parser("key-add", help="add a key to a backend's pool")
        key_add_.add_argument("name")
        key_add_.add_argument("--api-key", help="the secret; '-' reads stdin; omitted: prompt")
        key_add_.add_argument("--weight", type=int, default=1, help="share of calls (default 1)")
        _allow_invalid(key_add_)
        for action, what in (
            ("key-enable", "let a key serve calls again"),
            ("key-disable", "stop a key serving calls (not the last enabled one)"),
            ("key-rm", "remove a key (not the last enabled one)"),
        ):
            one = sub.add_parser(action, help=what)
            one.add_argument("name")
            one.add_argument("fingerprint", help="as `backend keys NAME` shows it")
        rm = sub.add_parser("rm", help="remove a backend")
        rm.add_argument("name")
        rm.add_argument("--force", action="store_true")

    def handle(self, *args: Any, **options: Any) -> None:
        with service_errors():
            try:
                getattr(self, f"do_{options['action'].replace('-', '_')}")(**options)
            except KeyRefused as exc:
                raise CommandError(
                    f"{exc.text}; to store it anyway, add --allow-invalid",
                    returncode=EXIT_INVALID,
                ) from None

    def _report_check(self, backend: Backend, result: ValidationResult | None) -> None:
        """The new key's check, then the exit status `backend validate` would give."""
        if result is None:
            return
        self.stdout.write(f"{backend.name}: {backend_check_outcome(backend, result)}")
        if result.state == ValidationState.INVALID:
            raise CommandError(
                f"the token exchange of {backend.name} is refused: check its federation "
                f"settings (`manage.py backend inspect {backend.name}`); the backend is stored"
                if backend.federated
                else f"the key of {backend.name} is invalid (stored, as --allow-invalid asked)",
                returncode=EXIT_INVALID,
            )
        if result.state == ValidationState.UNREACHABLE:
            what = "backend" if backend.federated else "key"
            raise CommandError(
                f"{backend.name}'s upstream could not be reached; the {what} is stored unchecked",
                returncode=EXIT_UNREACHABLE,
            )

    def do_add(self, **options: Any) -> None:
        client_key = options["client_key"]
        asks_secret = options["api_key"] or backend_stores_secret(
            kind=options["kind"], client_key=client_key
        )
        backend = backend_add(
            name=options["name"],
            kind=options["kind"],
            client_key=client_key,
            secret=read_secret(options["api_key"], prompt="API key (not echoed): ")
            if asks_secret
            else "",
            base_url=options["base_url"],
            ttl=TtlBounds(options["ttl_min"], options["ttl_max"], options["ttl_default"]),
            federation=FederationSettings(**{name: options[name] for name in FEDERATION_FIELDS}),
            validate=True,
            allow_invalid=options["allow_invalid"],
        )
        if backend.federated:
            self.stdout.write(
                f"added backend {backend.name}: no key stored; it exchanges keybroker's JWT "
                f"(sub {backend_subject(backend.name)}, aud {backend.federation_audience}) "
                f"under {backend.federation_rule_id}"
            )
            self._report_check(backend, _summary(backend))
            return
        if client_key:
            self.stdout.write(
                f"added backend {backend.name}; agents send their own key in X-Anthropic-Key"
            )
            return
        self.stdout.write(f"added backend {backend.name} ({backend.secret_fingerprint})")
        self._report_check(backend, _summary(backend))

    def do_ls(self, **options: Any) -> None:
        rows = [
            (b.name, b.kind, b.validation_state, b.secret_fingerprint, b.base_url,
             "yes" if b.enabled else "no",
             b.validation_checked_at and f"{b.validation_checked_at:%Y-%m-%d %H:%M}")
            for b in Backend.objects.all()
        ]  # fmt: skip
        headers = ["NAME", "KIND", "STATE", "FINGERPRINT", "BASE URL", "ENABLED", "CHECKED"]
        self.stdout.write(table(rows, headers) if rows else "no backends yet")

    def do_inspect(self, **options: Any) -> None:
        data = BackendOutput(backend_get(name=options["name"])).data
        if options["json"]:
            self.stdout.write(as_json(data))
            return
        now = time.time()
        for key, value in data.items():
            if key == "keys":
                self._inspect_keys(value, now)
                continue
            if isinstance(value, dict):
                value = ", ".join(f"{k}={v}" for k, v in value.items())
            self.stdout.write(f"{key:12} {value}")

    def _inspect_keys(self, keys: list[dict[str, Any]], now: float) -> None:
        """One line per key of the pool: fingerprint, state, weight, enabled, health."""
        if not keys:
            self.stdout.write(f"{'keys':12} none stored")
            return
        rows = [
            (k["fingerprint"], k["validation"]["state"], f"weight {k['weight']}",
             "enabled" if k["enabled"] else "disabled",
             KeyHealth(k["health"]["state"], k["health"]["until"]).describe(now))
            for k in keys
        ]  # fmt: skip
        lines = table(rows, ["FINGERPRINT", "STATE", "WEIGHT", "ENABLED", "HEALTH"])
        for number, line in enumerate(lines.splitlines()[1:]):
            self.stdout.write(f"{'keys' if number == 0 else '':12} {line}")

    def do_validate(self, **options: Any) -> None:
        backend = backend_get(name=options["name"])
        result = backend_validate(backend=backend)
        self.stdout.write(f"{backend.name}: {result.state} ({result.message})")
        # Scripts and people alike read the exit status: a key that does not work is not 0.
        if result.state == ValidationState.INVALID:
            fix = (
                f"check its federation settings (`manage.py backend inspect {backend.name}`)"
                if provider_for(backend.kind).federated
                else f"replace it with `manage.py backend rotate {backend.name}`"
            )
            what = "token exchange" if provider_for(backend.kind).federated else "key"
            raise CommandError(
                f"the {what} of {backend.name} is invalid: {fix}", returncode=EXIT_INVALID
            )
        if result.state == ValidationState.UNREACHABLE:
            raise CommandError(
                f"{backend.name}'s upstream could not be reached; the key is unchecked",
                returncode=EXIT_UNREACHABLE,
            )

    def do_rotate(self, **options: Any) -> None:
        backend = backend_get(name=options["name"])
        fingerprint = options["fingerprint"]
        old = fingerprint or backend.secret_fingerprint
        secret = read_secret(options["api_key"], prompt="New API key (not echoed): ")
        backend = backend_rotate(
            backend=backend,
            secret=secret,
            fingerprint=fingerprint,
            validate=True,
            allow_invalid=options["allow_invalid"],
        )
        new = backend_check_secret(kind=backend.kind, secret=secret)[1]
        self.stdout.write(f"rotated {backend.name}: {old} -> {new}")
        key = key_get(backend=backend, fingerprint=new)
        self._report_check(
            backend, ValidationResult(ValidationState(key.validation_state), key.validation_message)
        )

    def do_rm(self, **options: Any) -> None:
        backend_remove(backend=backend_get(name=options["name"]), force=options["force"])
        self.stdout.write(f"removed backend {options['name']}")

    def do_keys(self, **options: Any) -> None:
        rows = keys_output(backend_get(name=options["name"]))
        if options["json"]:
            self.stdout.write(as_json(rows))
            return
        now = time.time()
        lines = [
            (r["fingerprint"], r["validation"]["state"], r["weight"],
             "yes" if r["enabled"] else "no",
             KeyHealth(r["health"]["state"], r["health"]["until"]).describe(now),
             r["calls"], r["health"]["last_error"], r["validation"]["message"])
            for r in rows
        ]  # fmt: skip
        headers = [
            "FINGERPRINT", "STATE", "WEIGHT", "ENABLED", "HEALTH", "CALLS (24H)", "LAST ERROR",
            "LAST CHECK",
        ]  # fmt: skip
        self.stdout.write(table(lines, headers) if lines else "no keys (it stores none)")

    def do_key_add(self, **options: Any) -> None:
        backend = backend_get(name=options["name"])
        key = key_add(
            backend=backend,
            secret=read_secret(options["api_key"], prompt="API key (not echoed): "),
            weight=options["weight"],
            validate=True,
            allow_invalid=options["allow_invalid"],
        )
        self.stdout.write(f"added key {key.fingerprint} to {backend.name} (weight {key.weight})")
        key.refresh_from_db()
        self._report_check(
            backend, ValidationResult(ValidationState(key.validation_state), key.validation_message)
        )

    def _key(self, options: dict[str, Any]) -> BackendKey:
        return key_get(
            backend=backend_get(name=options["name"]), fingerprint=options["fingerprint"]
        )

    def do_key_enable(self, **options: Any) -> None:
        key = key_enable(key=self._key(options))
        self.stdout.write(f"enabled key {key.fingerprint} of {options['name']}")

    def do_key_disable(self, **options: Any) -> None:
        key = key_disable(key=self._key(options))
        self.stdout.write(f"disabled key {key.fingerprint} of {options['name']}")

    def do_key_rm(self, **options: Any) -> None:
        key = self._key(options)
        key_remove(key=key)
        self.stdout.write(f"removed key {key.fingerprint} from {options['name']}")
