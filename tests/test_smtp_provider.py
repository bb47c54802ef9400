"""The SMTP provider against the fake SMTP server: plain, STARTTLS and implicit TLS
with AUTH, reply classification, connection reuse and reconnection (channels/smtp.py)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from typing import TYPE_CHECKING, Any

import aiosmtplib
import asyncpg
import pytest

from channels.delivery import Outcome, RetryPolicy, deliver
from channels.provider import DeliveryError, PermanentDeliveryError, RetryableDeliveryError
from channels.smtp import SmtpProvider, classify_reply
from switchboard.embedded import free_port
from switchboard.fakes.smtp import FakeSmtpServer, SmtpFault, TlsMode
from switchboard.notify.v1 import events_pb2, notify_pb2, notify_pb2_grpc
from switchboard.settings import Settings
from tests.conftest import TenantCredentials
from tests.helpers import send_request, tenant_providers, wait_for

if TYPE_CHECKING:
    Stub = notify_pb2_grpc.NotificationServiceAsyncStub

# aiosmtpd warns when AUTH is allowed without TLS, which the plain-text fake does on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")

USERNAME = "acme-mailer"
PASSWORD = "smtp-pa55-9f2c4e7a-never-shown"
SENDER = "Acme <no-reply@acme.example>"


def email_event(recipient: str = "ada@example.com") -> events_pb2.DeliveryRequested:
    return events_pb2.DeliveryRequested(
        delivery_id=str(uuid.uuid4()),
        notification_id=str(uuid.uuid4()),
        tenant_id=str(uuid.uuid4()),
        channel=notify_pb2.CHANNEL_EMAIL,
        recipient=recipient,
        email=notify_pb2.EmailContent(subject="Hello", text="Plain body", html="<p>HTML body</p>"),
    )


@pytest.fixture
def plain_server() -> Iterator[FakeSmtpServer]:
    with FakeSmtpServer(username=USERNAME, password=PASSWORD) as server:
        yield server


@pytest.fixture
async def provider(plain_server: FakeSmtpServer) -> AsyncIterator[SmtpProvider]:
    client = provider_for(plain_server)
    yield client
    await client.close()


def provider_for(server: FakeSmtpServer, **overrides: Any) -> SmtpProvider:
    options: dict[str, Any] = {
        "username": USERNAME,
        "password": PASSWORD,
        "start_tls": server.tls == "starttls",
        "use_tls": server.tls == "implicit",
        "tls_context": server.client_tls_context(),
        "timeout_s": 5.0,
    }
    options.update(overrides)
    return SmtpProvider(server.host, server.port, SENDER, **options)


def assert_no_password(error: DeliveryError, provider: SmtpProvider) -> None:
    assert PASSWORD not in str(error)
    assert PASSWORD not in repr(error)
    assert PASSWORD not in repr(provider)
    assert error.__cause__ is None
    assert error.__context__ is None


@pytest.mark.parametrize("tls", ["none", "starttls", "implicit"])
async def test_sends_with_auth(tls: TlsMode) -> None:
    with FakeSmtpServer(tls=tls, username=USERNAME, password=PASSWORD) as server:
        provider = provider_for(server)
        event = email_event()
        try:
            result = await provider.send(event)
        finally:
            await provider.close()
        [mail] = server.received
    assert mail.login == USERNAME
    assert mail.tls is (tls != "none")
    assert mail.mail_from == "no-reply@acme.example"
    assert mail.rcpt_tos == ["ada@example.com"]
    assert mail.message["Message-ID"] == f"<{event.delivery_id}@switchboard>"
    assert mail.message["X-Switchboard-Delivery-Id"] == event.delivery_id
    assert mail.message["Subject"] == "Hello"
    text_part = mail.message.get_body(("plain",))
    assert text_part is not None
    assert text_part.get_content().strip() == "Plain body"
    assert result.provider_message_id == f"<{event.delivery_id}@switchboard>"


@pytest.mark.parametrize("mechanism", ["LOGIN", "PLAIN"])
async def test_auth_mechanisms(mechanism: str) -> None:
    with FakeSmtpServer(username=USERNAME, password=PASSWORD, auth_mechanisms=(mechanism,)) as server:
        provider = provider_for(server)
        try:
            await provider.send(email_event())
        finally:
            await provider.close()
        assert [mail.login for mail in server.received] == [USERNAME]


async def test_wrong_password_is_permanent_and_not_quoted(plain_server: FakeSmtpServer) -> None:
    provider = provider_for(plain_server, password="wrong-" + PASSWORD)
    try:
        with pytest.raises(PermanentDeliveryError) as caught:
            await provider.send(email_event())
    finally:
        await provider.close()
    assert caught.value.reason.startswith("SMTP 535")
    assert "wrong username or password" in caught.value.reason
    assert "wrong-" + PASSWORD not in caught.value.reason
    assert_no_password(caught.value, provider)
    assert plain_server.auth_failures >= 1
    assert plain_server.received == []


async def test_data_451_is_retryable(plain_server: FakeSmtpServer, provider: SmtpProvider) -> None:
    plain_server.inject(SmtpFault.data_reply(451))
    with pytest.raises(RetryableDeliveryError) as caught:
        await provider.send(email_event())
    assert caught.value.reason.startswith("SMTP 451")
    assert "DATA" in caught.value.reason
    assert_no_password(caught.value, provider)
    # The connection survives a transaction failure and is reused.
    await provider.send(email_event())
    assert plain_server.connections == 1


async def test_rcpt_550_is_permanent(plain_server: FakeSmtpServer, provider: SmtpProvider) -> None:
    plain_server.inject(SmtpFault.rcpt_refused(550, "5.1.1 <nobody@example.com>: no such user"))
    with pytest.raises(PermanentDeliveryError) as caught:
        await provider.send(email_event("nobody@example.com"))
    assert caught.value.reason.startswith("SMTP 550")
    assert "RCPT TO" in caught.value.reason
    assert_no_password(caught.value, provider)
    assert plain_server.received == []


async def test_a_partial_refusal_is_returned_not_raised_so_we_send_one_recipient_per_message(
    plain_server: FakeSmtpServer, provider: SmtpProvider
) -> None:
    """The aiosmtplib trap (issue 4): with two recipients and one refused it raises
    nothing and reports the refusal in its result. The provider therefore sends one
    recipient per message, whose refusal is the whole send (SMTPRecipientsRefused)."""
    plain_server.inject(SmtpFault.rcpt_refused(550, recipient="nobody@example.com"))
    client = aiosmtplib.SMTP(hostname=plain_server.host, port=plain_server.port, timeout=5.0)
    await client.connect()
    try:
        await client.login(USERNAME, PASSWORD)
        message = EmailMessage()
        message["From"], message["Subject"] = SENDER, "two recipients"
        message.set_content("one of them does not exist")
        refused, _ = await client.send_message(message, recipients=["nobody@example.com", "ada@example.com"])
    finally:
        await client.quit()
    assert {rcpt: reply.code for rcpt, reply in refused.items()} == {"nobody@example.com": 550}
    assert [mail.rcpt_tos for mail in plain_server.received] == [["ada@example.com"]]

    plain_server.inject(SmtpFault.rcpt_refused(550, recipient="nobody@example.com"))
    with pytest.raises(PermanentDeliveryError) as caught:
        await provider.send(email_event("nobody@example.com"))
    assert caught.value.reason.startswith("SMTP 550")
    assert "RCPT TO" in caught.value.reason
    assert len(plain_server.received) == 1


async def test_rcpt_450_is_retryable(plain_server: FakeSmtpServer, provider: SmtpProvider) -> None:
    plain_server.inject(SmtpFault.rcpt_refused(450))
    with pytest.raises(RetryableDeliveryError) as caught:
        await provider.send(email_event())
    assert caught.value.reason.startswith("SMTP 450")


async def test_data_554_is_permanent(plain_server: FakeSmtpServer, provider: SmtpProvider) -> None:
    plain_server.inject(SmtpFault.data_reply(554))
    with pytest.raises(PermanentDeliveryError) as caught:
        await provider.send(email_event())
    assert caught.value.reason.startswith("SMTP 554")


@pytest.mark.parametrize(
    ("fault", "stage"),
    [(SmtpFault.data_reply(421), "DATA"), (SmtpFault.rcpt_refused(421), "RCPT TO")],
    ids=["DATA", "RCPT"],
)
async def test_421_is_retryable_and_the_next_send_reconnects(
    plain_server: FakeSmtpServer, provider: SmtpProvider, fault: SmtpFault, stage: str
) -> None:
    plain_server.inject(fault)
    with pytest.raises(RetryableDeliveryError) as caught:
        await provider.send(email_event())
    assert caught.value.reason.startswith("SMTP 421")
    assert stage in caught.value.reason
    await provider.send(email_event())
    assert len(plain_server.received) == 1
    assert plain_server.connections == 2


async def test_sequential_sends_share_one_connection(
    plain_server: FakeSmtpServer, provider: SmtpProvider
) -> None:
    await provider.send(email_event())
    await provider.send(email_event())
    await provider.send(email_event())
    assert len(plain_server.received) == 3
    assert plain_server.connections == 1
    assert provider.connections_opened == 1
    assert {mail.connection for mail in plain_server.received} == {1}


async def test_concurrent_sends_are_serialized_on_one_connection(
    plain_server: FakeSmtpServer, provider: SmtpProvider
) -> None:
    await asyncio.gather(*(provider.send(email_event()) for _ in range(5)))
    assert len(plain_server.received) == 5
    assert plain_server.connections == 1


async def test_reconnects_after_the_server_dropped_the_connection(
    plain_server: FakeSmtpServer, provider: SmtpProvider
) -> None:
    await provider.send(email_event())
    await plain_server.drop_connections()
    await provider.send(email_event())
    assert len(plain_server.received) == 2
    assert plain_server.connections == 2
    assert [mail.connection for mail in plain_server.received] == [1, 2]


async def test_connection_renewed_after_max_messages(plain_server: FakeSmtpServer) -> None:
    provider = provider_for(plain_server, max_messages_per_connection=2)
    try:
        for _ in range(3):
            await provider.send(email_event())
    finally:
        await provider.close()
    assert [mail.connection for mail in plain_server.received] == [1, 1, 2]


async def test_send_after_close_reconnects(plain_server: FakeSmtpServer, provider: SmtpProvider) -> None:
    await provider.send(email_event())
    await provider.close()
    await provider.send(email_event())
    assert plain_server.connections == 2


async def test_untrusted_certificate_is_retryable() -> None:
    with FakeSmtpServer(tls="implicit", username=USERNAME, password=PASSWORD) as server:
        provider = provider_for(server, tls_context=None)  # the system trust store
        try:
            with pytest.raises(RetryableDeliveryError) as caught:
                await provider.send(email_event())
        finally:
            await provider.close()
        assert server.received == []
    assert "TLS handshake failed" in caught.value.reason
    assert "certificate verification failed" in caught.value.reason
    assert_no_password(caught.value, provider)


async def test_required_starttls_not_offered_is_permanent(plain_server: FakeSmtpServer) -> None:
    provider = provider_for(plain_server, start_tls=True)
    try:
        with pytest.raises(PermanentDeliveryError) as caught:
            await provider.send(email_event())
    finally:
        await provider.close()
    assert "does not offer STARTTLS" in caught.value.reason
    assert plain_server.received == []


async def test_auth_over_plain_text_refused_by_a_starttls_server() -> None:
    """A STARTTLS server offers AUTH only after STARTTLS: a provider configured
    without TLS cannot authenticate, which is a configuration error."""
    with FakeSmtpServer(tls="starttls", username=USERNAME, password=PASSWORD) as server:
        provider = provider_for(server, start_tls=False)
        try:
            with pytest.raises(PermanentDeliveryError) as caught:
                await provider.send(email_event())
        finally:
            await provider.close()
    assert "does not offer AUTH" in caught.value.reason
    assert_no_password(caught.value, provider)


async def test_connection_refused_is_retryable() -> None:
    provider = SmtpProvider("127.0.0.1", free_port(), SENDER, timeout_s=2.0)
    with pytest.raises(RetryableDeliveryError) as caught:
        await provider.send(email_event())
    assert "not sent" in caught.value.reason
    await provider.close()


async def test_silent_server_times_out_retryably() -> None:
    """A server that accepts the TCP connection but never greets."""
    accepted = asyncio.Event()
    writers: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        accepted.set()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    provider = SmtpProvider("127.0.0.1", port, SENDER, timeout_s=0.2)
    try:
        with pytest.raises(RetryableDeliveryError) as caught:
            await provider.send(email_event())
    finally:
        await provider.close()
        for writer in writers:
            writer.close()
        server.close()
        await server.wait_closed()
    assert accepted.is_set()
    assert "did not answer in time (connect)" in caught.value.reason


def test_repr_hides_the_password() -> None:
    provider = SmtpProvider(
        "smtp.example.com", 587, SENDER, username=USERNAME, password=PASSWORD, start_tls=True
    )
    assert PASSWORD not in repr(provider)
    assert "starttls" in repr(provider)


@pytest.mark.parametrize(
    ("code", "retryable"),
    [
        (421, True),
        (450, True),
        (451, True),
        (452, True),
        (454, True),
        (550, False),
        (551, False),
        (552, False),
        (553, False),
        (554, False),
        (535, False),
    ],
)
def test_reply_classes_follow_rfc_5321(code: int, retryable: bool) -> None:
    error = classify_reply(code, "text", "DATA")
    assert error.retryable is retryable
    assert error.reason.startswith(f"SMTP {code}: text")


# --- faults in the middle of a transaction ------------------------------------------------------

TRANSACTION_TIMEOUT_S = 0.3


@dataclass(frozen=True)
class TransactionFault:
    """A fault after the content was sent, the reason it must give, and whether the
    server accepted the message anyway (what makes the failure ambiguous)."""

    fault: SmtpFault
    in_reason: str
    accepted_anyway: bool


TRANSACTION_FAULTS = {
    "slow DATA reply past the timeout": TransactionFault(
        SmtpFault.slow_data(TRANSACTION_TIMEOUT_S * 4), "did not answer in time during the transaction", True
    ),
    "connection reset in DATA": TransactionFault(
        SmtpFault.reset_in_data(), "connection lost during the transaction", False
    ),
    "malformed reply line": TransactionFault(
        SmtpFault.malformed_reply("OK, got it, thanks"), "malformed reply during the transaction", False
    ),
}


async def _received_ids(server: FakeSmtpServer, count: int) -> list[str] | None:
    ids = [str(mail.message["X-Switchboard-Delivery-Id"]) for mail in server.received]
    return ids if len(ids) >= count else None


@pytest.mark.parametrize("case", TRANSACTION_FAULTS.values(), ids=TRANSACTION_FAULTS.keys())
async def test_transaction_faults_are_retryable_and_the_next_send_reconnects(
    plain_server: FakeSmtpServer, case: TransactionFault
) -> None:
    provider = provider_for(plain_server, timeout_s=TRANSACTION_TIMEOUT_S)
    first, second = email_event(), email_event()
    plain_server.inject(case.fault)
    try:
        with pytest.raises(RetryableDeliveryError) as caught:
            await provider.send(first)
        await provider.send(second)  # the connection in an unknown state was not reused
    finally:
        await provider.close()
    assert case.in_reason in caught.value.reason
    assert "it may have accepted the message" in caught.value.reason
    assert_no_password(caught.value, provider)
    assert provider.connections_opened == 2
    expected = [first.delivery_id, second.delivery_id] if case.accepted_anyway else [second.delivery_id]
    got = await wait_for(lambda: _received_ids(plain_server, len(expected)), timeout_s=10)
    assert sorted(got) == sorted(expected)


@pytest.mark.parametrize("case", TRANSACTION_FAULTS.values(), ids=TRANSACTION_FAULTS.keys())
async def test_transaction_faults_are_recorded_as_retryable_attempts(
    stub: Stub, tenant: TenantCredentials, pool: asyncpg.Pool, settings: Settings, case: TransactionFault
) -> None:
    with FakeSmtpServer() as server:
        settings.smtp_port = server.port  # the tenant has no provider of its own: the default SMTP
        settings.worker_provider_timeout_s = TRANSACTION_TIMEOUT_S
        accepted = await stub.SendNotification(
            send_request(channels=[notify_pb2.CHANNEL_EMAIL]), metadata=tenant.metadata
        )
        delivery_id = uuid.UUID(accepted.deliveries[0].delivery_id)
        event = events_pb2.DeliveryRequested.FromString(
            await pool.fetchval("SELECT event FROM deliveries WHERE id = $1", delivery_id)
        )
        providers = tenant_providers(pool, settings)
        server.inject(case.fault)
        try:
            outcome = await deliver(
                pool,
                event,
                lambda: providers.provider_for(tenant.tenant_id, "email"),
                policy=RetryPolicy(max_attempts=5, max_age_s=3600, base_s=0.01, cap_s=0.01),
            )
        finally:
            await providers.close()
        if case.accepted_anyway:
            await wait_for(lambda: _received_ids(server, 1), timeout_s=10)
    assert outcome == Outcome.RETRY_SCHEDULED
    attempt = await pool.fetchrow(
        """SELECT attempt_number, outcome, provider, error, finished_at
             FROM delivery_attempts WHERE delivery_id = $1""",
        delivery_id,
    )
    assert attempt is not None
    assert (attempt["attempt_number"], attempt["outcome"], attempt["provider"]) == (1, "retryable", "smtp")
    assert case.in_reason in attempt["error"]
    assert attempt["finished_at"] is not None
    delivery = await pool.fetchrow(
        "SELECT status, last_error, next_attempt_at FROM deliveries WHERE id = $1", delivery_id
    )
    assert delivery is not None
    assert (delivery["status"], delivery["last_error"]) == ("queued", attempt["error"])
    retry_due = await pool.fetchval(
        "SELECT available_at FROM outbox WHERE delivery_id = $1 ORDER BY id DESC LIMIT 1", delivery_id
    )
    assert retry_due == delivery["next_attempt_at"]
