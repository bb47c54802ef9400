"""AIP-158 pagination and create-time filters shared by the List RPCs.

A page token is opaque to clients: URL-safe base64 (no padding) of the JSON
``[created_at (ISO 8601), item id, filter fingerprint]``, the keyset cursor
"after this item" bound to the filters it was issued for
(https://google.aip.dev/158: a token is only valid with the same request
parameters).
"""

from __future__ import annotations

import base64
import json
import uuid
from datetime import UTC, datetime, timedelta

from google.protobuf import timestamp_pb2
from google.protobuf.message import Message

from gateway.validation import FieldViolation


def encode_page_token(created_at: datetime, item_id: uuid.UUID, fingerprint: str) -> str:
    """The opaque token for the page after (``created_at``, ``item_id``) under these filters."""
    raw = json.dumps([created_at.isoformat(), str(item_id), fingerprint]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_page_token(token: str, fingerprint: str, foreign: str) -> tuple[datetime, uuid.UUID]:
    """The cursor in ``token``; raises ``ValueError(foreign)`` for a token we did not
    issue or one issued for other filters (another ``fingerprint``)."""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        created, item_id, issued_for = json.loads(raw)
        cursor = datetime.fromisoformat(created), uuid.UUID(item_id)
    except (ValueError, TypeError) as exc:
        raise ValueError(foreign) from exc
    if cursor[0].tzinfo is None or issued_for != fingerprint:
        raise ValueError(foreign)
    return cursor


def time_bound(request: Message, field: str, violations: list[FieldViolation]) -> datetime | None:
    """The timestamp ``field`` of ``request`` as an aware datetime (``None`` when unset),
    at microsecond precision: rounded down for ``create_time_after`` and up for
    ``create_time_before``, so nothing inside the exclusive range is lost. An
    out-of-range timestamp adds a violation naming ``field``."""
    if not request.HasField(field):
        return None
    ts: timestamp_pb2.Timestamp = getattr(request, field)
    try:
        value = ts.ToDatetime(tzinfo=UTC)
    except (ValueError, OverflowError):
        violations.append(FieldViolation(field=field, description="must be a valid timestamp"))
        return None
    if field == "create_time_before" and ts.nanos % 1000 and value < datetime.max.replace(tzinfo=UTC):
        # (In the last microsecond of year 9999 there is nothing to round up to: the bound stays.)
        value += timedelta(microseconds=1)
    return value


def create_time_range(
    request: Message, violations: list[FieldViolation]
) -> tuple[datetime | None, datetime | None]:
    """``create_time_after`` and ``create_time_before`` of a List request as exclusive bounds
    (:func:`time_bound`), adding a violation naming ``create_time_before`` unless it is later
    than ``create_time_after``. The order is checked on the timestamps as sent (seconds, nanos),
    not on the bounds rounded to microseconds, which may differ by one microsecond."""
    created_after = time_bound(request, "create_time_after", violations)
    created_before = time_bound(request, "create_time_before", violations)
    if created_after is not None and created_before is not None:
        after, before = (getattr(request, name) for name in ("create_time_after", "create_time_before"))
        if (before.seconds, before.nanos) <= (after.seconds, after.nanos):
            violations.append(
                FieldViolation(field="create_time_before", description="must be later than create_time_after")
            )
    return created_after, created_before
