"""Sending a plan: render each message, hand it to a sender once, record it in the ledger.

`MessageSender` is the plug-in point for a provider (an ESP, FCM/APNs). The one built in,
`OutboxSender`, writes every message as a file to the warehouse outbox
(`channels/outbox/surface=S/region=R/date=D/<subject_id>.eml|.json`): `.eml` built with the
stdlib `email` package for email, JSON for push. A provider implementation would send
instead and return its message id.

A send happens at most once per (channel, subject, UTC send date), whatever re-runs:
`dispatch_plan` skips keys already in the ledger, and the outbox file is created only if
absent (a conditional write), so a message handed over by a run that died before writing
its ledger row is found there and recorded, not sent again. Consent is re-read at hand-over:
a subject who unsubscribed after the plan was made is withdrawn, not sent.

Every link points at `recsys serve`'s tracking routes under `RECSYS_TRACKING_BASE_URL`
(attribution.py `open_link` / `click_link`). Without it nothing is sent: a message with dead
links must not go out. A dry run renders against a placeholder host and sends nothing.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC
from email.message import EmailMessage
from email.utils import format_datetime, make_msgid
from typing import Protocol

import pandas as pd

from recsys_assets.channels.attribution import (
    TRACKING_BASE_URL_ENV,
    TrackingLinksNotConfigured,
    click_link,
    open_link,
)
from recsys_assets.channels.digest import DigestItem, is_digest, render_digest
from recsys_assets.channels.ledger import SEND_SCHEMA, append_sends, read_sends, send_key
from recsys_assets.config import Settings
from recsys_assets.data.snapshot import read_raw
from recsys_assets.rules.person import read_person_facts, without_consent
from recsys_assets.warehouse import PreconditionFailed, Warehouse, partition_path

OUTBOX_PREFIX = "channels/outbox"
SENDER_ADDRESS = "recommendations@recsys.invalid"
SENT = "sent"
ALREADY_SENT = "already_sent"
RECOVERED = "recovered"
WITHDRAWN = "withdrawn_consent"
DRY_RUN_BASE_URL = "https://tracking-base-url.invalid"
"""Link host of messages rendered by a dry run without RECSYS_TRACKING_BASE_URL."""


@dataclass(frozen=True)
class RenderedMessage:
    """One message, ready for a provider."""

    key: str
    """Idempotency key: (channel, subject, UTC send date)."""
    medium: str
    subject_id: int
    send_at: pd.Timestamp
    outbox_path: str
    body: bytes


class AlreadyDelivered(Exception):
    """The sender had already accepted a message with this key (a re-run, or a crash after
    hand-over and before the ledger write)."""


class MessageSender(Protocol):
    """Where messages go. `deliver` must refuse a key it has already accepted by raising
    AlreadyDelivered (providers: pass `message.key` as their idempotency key)."""

    def deliver(self, message: RenderedMessage) -> str:
        """Hand the message over; returns where it went (a path or provider message id)."""
        ...


class OutboxSender:
    """Writes each message to the warehouse outbox, once: the file is created only if
    absent (local lock or S3 If-None-Match), so a key can never be written twice."""

    def __init__(self, warehouse: Warehouse) -> None:
        self.warehouse = warehouse

    def deliver(self, message: RenderedMessage) -> str:
        try:
            self.warehouse.write_bytes_if(message.outbox_path, message.body, expected_etag=None)
        except PreconditionFailed:
            raise AlreadyDelivered(message.key) from None
        return message.outbox_path


def outbox_path(surface: str, region: str, subject_id: int, send_date: str, medium: str) -> str:
    extension = "eml" if medium == "email" else "json"
    return (
        f"{OUTBOX_PREFIX}/{partition_path(surface=surface, region=region)}/date={send_date}/"
        f"{int(subject_id)}.{extension}"
    )


def _items(row: pd.Series) -> list[tuple[int, int, str]]:
    """(item_id, list position, tracking token) per item of a plan row, in message order."""
    return [
        (int(item), int(position), token)
        for item, position, token in zip(
            str(row["item_ids"]).split("|"),
            str(row["positions"]).split("|"),
            str(row["tracking_tokens"]).split("|"),
            strict=True,
        )
    ]


def render(
    row: pd.Series, *, tracking_base_url: str, titles: Mapping[int, str] | None = None
) -> RenderedMessage:
    """The message for one plan row: an RFC 5322 email or a push JSON payload, each item
    linked through its tracking token (opens: the email's pixel; clicks: the item link).
    A digest row is the localized digest text (digest.py) over the row's items and their
    `titles`, nothing else."""
    send_at = pd.Timestamp(row["send_at"])
    day = send_at.date().isoformat()
    medium = str(row["medium"])
    surface, region, subject_id = str(row["surface"]), str(row["region"]), int(row["subject_id"])
    items = _items(row)
    key = send_key(surface, subject_id, day)
    path = outbox_path(surface, region, subject_id, day, medium)
    if medium == "email":
        message = EmailMessage()
        message["From"] = SENDER_ADDRESS
        message["To"] = f"user-{subject_id}@recipients.invalid"
        digest_version = row.get("template_version")
        if is_digest(surface) and isinstance(digest_version, str):
            subject_line, text = render_digest(
                [
                    DigestItem(
                        item, (titles or {}).get(item), click_link(tracking_base_url, token, item)
                    )
                    for item, _, token in items
                ],
                str(row["locale"]),
            )
            message["X-Recsys-Template-Version"] = digest_version
        else:
            subject_line = f"Picked for you ({surface})"
            text = "\n".join(
                f"Item {item}: {click_link(tracking_base_url, token, item)}"
                for item, _, token in items
            )
        message["Subject"] = subject_line
        message["Date"] = format_datetime(send_at.to_pydatetime().replace(tzinfo=UTC))
        message["Message-ID"] = make_msgid(idstring=key.replace("/", "."), domain="recsys.invalid")
        message["X-Recsys-Send-Key"] = key
        message["X-Recsys-List-Id"] = str(row["list_id"])
        message["X-Recsys-Send-At-Local"] = str(row["send_at_local"])
        pixel = open_link(tracking_base_url, items[0][2])
        message.set_content("\n".join([text, "", f"(open pixel: {pixel})"]))
        body = bytes(message)
    else:
        item, _, token = items[0]
        payload = {
            "send_key": key,
            "subject_id": subject_id,
            "surface": surface,
            "send_at": send_at.isoformat(),
            "send_at_local": str(row["send_at_local"]),
            "list_id": str(row["list_id"]),
            "item_id": item,
            "tracking_token": token,
            "deep_link": click_link(tracking_base_url, token, item),
        }
        body = json.dumps(payload, sort_keys=True).encode()
    return RenderedMessage(key, medium, subject_id, send_at, path, body)


def _titles(warehouse: Warehouse) -> dict[int, str]:
    items = read_raw(warehouse, "items", columns=["item_id", "title"]).dropna(subset=["title"])
    return dict(zip(items["item_id"].astype(int), items["title"].astype(str), strict=True))


@dataclass(frozen=True)
class SendReport:
    """What one dispatch did, per message outcome, and the ledger file it wrote."""

    outcomes: dict[str, int]
    ledger_path: str | None
    dry_run: bool

    def summary(self) -> str:
        """One line: outcome counts (a dry run says what it *would* send) and the ledger."""
        named = {
            ("would send" if self.dry_run and name == "sent" else name): count
            for name, count in self.outcomes.items()
        }
        counts = ", ".join(f"{name} {count}" for name, count in sorted(named.items()))
        where = f"; ledger {self.ledger_path}" if self.ledger_path else ""
        return f"{'dry run: ' if self.dry_run else ''}{counts or 'nothing planned'}{where}"


def dispatch_plan(
    warehouse: Warehouse,
    settings: Settings,
    plan: pd.DataFrame,
    sender: MessageSender,
    *,
    now: pd.Timestamp,
    tracking_base_url: str | None,
    dry_run: bool = False,
) -> SendReport:
    """Send every planned message not yet sent; record what was handed over in the ledger.
    `tracking_base_url` is the public URL of `recsys serve` the links point at; without it
    only a dry run is allowed (TrackingLinksNotConfigured)."""
    if tracking_base_url is None:
        if not dry_run:
            raise TrackingLinksNotConfigured(
                f"cannot send: {TRACKING_BASE_URL_ENV} is not set. Set it to the public URL "
                "of `recsys serve` (e.g. https://t.example.com; for the demo "
                "http://127.0.0.1:8000), else every open and click link in the messages "
                "would be dead. --dry-run works without it."
            )
        tracking_base_url = DRY_RUN_BASE_URL
    outcomes: Counter[str] = Counter()
    if plan.empty:
        return SendReport({}, None, dry_run)
    surface_name, region = str(plan["surface"].iloc[0]), str(plan["region"].iloc[0])
    surface = settings.surface(surface_name)
    sent_keys = set(read_sends(warehouse, surface=surface_name, region=region)["send_key"])
    facts = read_person_facts(warehouse)
    if facts is None:
        raise FileNotFoundError("cannot send: the raw snapshot or its users table is missing")
    withdrawn = without_consent(plan["subject_id"].astype("int64"), surface=surface, facts=facts)
    titles = _titles(warehouse) if is_digest(surface_name) else None
    ledger_rows: list[dict[str, object]] = []
    for (_, row), revoked in zip(plan.iterrows(), withdrawn, strict=True):
        message = render(row, tracking_base_url=tracking_base_url, titles=titles)
        if message.key in sent_keys:
            outcomes[ALREADY_SENT] += 1
            continue
        if revoked:
            outcomes[WITHDRAWN] += 1
            continue
        if dry_run:
            outcomes[SENT] += 1
            continue
        try:
            where = sender.deliver(message)
            outcome = SENT
        except AlreadyDelivered:  # handed over before, never recorded: record it now
            where, outcome = message.outbox_path, RECOVERED
        outcomes[outcome] += 1
        sent_keys.add(message.key)
        for item_id, position, token in _items(row):
            ledger_rows.append(
                {
                    "send_key": message.key,
                    "subject_id": message.subject_id,
                    "surface": surface_name,
                    "medium": message.medium,
                    "region": region,
                    "send_date": message.send_at.date().isoformat(),
                    "send_at": message.send_at,
                    "handed_over_at": now,
                    "list_id": str(row["list_id"]),
                    "version": str(row["version"]),
                    "model_version": str(row["model_version"]),
                    "item_id": item_id,
                    "position": position,
                    "tracking_token": token,
                    "message_path": where,
                }
            )
    ledger_path = None
    if ledger_rows:
        frame = pd.DataFrame(ledger_rows, columns=list(SEND_SCHEMA))
        ledger_path = append_sends(warehouse, frame, handed_over_at=now)
    return SendReport(dict(outcomes), ledger_path, dry_run)
