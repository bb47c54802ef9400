"""Email over SMTP with aiosmtplib (RFC 5321; message submission per RFC 6409).

Transport security and authentication:

- implicit TLS (``use_tls=True``, usually port 465): the TLS handshake comes
  first, RFC 8314 (preferred for submission);
- STARTTLS (``start_tls=True``, usually port 587): plain connect, ``EHLO``,
  ``STARTTLS``, TLS handshake, ``EHLO`` again, RFC 3207. A server that does not
  offer STARTTLS is a permanent failure (we never fall back to plain text);
  ``start_tls=None`` upgrades only if offered (opportunistic);
- AUTH (RFC 4954) when ``username`` is set, after TLS. ``tls_context`` (an
  ``ssl.SSLContext``) replaces the default certificate verification, e.g. to
  trust a test server's self-signed certificate.

Connection reuse: one ``aiosmtplib.SMTP`` connection per provider instance,
kept open between sends and used by one send at a time (an ``asyncio.Lock``).
Before a connection is reused it is checked with ``NOOP``; if the server has
dropped it (``SMTPServerDisconnected``) or ``NOOP`` fails, a new connection is
opened. After ``max_messages_per_connection`` messages the connection is
closed with ``QUIT`` and a new one opened (servers limit messages per
session). A timeout, disconnect or cancellation mid-transaction discards the
connection (its state is unknown). :meth:`SmtpProvider.close` sends ``QUIT``.

Replies are classified by RFC 5321 section 4.2 (4.2.1: the first digit):
2yz positive completion; 4yz transient negative completion (retryable);
5yz permanent negative completion (permanent). In particular:

====================================================  =========================================
event                                                 outcome
====================================================  =========================================
421 service not available, closing channel (4.2.3)    retryable (any stage, even the greeting)
450/451/452 (mailbox busy, local error, storage)      retryable
550/551/552/553/554 (mailbox, policy, transaction)    permanent
RCPT refused (``SMTPRecipientsRefused``, or the       by the recipient's reply code
  partial-refusal dict ``send_message`` returns)
MAIL FROM refused (``SMTPSenderRefused``)             by code: 5yz permanent, 4yz retryable
DATA refused (``SMTPDataError``)                      by code
AUTH 535 5.7.8 credentials invalid (RFC 4954)         permanent: wrong username or password
AUTH 454 4.7.0 temporary authentication failure       retryable
AUTH 534 / 538 (mechanism too weak / needs TLS)       permanent
no STARTTLS offered but required, no AUTH offered     permanent (configuration)
timeouts, connection refused/reset, TLS failures      retryable
a reply line that is not RFC 5321 (no 3-digit code)   retryable, connection discarded
====================================================  =========================================

``aiosmtplib`` raises ``SMTPRecipientsRefused`` only when every recipient is
refused; with some (not all) refused, ``send_message`` returns them in a dict.
We send to one recipient, so its refusal is the whole send either way.

A timeout or disconnect after ``DATA`` was sent may hide an accepted message;
the retry resends it with the same ``Message-ID`` (derived from the delivery
id), so receivers can deduplicate. Reasons never contain the password.
"""

from __future__ import annotations

import asyncio
import ssl
from email.message import EmailMessage
from email.utils import formatdate

import aiosmtplib

from channels.provider import DeliveryError, PermanentDeliveryError, RetryableDeliveryError, SendResult
from switchboard.notify.v1 import events_pb2

_MAX_REPLY_TEXT = 300


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


def classify_reply(code: int, text: str, stage: str = "") -> DeliveryError:
    """The error for an SMTP reply (RFC 5321 section 4.2.1): 5yz permanent, anything else retryable.

    ``text`` must already be free of secrets. The reason starts with ``SMTP <code>:``.
    """
    where = f" (reply to {stage})" if stage else ""
    reason = f"SMTP {code}: {text.strip()[:_MAX_REPLY_TEXT]}{where}"
    return PermanentDeliveryError(reason) if 500 <= code < 600 else RetryableDeliveryError(reason)


def _tls_failure(exc: BaseException) -> ssl.SSLError | None:
    """The ``ssl.SSLError`` behind ``exc`` (itself or its cause), if any."""
    for candidate in (exc, exc.__cause__):
        if isinstance(candidate, ssl.SSLError):
            return candidate
    return None


class SmtpProvider:
    """Sends email through one SMTP server; see the module docstring.

    ``host``/``port``: the server. ``sender``: the ``From`` address (RFC 5322,
    e.g. ``Acme <no-reply@acme.example>``; also the envelope sender).
    ``username``/``password``: AUTH credentials (RFC 4954), none for no AUTH.
    ``start_tls``: ``True`` requires STARTTLS (RFC 3207), ``None`` uses it if
    offered, ``False`` never. ``use_tls``: implicit TLS (RFC 8314); exclusive
    with ``start_tls=True``. ``timeout_s``: seconds, per connect and per SMTP
    command. ``tls_context``: the ``ssl.SSLContext`` used for TLS (default:
    system trust store, hostname checked). ``max_messages_per_connection``:
    messages sent on one connection before it is renewed.
    """

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
        tls_context: ssl.SSLContext | None = None,
        max_messages_per_connection: int = 100,
    ) -> None:
        if use_tls and start_tls:
            raise ValueError("use_tls (implicit TLS) and start_tls are mutually exclusive")
        if max_messages_per_connection < 1:
            raise ValueError("max_messages_per_connection must be at least 1")
        self._host = host
        self._port = port
        self._sender = sender
        self._username = username
        self._password = password
        self._start_tls = start_tls
        self._use_tls = use_tls
        self._timeout_s = timeout_s
        self._tls_context = tls_context
        self._max_messages = max_messages_per_connection
        self._lock = asyncio.Lock()
        self._client: aiosmtplib.SMTP | None = None
        self._sent_on_connection = 0
        #: Connections opened so far (successfully connected, secured and authenticated).
        self.connections_opened = 0

    def __repr__(self) -> str:
        tls = (
            "implicit"
            if self._use_tls
            else {True: "starttls", None: "opportunistic", False: "none"}[self._start_tls]
        )
        auth = f", username={self._username!r}, password=<redacted>" if self._username else ""
        return f"SmtpProvider(host={self._host!r}, port={self._port}, tls={tls!r}{auth})"

    def _scrub(self, text: str) -> str:
        """``text`` with the password replaced."""
        return text.replace(self._password, "<redacted>") if self._password else text

    def _reply_error(self, code: int, text: str, stage: str = "") -> DeliveryError:
        return classify_reply(code, self._scrub(text), stage)

    async def send(self, event: events_pb2.DeliveryRequested) -> SendResult:
        """Send one email on the shared connection; raises Retryable/PermanentDeliveryError
        as in the module table. ``provider_message_id`` is the ``Message-ID`` header."""
        if event.WhichOneof("content") != "email":
            raise PermanentDeliveryError("SMTP sends email only: the delivery has no email content")
        message = build_email_message(event, self._sender)
        async with self._lock:
            outcome = await self._send_locked(message, event.recipient)
        if isinstance(outcome, DeliveryError):
            raise outcome  # created outside any except block: no __cause__/__context__ to leak
        return outcome

    async def _send_locked(self, message: EmailMessage, recipient: str) -> SendResult | DeliveryError:
        client = await self._connection()
        if isinstance(client, DeliveryError):
            return client
        try:
            refused, _reply = await client.send_message(message, recipients=[recipient])
        except aiosmtplib.SMTPRecipientsRefused as exc:
            first = exc.recipients[0]
            return self._reply_error(first.code, first.message, "RCPT TO")
        except aiosmtplib.SMTPSenderRefused as exc:
            return self._reply_error(exc.code, exc.message, "MAIL FROM")
        except aiosmtplib.SMTPDataError as exc:
            return self._reply_error(exc.code, exc.message, "DATA")
        except aiosmtplib.SMTPResponseException as exc:
            if exc.code == aiosmtplib.SMTPStatus.invalid_response:
                self._discard()  # the unparsed line stays in the client's buffer
                return RetryableDeliveryError(
                    f"SMTP server sent a malformed reply during the transaction "
                    f"({self._scrub(exc.message)[:_MAX_REPLY_TEXT]}); it may have accepted the message "
                    "(the retry carries the same Message-ID)"
                )
            return self._reply_error(exc.code, exc.message)
        except aiosmtplib.SMTPNotSupported as exc:
            return PermanentDeliveryError(f"SMTP server cannot take this message: {self._scrub(str(exc))}")
        except (aiosmtplib.SMTPTimeoutError, TimeoutError):
            self._discard()
            return RetryableDeliveryError(
                "SMTP server did not answer in time during the transaction; it may have accepted "
                "the message (the retry carries the same Message-ID)"
            )
        except (aiosmtplib.SMTPException, OSError) as exc:
            self._discard()
            return RetryableDeliveryError(
                f"SMTP connection lost during the transaction ({type(exc).__name__}); it may have "
                "accepted the message (the retry carries the same Message-ID)"
            )
        except ValueError as exc:  # an address aiosmtplib cannot send (e.g. line breaks)
            return PermanentDeliveryError(f"invalid address: {self._scrub(str(exc))[:_MAX_REPLY_TEXT]}")
        except BaseException:  # cancelled mid-transaction: the connection's state is unknown
            self._discard()
            raise
        finally:
            if self._client is not None and not self._client.is_connected:
                self._client = None  # e.g. closed by aiosmtplib after a 421
        self._sent_on_connection += 1
        if recipient in refused:
            code, text = refused[recipient]
            return self._reply_error(code, text, "RCPT TO")
        return SendResult(provider_message_id=str(message["Message-ID"]))

    async def _connection(self) -> aiosmtplib.SMTP | DeliveryError:
        """The open connection if it still answers ``NOOP``, otherwise a new one."""
        client = self._client
        if client is not None:
            if client.is_connected and self._sent_on_connection < self._max_messages:
                try:
                    await client.noop()
                except (aiosmtplib.SMTPException, OSError, TimeoutError):
                    client.close()  # dropped by the server (idle timeout, restart): reconnect
                except BaseException:
                    client.close()
                    self._client = None
                    raise
                else:
                    return client
            else:
                await self._quit_quietly(client)
            self._client = None
        return await self._open()

    async def _open(self) -> aiosmtplib.SMTP | DeliveryError:
        """Connect, secure and authenticate a new connection (see the module docstring)."""
        client = aiosmtplib.SMTP(
            hostname=self._host,
            port=self._port,
            use_tls=self._use_tls,
            start_tls=False,  # done below, so each step is classified on its own
            tls_context=self._tls_context,
            timeout=self._timeout_s,
        )
        outcome = await self._establish(client)
        if isinstance(outcome, DeliveryError):
            client.close()
            return outcome
        self._client = client
        self._sent_on_connection = 0
        self.connections_opened += 1
        return client

    async def _establish(self, client: aiosmtplib.SMTP) -> DeliveryError | None:
        stage = "connect"
        try:
            await client.connect()
            if self._start_tls is not False and not self._use_tls:
                stage = "EHLO"
                await client.ehlo()
                if client.supports_extension("starttls"):
                    stage = "STARTTLS"
                    await client.starttls()
                elif self._start_tls:
                    return PermanentDeliveryError(
                        "SMTP server does not offer STARTTLS (RFC 3207) but the configuration requires it"
                    )
            if self._username:
                stage = "EHLO"
                if client.is_ehlo_or_helo_needed:
                    await client.ehlo()
                if not client.supports_extension("auth"):
                    secured = self._use_tls or self._start_tls is not False
                    return PermanentDeliveryError(
                        "SMTP server does not offer AUTH (RFC 4954)"
                        + ("" if secured else " on a plain connection")
                        + "; check the TLS mode"
                    )
                stage = "AUTH"
                await client.login(self._username, self._password or "")
        except aiosmtplib.SMTPAuthenticationError as exc:
            if exc.code == 535:
                return PermanentDeliveryError(
                    f"SMTP 535: authentication failed, wrong username or password: "
                    f"{self._scrub(exc.message).strip()[:_MAX_REPLY_TEXT]}"
                )
            return self._reply_error(exc.code, exc.message, "AUTH")
        except aiosmtplib.SMTPResponseException as exc:
            return self._reply_error(exc.code, exc.message, "the greeting" if stage == "connect" else stage)
        except (aiosmtplib.SMTPTimeoutError, TimeoutError):
            return RetryableDeliveryError(f"SMTP server did not answer in time ({stage}); not sent")
        except (aiosmtplib.SMTPException, OSError) as exc:
            tls = _tls_failure(exc)
            if tls is not None:
                if isinstance(tls, ssl.SSLCertVerificationError):
                    detail = f"certificate verification failed: {tls.verify_message}"
                else:
                    detail = tls.reason or type(tls).__name__
                return RetryableDeliveryError(f"SMTP TLS handshake failed ({stage}): {detail}; not sent")
            return RetryableDeliveryError(
                f"SMTP {stage} failed: {self._scrub(str(exc))[:_MAX_REPLY_TEXT]}; not sent"
            )
        except BaseException:
            client.close()
            raise
        return None

    def _discard(self) -> None:
        """Drop the current connection without ``QUIT`` (its state is unknown)."""
        if self._client is not None:
            self._client.close()
            self._client = None

    async def _quit_quietly(self, client: aiosmtplib.SMTP) -> None:
        """``QUIT`` politely; any failure just closes the socket."""
        try:
            if client.is_connected:
                await client.quit()
        except (aiosmtplib.SMTPException, OSError, TimeoutError):
            pass
        finally:
            client.close()

    async def close(self) -> None:
        """``QUIT`` and close the connection (waits for a send in progress). A later
        ``send`` opens a new connection."""
        async with self._lock:
            client, self._client = self._client, None
            if client is not None:
                await self._quit_quietly(client)
