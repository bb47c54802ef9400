"""The sandbox provider: appends what it would send to a JSON-lines file.

Used for SMS and push until their real providers land. One file per channel
(``<dir>/<channel>.jsonl``), one JSON object per delivery: delivery id,
notification id, tenant id, recipient, content, and the time it was written.
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from pathlib import Path

from google.protobuf import json_format

from channels.catalog import CHANNEL_NAMES
from channels.provider import RetryableDeliveryError, SendResult
from switchboard.notify.v1 import events_pb2


def sandbox_file(directory: Path, channel: str) -> Path:
    """The JSON-lines file the sandbox writes ``channel`` deliveries to."""
    return directory / f"{channel}.jsonl"


class SandboxProvider:
    """Writes deliveries of one channel to ``<directory>/<channel>.jsonl``."""

    name = "sandbox"

    def __init__(self, directory: Path, channel: str) -> None:
        self._path = sandbox_file(directory, channel)
        self._lock = asyncio.Lock()

    @property
    def path(self) -> Path:
        """Where the lines go."""
        return self._path

    async def send(self, event: events_pb2.DeliveryRequested) -> SendResult:
        """Append one line; raises RetryableDeliveryError if the file cannot be written."""
        content_field = event.WhichOneof("content")
        record = {
            "delivery_id": event.delivery_id,
            "notification_id": event.notification_id,
            "tenant_id": event.tenant_id,
            "channel": CHANNEL_NAMES[event.channel],
            "recipient": event.recipient,
            "content": json_format.MessageToDict(getattr(event, content_field)) if content_field else {},
            "written_at": datetime.now(UTC).isoformat(),
        }
        line = json.dumps(record, ensure_ascii=False) + "\n"
        try:
            async with self._lock:
                await asyncio.to_thread(self._append, line)
        except OSError as exc:
            raise RetryableDeliveryError(f"sandbox write failed: {exc}") from None
        return SendResult(provider_message_id=f"sandbox-{event.delivery_id}")

    def _append(self, line: str) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        with self._path.open("a", encoding="utf-8") as handle:
            handle.write(line)

    async def close(self) -> None:
        """Nothing to release."""
