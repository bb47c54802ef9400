"""Provider configurations: validation, and the split into settings and secrets.

A ``ProviderConfig`` (tenants.v1) is validated when set; its fields are split
into non-secret ``settings`` (stored as JSON, shown on reads) and ``secrets``
(sealed with the master key, never shown). Every rule names the offending
field with a ``google.rpc.BadRequest`` path, e.g. ``config.smtp.port``.

Field rules come from the providers' documentation:

- SMTP: RFC 5321 host/port; TLS per RFC 3207 (STARTTLS) / RFC 8314 (implicit).
- Brevo: https://developers.brevo.com/reference/sendtransacemail (api-key, sender).
- 2Factor: https://2factor.in/API/DOCS/SMS_OTP.html (API key, 6-character sender id).
- Twilio: https://www.twilio.com/docs/messaging/api/message-resource (Account SID
  ``AC`` + 32 hex, auth token, ``From`` in E.164 or ``MessagingServiceSid`` ``MG`` + 32 hex);
  ``StatusCallback`` per https://www.twilio.com/docs/api/errors/21609 (a fully
  qualified http(s) URL, host name without underscores, reachable from the
  internet): see :func:`check_twilio_status_callback` for what we accept.
- FCM: a Google service-account key file (``type``, ``project_id``,
  ``private_key``, ``client_email``, ``token_uri``);
  https://firebase.google.com/docs/admin/setup#initialize_the_sdk_in_non-google_environments
"""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from cryptography.hazmat.primitives.serialization import load_pem_private_key

from channels.callbacks import CallbackUrlError, validate_callback_url
from gateway.validation import FieldViolation, RequestInvalid, normalize_e164
from switchboard.tenants.v1 import tenants_pb2

#: Which channel each provider serves.
PROVIDER_CHANNELS: dict[str, str] = {
    "smtp": "email",
    "brevo": "email",
    "two_factor": "sms",
    "twilio": "sms",
    "fcm": "push",
}
#: The secret fields of each provider (sealed, never returned).
SECRET_FIELDS: dict[str, tuple[str, ...]] = {
    "smtp": ("password",),
    "brevo": ("api_key",),
    "two_factor": ("api_key",),
    "twilio": ("auth_token",),
    "fcm": ("service_account_json",),
}
TLS_MODES = {
    tenants_pb2.SMTP_TLS_MODE_NONE: "none",
    tenants_pb2.SMTP_TLS_MODE_STARTTLS: "starttls",
    tenants_pb2.SMTP_TLS_MODE_IMPLICIT: "implicit",
}
_HOST_RE = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9.\-]*[A-Za-z0-9])?$|^\[[0-9A-Fa-f:.]+\]$")
_TWILIO_ACCOUNT_RE = re.compile(r"^AC[0-9a-fA-F]{32}$")
_TWILIO_SERVICE_RE = re.compile(r"^MG[0-9a-fA-F]{32}$")
_SENDER_ID_RE = re.compile(r"^[A-Za-z0-9]{6}$")
_SERVICE_ACCOUNT_FIELDS = ("type", "project_id", "private_key", "client_email", "token_uri")
MAX_FIELD_CHARS = 1024
MAX_SERVICE_ACCOUNT_BYTES = 16 * 1024


@dataclass(frozen=True)
class SplitConfig:
    """A validated configuration: provider name, its channel, settings and secrets."""

    provider: str
    channel: str
    settings: dict[str, Any]
    secrets: dict[str, str] = field(repr=False)

    @property
    def secret_fields(self) -> list[str]:
        """Names of the secret fields that are set (non-empty)."""
        return sorted(name for name, value in self.secrets.items() if value)


def _bad(path: str, description: str) -> FieldViolation:
    return FieldViolation(field=path, description=description)


def _check_url(path: str, url: str, violations: list[FieldViolation]) -> None:
    if not url:
        return
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        violations.append(_bad(path, "an http(s) URL such as https://api.example.com"))


def _check_length(path: str, value: str, violations: list[FieldViolation]) -> None:
    if len(value) > MAX_FIELD_CHARS:
        violations.append(_bad(path, f"at most {MAX_FIELD_CHARS} characters"))


def _required(path: str, value: str, violations: list[FieldViolation]) -> None:
    if not value.strip():
        violations.append(_bad(path, "required"))


def _split_smtp(
    c: tenants_pb2.SmtpConfig, p: str, v: list[FieldViolation]
) -> tuple[dict[str, Any], dict[str, str]]:
    _required(f"{p}.host", c.host, v)
    if c.host and not _HOST_RE.match(c.host):
        v.append(_bad(f"{p}.host", "a host name or [IP address]"))
    if not 1 <= c.port <= 65535:
        v.append(_bad(f"{p}.port", "1-65535 (587 for STARTTLS, 465 for implicit TLS)"))
    if c.tls_mode not in TLS_MODES:
        v.append(_bad(f"{p}.tls_mode", "one of NONE, STARTTLS, IMPLICIT"))
    if bool(c.username) != bool(c.password):
        v.append(
            _bad(f"{p}.password" if c.username else f"{p}.username", "username and password go together")
        )
    _required(f"{p}.from_address", c.from_address, v)
    for name in ("username", "password", "from_address"):
        _check_length(f"{p}.{name}", getattr(c, name), v)
    if any(ch in c.from_address for ch in "\r\n"):
        v.append(_bad(f"{p}.from_address", "must not contain line breaks"))
    settings = {
        "host": c.host,
        "port": c.port,
        "tls_mode": TLS_MODES.get(c.tls_mode, ""),
        "username": c.username,
        "from_address": c.from_address,
    }
    return settings, {"password": c.password}


def _split_brevo(
    c: tenants_pb2.BrevoConfig, p: str, v: list[FieldViolation]
) -> tuple[dict[str, Any], dict[str, str]]:
    from gateway.validation import normalize_email_address

    _required(f"{p}.api_key", c.api_key, v)
    _required(f"{p}.sender_email", c.sender_email, v)
    if c.sender_email:
        try:
            normalize_email_address(c.sender_email)
        except ValueError as exc:
            v.append(_bad(f"{p}.sender_email", f"not a valid email address: {exc}"))
    for name in ("api_key", "sender_name"):
        _check_length(f"{p}.{name}", getattr(c, name), v)
    _check_url(f"{p}.base_url", c.base_url, v)
    settings = {"sender_email": c.sender_email, "sender_name": c.sender_name, "base_url": c.base_url}
    return settings, {"api_key": c.api_key}


def _split_two_factor(
    c: tenants_pb2.TwoFactorConfig, p: str, v: list[FieldViolation]
) -> tuple[dict[str, Any], dict[str, str]]:
    _required(f"{p}.api_key", c.api_key, v)
    _check_length(f"{p}.api_key", c.api_key, v)
    if not _SENDER_ID_RE.match(c.sender_id):
        v.append(_bad(f"{p}.sender_id", "the registered 6-character sender id (letters and digits)"))
    _check_url(f"{p}.base_url", c.base_url, v)
    return {"sender_id": c.sender_id, "base_url": c.base_url}, {"api_key": c.api_key}


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_twilio_status_callback(url: str) -> str | None:
    """Why ``url`` is not an acceptable Twilio ``StatusCallback``, or ``None`` if it is.

    Accepted: what :func:`channels.callbacks.validate_callback_url` accepts (an
    absolute URL with a host, at most 2048 characters, no whitespace, no user
    info, no fragment), with a host name free of underscores (Twilio refuses
    those, error 21609), over ``https``. Twilio also calls ``http`` URLs, but
    its callbacks carry phone numbers and message status, and the
    ``X-Twilio-Signature`` does not stop a replay over cleartext; so ``http``
    is accepted only for a loopback host (127.0.0.0/8, ::1, ``localhost``),
    which only a local fake of Twilio can call. User info is refused because
    the URL is a setting shown on reads; a receiver authenticates Twilio by
    its ``X-Twilio-Signature`` (https://www.twilio.com/docs/usage/webhooks/webhooks-security).
    """
    try:
        url = validate_callback_url(url)
    except CallbackUrlError as exc:
        return str(exc)
    parts = urlsplit(url)
    host = parts.hostname or ""
    if "_" in host:
        return "Twilio refuses host names with underscores (error 21609)"
    if parts.scheme.lower() != "https" and not _is_loopback(host):
        return "must be an https:// URL (http:// only for a loopback host such as a local fake)"
    return None


def _split_twilio(
    c: tenants_pb2.TwilioConfig, p: str, v: list[FieldViolation]
) -> tuple[dict[str, Any], dict[str, str]]:
    if not _TWILIO_ACCOUNT_RE.match(c.account_sid):
        v.append(_bad(f"{p}.account_sid", "an Account SID: 'AC' followed by 32 hex digits"))
    _required(f"{p}.auth_token", c.auth_token, v)
    _check_length(f"{p}.auth_token", c.auth_token, v)
    if bool(c.from_number) == bool(c.messaging_service_sid):
        v.append(_bad(f"{p}.from_number", "set exactly one of from_number and messaging_service_sid"))
    if c.from_number:
        try:
            normalize_e164(c.from_number)
        except ValueError as exc:
            v.append(_bad(f"{p}.from_number", str(exc)))
    if c.messaging_service_sid and not _TWILIO_SERVICE_RE.match(c.messaging_service_sid):
        v.append(
            _bad(f"{p}.messaging_service_sid", "a Messaging Service SID: 'MG' followed by 32 hex digits")
        )
    _check_url(f"{p}.base_url", c.base_url, v)
    if c.status_callback_url:
        problem = check_twilio_status_callback(c.status_callback_url)
        if problem is not None:
            v.append(_bad(f"{p}.status_callback_url", problem))
    settings = {
        "account_sid": c.account_sid,
        "from_number": c.from_number,
        "messaging_service_sid": c.messaging_service_sid,
        "base_url": c.base_url,
        "status_callback_url": c.status_callback_url.strip(),
    }
    return settings, {"auth_token": c.auth_token}


def parse_service_account(text: str) -> dict[str, Any]:
    """Parse and check a service-account JSON key; raise ``ValueError`` with the reason.

    The reason never quotes the key material.
    """
    if len(text.encode("utf-8")) > MAX_SERVICE_ACCOUNT_BYTES:
        raise ValueError(f"at most {MAX_SERVICE_ACCOUNT_BYTES} bytes")
    try:
        info = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON (line {exc.lineno}, column {exc.colno})") from None
    if not isinstance(info, dict):
        raise ValueError("not a JSON object")
    missing = [
        name for name in _SERVICE_ACCOUNT_FIELDS if not isinstance(info.get(name), str) or not info[name]
    ]
    if missing:
        raise ValueError(f"missing fields: {', '.join(missing)}")
    if info["type"] != "service_account":
        raise ValueError('"type" must be "service_account"')
    try:
        load_pem_private_key(info["private_key"].encode("utf-8"), password=None)
    except (ValueError, TypeError):
        raise ValueError('"private_key" is not a PEM private key') from None
    parts = urlsplit(info["token_uri"])
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ValueError('"token_uri" is not an http(s) URL')
    return info


def _split_fcm(
    c: tenants_pb2.FcmConfig, p: str, v: list[FieldViolation]
) -> tuple[dict[str, Any], dict[str, str]]:
    settings: dict[str, Any] = {"endpoint_base": c.endpoint_base}
    if not c.service_account_json.strip():
        v.append(_bad(f"{p}.service_account_json", "required: the service-account JSON key file"))
    else:
        try:
            info = parse_service_account(c.service_account_json)
            settings.update(project_id=info["project_id"], client_email=info["client_email"])
        except ValueError as exc:
            v.append(_bad(f"{p}.service_account_json", str(exc)))
    _check_url(f"{p}.endpoint_base", c.endpoint_base, v)
    return settings, {"service_account_json": c.service_account_json}


_SPLITTERS = {
    "smtp": _split_smtp,
    "brevo": _split_brevo,
    "two_factor": _split_two_factor,
    "twilio": _split_twilio,
    "fcm": _split_fcm,
}


def split_provider_config(channel: str | None, config: tenants_pb2.ProviderConfig) -> SplitConfig:
    """Validate ``config`` for ``channel`` (``None`` if the channel itself was invalid).

    Raises ``RequestInvalid`` with every violation, paths under ``config``.
    """
    provider = config.WhichOneof("provider")
    if provider is None:
        raise RequestInvalid([_bad("config", "set one of smtp, brevo, two_factor, twilio, fcm")])
    violations: list[FieldViolation] = []
    if channel is not None and PROVIDER_CHANNELS[provider] != channel:
        violations.append(
            _bad(
                f"config.{provider}",
                f"{provider} serves the {PROVIDER_CHANNELS[provider]} channel, not {channel}",
            )
        )
    settings, secrets = _SPLITTERS[provider](getattr(config, provider), f"config.{provider}", violations)  # type: ignore[operator]
    if violations:
        raise RequestInvalid(violations)
    return SplitConfig(
        provider=provider, channel=PROVIDER_CHANNELS[provider], settings=settings, secrets=secrets
    )
