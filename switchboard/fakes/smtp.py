"""A fake SMTP server on loopback (aiosmtpd ``Controller``) with TLS, AUTH and fault injection.

- TLS: ``tls="none"``, ``"starttls"`` (RFC 3207: ``STARTTLS`` offered and
  required before ``MAIL``) or ``"implicit"`` (RFC 8314: TLS from the first
  byte). The certificate is generated at start with ``cryptography``: a
  throwaway CA and a server certificate for ``localhost`` / ``127.0.0.1``
  signed by it, written to a temporary directory. :meth:`FakeSmtpServer.client_tls_context`
  is the ``ssl.SSLContext`` a client needs to trust it (hostname checking on).
- AUTH (RFC 4954): with ``username``/``password`` set, ``AUTH PLAIN`` and
  ``AUTH LOGIN`` are offered and required before ``MAIL`` (530 otherwise);
  wrong credentials get ``535 5.7.8``. By default AUTH needs TLS only in
  STARTTLS mode (aiosmtpd cannot see implicit TLS; plain mode is for tests).
- Record: every accepted message in ``received`` (envelope sender and
  recipients, the parsed message, the authenticated login, whether TLS was on,
  which connection carried it). ``connections`` counts client connections
  (those that said ``EHLO``/``HELO``; the controller's own start-up probe does not).
- Faults, one per message, in order (:meth:`FakeSmtpServer.inject`):
  :meth:`SmtpFault.data_reply` answers ``DATA`` with e.g. 421, 451, 550 or 554
  (421 also closes the connection, RFC 5321 section 3.8);
  :meth:`SmtpFault.rcpt_refused` refuses the next ``RCPT`` (or only a given
  recipient's, so a message to several recipients is partly refused) with
  e.g. 550 or 450; :meth:`SmtpFault.slow_data` accepts the message but
  answers ``DATA`` only after a delay (past a client's timeout: the client
  cannot know it was accepted); :meth:`SmtpFault.reset_in_data` aborts the
  TCP connection after the content arrived, before any reply (nothing is
  accepted); :meth:`SmtpFault.malformed_reply` answers ``DATA`` with a line
  that is not an RFC 5321 section 4.2 reply (no 3-digit code; nothing is
  accepted). :meth:`FakeSmtpServer.drop_connections` closes every open
  connection (a server restart or idle timeout, as the client sees it).

The server runs in the controller's own thread and event loop; the record and
the fault queue are guarded by a lock.
"""

from __future__ import annotations

import asyncio
import datetime
import hmac
import ipaddress
import ssl
import tempfile
import threading
import weakref
from collections import deque
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any, Literal

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from switchboard.embedded import free_port

TlsMode = Literal["none", "starttls", "implicit"]


@dataclass(frozen=True)
class GeneratedCertificate:
    """Files of a generated CA and of a server certificate signed by it (PEM)."""

    ca_cert: Path
    server_cert: Path
    server_key: Path

    def server_context(self) -> ssl.SSLContext:
        """The server side: presents the server certificate, asks nothing of clients."""
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.server_cert, self.server_key)
        return context

    def client_context(self) -> ssl.SSLContext:
        """A client context trusting only the generated CA, hostname checking on."""
        return ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.ca_cert))


def generate_certificate(
    directory: Path, hostnames: tuple[str, ...] = ("localhost",), ips: tuple[str, ...] = ("127.0.0.1",)
) -> GeneratedCertificate:
    """Write a new CA and a server certificate for ``hostnames``/``ips`` (valid one day) to ``directory``.

    EC P-256 keys; the server certificate carries subjectAltName, serverAuth
    extended key usage and key identifiers, as strict verifiers require.
    """
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Switchboard fake SMTP test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.DNSName(h) for h in hostnames]
    names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostnames[0])]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = GeneratedCertificate(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    paths.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    paths.server_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths.server_key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    paths.server_key.chmod(0o600)
    return paths


@dataclass(frozen=True)
class SmtpFault:
    """One injected failure for the next message, at ``stage``.

    ``reply``: answered instead of accepting (any text; need not be a valid
    reply). ``close_connection``: close after the reply. ``recipient``: for
    ``rcpt``, only that address's ``RCPT`` (other recipients are accepted).
    ``delay_s``: wait this long (seconds) before answering; with no ``reply``
    the answer is the usual one (at ``data``, the message is recorded as
    accepted before the wait). ``reset``: abort the connection without a reply.
    """

    stage: Literal["rcpt", "data"]
    reply: str = ""
    close_connection: bool = False
    recipient: str | None = None
    delay_s: float = 0.0
    reset: bool = False

    @classmethod
    def data_reply(cls, code: int, text: str = "") -> SmtpFault:
        """Answer ``DATA`` (after the content) with ``code``; 421 also closes the connection."""
        return cls("data", f"{code} {text or _DEFAULT_TEXT.get(code, 'injected failure')}", code == 421)

    @classmethod
    def rcpt_refused(cls, code: int, text: str = "", *, recipient: str | None = None) -> SmtpFault:
        """Refuse the next ``RCPT TO`` (only ``recipient``'s, if given) with ``code``
        (e.g. 550 unknown mailbox, 450 busy)."""
        reply = f"{code} {text or _DEFAULT_TEXT.get(code, 'injected refusal')}"
        return cls("rcpt", reply, code == 421, recipient=recipient)

    @classmethod
    def slow_data(cls, delay_s: float) -> SmtpFault:
        """Accept (record) the message, but answer ``DATA`` with 250 only after ``delay_s`` seconds."""
        return cls("data", delay_s=delay_s)

    @classmethod
    def reset_in_data(cls) -> SmtpFault:
        """Abort the TCP connection once the content has arrived, before any reply."""
        return cls("data", reset=True)

    @classmethod
    def malformed_reply(cls, line: str = "OK, got it, thanks") -> SmtpFault:
        """Answer ``DATA`` with ``line``, which is not an RFC 5321 reply (no 3-digit code)."""
        return cls("data", line)


_DEFAULT_TEXT = {
    421: "4.3.2 Service not available, closing transmission channel",
    450: "4.2.1 Mailbox busy, try again later",
    451: "4.3.0 Local error in processing, try again later",
    452: "4.3.1 Insufficient system storage",
    550: "5.1.1 Mailbox unavailable",
    552: "5.3.4 Message too big",
    554: "5.7.1 Transaction failed: message rejected",
}


@dataclass
class ReceivedMail:
    """One accepted message."""

    mail_from: str
    rcpt_tos: list[str]
    message: EmailMessage
    raw: bytes
    login: str | None
    tls: bool
    connection: int


@dataclass
class _State:
    lock: threading.Lock = field(default_factory=threading.Lock)
    received: list[ReceivedMail] = field(default_factory=list)
    faults: deque[SmtpFault] = field(default_factory=deque)
    connections: int = 0
    auth_failures: int = 0
    #: Connection number of each live server protocol (one ``SMTP`` instance per TCP
    #: connection; its ``Session`` is replaced after STARTTLS, so it cannot be the key).
    numbers: weakref.WeakKeyDictionary[SMTP, int] = field(default_factory=weakref.WeakKeyDictionary)


class _Handler:
    """aiosmtpd handler hooks; runs in the controller's thread."""

    def __init__(self, state: _State, tls_mode: TlsMode) -> None:
        self._state = state
        self._tls_mode = tls_mode

    def _note_connection(self, server: SMTP) -> None:
        with self._state.lock:
            if server not in self._state.numbers:
                self._state.connections += 1
                self._state.numbers[server] = self._state.connections

    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname  # the 5-argument hook must set it (aiosmtpd docs)
        self._note_connection(server)
        return responses

    async def handle_HELO(self, server: SMTP, session: Session, envelope: Envelope, hostname: str) -> str:
        session.host_name = hostname
        self._note_connection(server)
        return f"250 {server.hostname}"

    def _next_fault(self, stage: str, address: str | None = None) -> SmtpFault | None:
        with self._state.lock:
            faults = self._state.faults
            if faults and faults[0].stage == stage and faults[0].recipient in (None, address):
                return faults.popleft()
        return None

    async def _apply(self, server: SMTP, fault: SmtpFault) -> str | None:
        """Carry out ``fault``; the reply to send instead of the normal one, or ``None`` to go on."""
        if fault.delay_s:
            await asyncio.sleep(fault.delay_s)
        if fault.reset:
            if isinstance(server.transport, asyncio.Transport):
                server.transport.abort()
            return "421 4.4.2 connection reset"  # never reaches the client
        if fault.close_connection:
            self._close_soon(server)
        return fault.reply or None

    @staticmethod
    def _close_soon(server: SMTP) -> None:
        """Close the connection after the reply being sent (421, RFC 5321 section 3.8)."""
        transport = server.transport
        if transport is not None:
            asyncio.get_running_loop().call_soon(transport.close)

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, rcpt_options: list[str]
    ) -> str:
        fault = self._next_fault("rcpt", address)
        if fault is not None:
            reply = await self._apply(server, fault)
            if reply is not None:
                return reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        fault = self._next_fault("data")
        if fault is not None and (fault.reply or fault.reset):
            reply = await self._apply(server, fault)
            if reply is not None:
                return reply
        raw = envelope.original_content or b""
        parsed = message_from_bytes(raw, policy=policy.default)
        assert isinstance(parsed, EmailMessage)
        login = session.login_data.decode() if isinstance(session.login_data, bytes) else None
        mail = ReceivedMail(
            mail_from=envelope.mail_from or "",
            rcpt_tos=list(envelope.rcpt_tos),
            message=parsed,
            raw=raw,
            login=login,
            tls=self._tls_mode == "implicit" or session.ssl is not None,
            connection=0,
        )
        with self._state.lock:
            mail.connection = self._state.numbers.get(server, 0)
            self._state.received.append(mail)
        if fault is not None:
            await self._apply(server, fault)  # slow_data: accepted (recorded), answered late
        return "250 2.0.0 OK: queued"


class FakeSmtpServer:
    """An SMTP server on ``host:port`` (a free port if 0); see the module docstring.

    Use as a context manager or call :meth:`start` / :meth:`stop`. ``auth_require_tls``
    defaults to ``True`` for STARTTLS and ``False`` otherwise. ``auth_mechanisms``:
    the SASL mechanisms offered (``LOGIN`` and/or ``PLAIN``).
    """

    def __init__(
        self,
        *,
        tls: TlsMode = "none",
        username: str | None = None,
        password: str | None = None,
        auth_require_tls: bool | None = None,
        auth_mechanisms: tuple[str, ...] = ("LOGIN", "PLAIN"),
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        if (username is None) != (password is None):
            raise ValueError("username and password go together")
        self.tls: TlsMode = tls
        self.host = host
        self.port = port or free_port(host)
        self._username = username
        self._password = password
        self._auth_require_tls = tls == "starttls" if auth_require_tls is None else auth_require_tls
        unknown = set(auth_mechanisms) - {"LOGIN", "PLAIN"}
        if unknown or not auth_mechanisms:
            raise ValueError(f"auth_mechanisms: a non-empty subset of LOGIN, PLAIN (got {auth_mechanisms})")
        self._auth_exclude = tuple(m for m in ("LOGIN", "PLAIN") if m not in auth_mechanisms)
        self._state = _State()
        self._tempdir: tempfile.TemporaryDirectory[str] | None = None
        self._certificate: GeneratedCertificate | None = None
        self._controller: Controller | None = None

    def __repr__(self) -> str:
        return f"FakeSmtpServer(host={self.host!r}, port={self.port}, tls={self.tls!r})"

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> None:
        """Generate the certificate (TLS modes) and start listening (blocks until ready)."""
        kwargs: dict[str, Any] = {"hostname": self.host, "port": self.port, "server_hostname": "localhost"}
        if self.tls != "none":
            self._tempdir = tempfile.TemporaryDirectory(prefix="switchboard-fake-smtp-")
            self._certificate = generate_certificate(Path(self._tempdir.name))
            server_context = self._certificate.server_context()
            if self.tls == "starttls":
                kwargs.update(tls_context=server_context, require_starttls=True)
            else:
                kwargs["ssl_context"] = server_context
        if self._username is not None:
            kwargs.update(
                authenticator=self._authenticate,
                auth_required=True,
                auth_require_tls=self._auth_require_tls,
                auth_exclude_mechanism=self._auth_exclude,
            )
        controller = Controller(_Handler(self._state, self.tls), **kwargs)
        try:
            controller.start()
        except BaseException:
            self.stop()
            raise
        self._controller = controller

    def stop(self) -> None:
        """Stop listening, close connections, delete the certificate files."""
        if self._controller is not None:
            self._controller.stop()
            self._controller = None
        if self._tempdir is not None:
            self._tempdir.cleanup()
            self._tempdir = None

    def __enter__(self) -> FakeSmtpServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- client side helpers ----------------------------------------------

    def client_tls_context(self) -> ssl.SSLContext | None:
        """The context a client needs to trust this server (``None`` without TLS)."""
        return self._certificate.client_context() if self._certificate is not None else None

    @property
    def certificate(self) -> GeneratedCertificate | None:
        """The generated certificate files (``None`` without TLS)."""
        return self._certificate

    # -- record and faults -------------------------------------------------

    @property
    def received(self) -> list[ReceivedMail]:
        """A copy of the accepted messages, in order."""
        with self._state.lock:
            return list(self._state.received)

    @property
    def connections(self) -> int:
        """Client connections so far (those that sent ``EHLO``/``HELO``)."""
        with self._state.lock:
            return self._state.connections

    @property
    def auth_failures(self) -> int:
        """``AUTH`` attempts refused with 535."""
        with self._state.lock:
            return self._state.auth_failures

    def inject(self, *faults: SmtpFault) -> None:
        """Queue faults for the next messages, one per message, in order."""
        with self._state.lock:
            self._state.faults.extend(faults)

    async def drop_connections(self) -> None:
        """Close every open client connection from the server side and wait until done."""
        controller = self._controller
        if controller is None:
            return

        async def close_all() -> None:
            with self._state.lock:
                servers = list(self._state.numbers.keys())
            for server in servers:
                if server.transport is not None:
                    server.transport.close()

        await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(close_all(), controller.loop))

    # -- AUTH ---------------------------------------------------------------

    def _authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
    ) -> AuthResult:
        assert self._username is not None
        assert self._password is not None
        if isinstance(auth_data, LoginPassword) and (
            hmac.compare_digest(auth_data.login, self._username.encode())
            and hmac.compare_digest(auth_data.password, self._password.encode())
        ):
            return AuthResult(success=True, auth_data=auth_data)
        with self._state.lock:
            self._state.auth_failures += 1
        return AuthResult(success=False, handled=False)
