"""Email over SMTP with aiosmtplib (RFC 5321 submission).

Replies are classified by RFC 5321 section 4.2.1: 4yz is a transient negative
completion (retryable), 5yz a permanent one. Connection failures and timeouts
are retryable. ``aiosmtplib.send`` raises ``SMTPRecipientsRefused`` only when
every recipient is refused; with our single recipient that is the whole send.
"""

from __future__ import annotations

from email.message import EmailMessage
from email.utils import formatdate

import aiosmtplib

from channels.provider import PermanentDeliveryError, RetryableDeliveryError, SendResult
from switchboard.notify.v1 import events_pb2


def build_email_message(event: events_pb2.DeliveryRequested, sender: str) -> EmailMessage:
    """The RFC 5322 message for an email delivery.

    ``Message-ID`` is derived from the delivery id, so a resend of the same
    delivery carries the same id (receivers and the sink can deduplicate).
    Text and HTML bodies become a multipart/alternative message.
    """
    message = EmailMessage()
    message["From"] = sender
    message["To"] = event.recipient
    message["Subject"] = event.email.subject
    message["Date"] = formatdate(localtime=False)
    message["Message-ID"] = f"<{event.delivery_id}@switchboard>"
    message["X-Switchboard-Delivery-Id"] = event.delivery_id
    if event.email.text:
        message.set_content(event.email.text)
        if event.email.html:
            message.add_alternative(event.email.html, subtype="html")
    else:
        message.set_content(event.email.html, subtype="html")
    return message


def _classify(code: int, text: str) -> RetryableDeliveryError | PermanentDeliveryError:
    reason = f"SMTP {code}: {text.strip()[:300]}"
    return RetryableDeliveryError(reason) if 400 <= code < 500 else PermanentDeliveryError(reason)


class SmtpProvider:
    """Sends email through one SMTP server (host, port, optional STARTTLS and AUTH)."""

    name = "smtp"

    def __init__(
        self,
        host: str,
        port: int,
        sender: str,
        *,
        username: str | None = None,
        password: str | None = None,
        start_tls: bool | None = False,
        use_tls: bool = False,
        timeout_s: float = 15.0,
    ) -> None:
        self._host = host
        self._port = port
        self._sender = sender
        self._username = username
        self._password = password
        self._start_tls = start_tls
        self._use_tls = use_tls
        self._timeout_s = timeout_s

    def __repr__(self) -> str:
        return f"SmtpProvider(host={self._host!r}, port={self._port})"

    async def send(self, event: events_pb2.DeliveryRequested) -> SendResult:
        """Send one email; raises Retryable/PermanentDeliveryError by the SMTP reply class."""
        message = build_email_message(event, self._sender)
        try:
            refused, _reply = await aiosmtplib.send(
                message,
                hostname=self._host,
                port=self._port,
                username=self._username,
                password=self._password,
                start_tls=self._start_tls,
                use_tls=self._use_tls,
                timeout=self._timeout_s,
            )
        except aiosmtplib.SMTPRecipientsRefused as exc:
            first = exc.recipients[0]
            raise _classify(first.code, first.message) from None
        except aiosmtplib.SMTPResponseException as exc:
            raise _classify(exc.code, exc.message) from None
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            raise RetryableDeliveryError(f"SMTP connection failed: {type(exc).__name__}: {exc}") from None
        if event.recipient in refused:
            code, text = refused[event.recipient]
            raise _classify(code, text)
        return SendResult(provider_message_id=str(message["Message-ID"]))

    async def close(self) -> None:
        """Nothing pooled yet: each send opens its own connection."""
