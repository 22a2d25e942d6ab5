"""`manage.py notify add URL --events … [--kind webhook|slack|email]`, `notify ls`,
`notify rm ID`, `notify test ID`: alert channels (issue 17)."""

from __future__ import annotations

import sys
from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from audit.channels import (
    channel_create,
    channel_get,
    channel_remove,
    channel_test,
    channel_update,
)
from audit.models import ChannelKind, NotificationChannel
from audit.notify import SUBSCRIBABLE
from broker.management.commands._output import service_errors, table


class Command(BaseCommand):
    help = "Manage alert channels: webhooks (signed), Slack incoming webhooks and email."

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True)
        add = sub.add_parser(
            "add", help="add a channel; a webhook's signing secret is printed once"
        )
        add.add_argument(
            "url",
            help="the webhook or Slack URL, or email addresses (comma separated); - reads stdin",
        )
        add.add_argument(
            "--events", required=True, help=f"comma separated: {', '.join(SUBSCRIBABLE)}"
        )
        add.add_argument("--kind", choices=ChannelKind.values, default=ChannelKind.WEBHOOK)
        sub.add_parser("ls", help="list channels (never their URLs or secrets)")
        remove = sub.add_parser("rm", help="remove a channel and its delivery log")
        remove.add_argument("id")
        test = sub.add_parser("test", help="queue a test alert to a channel")
        test.add_argument("id")
        for name, what in (("disable", "pause a channel"), ("enable", "resume a channel")):
            sub.add_parser(name, help=what).add_argument("id")

    def handle(self, *args: Any, **options: Any) -> None:
        with service_errors():
            action = options["action"]
            if action == "add":
                # A Slack URL is a credential: `-` keeps it out of the shell's history.
                url = sys.stdin.readline().strip() if options["url"] == "-" else options["url"]
                created = channel_create(
                    kind=options["kind"], url=url, events=options["events"].split(",")
                )
                channel = created.channel
                self.stderr.write(
                    f"alert channel {channel.pk}: {channel.kind} to {channel.target_display} "
                    f"for {', '.join(channel.events)}"
                )
                if created.signing_secret:
                    self.stderr.write("its signing secret (shown once):")
                    self.stdout.write(created.signing_secret)
            elif action == "ls":
                rows = [
                    (c.pk, c.kind, c.target_display, ",".join(c.events), c.secret_hint,
                     "enabled" if c.enabled else "disabled")
                    for c in NotificationChannel.objects.all()
                ]  # fmt: skip
                headers = ["ID", "KIND", "TARGET", "EVENTS", "SECRET", "STATE"]
                self.stdout.write(table(rows, headers) if rows else "no alert channels")
            elif action == "rm":
                channel = channel_get(channel_id=options["id"])
                channel_remove(channel=channel)
                self.stdout.write(f"removed alert channel {channel.pk}")
            elif action in {"enable", "disable"}:
                channel = channel_get(channel_id=options["id"])
                channel_update(channel=channel, enabled=action == "enable")
                self.stdout.write(f"alert channel {channel.pk} {action}d")
            else:
                delivery = channel_test(channel=channel_get(channel_id=options["id"]))
                self.stdout.write(f"test alert queued: delivery {delivery.pk}")
