"""Payment processor configurations: validation, and the split into settings and secrets.

A ``ProcessorConfig`` (tenants.v1) is validated when set; its fields are split
into non-secret ``settings`` (stored as JSON, shown on reads) and
:class:`ProcessorSecrets` (the API key and the webhook verification secrets,
sealed with the master key, never shown). Every rule names the offending field
with a ``google.rpc.BadRequest`` path such as ``config.stripe.secret_key`` or
``config.adyen.hmac_keys[1]``; no message ever quotes a secret.

Field rules come from the processors' documentation:

- Stripe API keys (https://docs.stripe.com/keys): secret keys are
  ``sk_test_...`` / ``sk_live_...``, restricted keys ``rk_test_...`` /
  ``rk_live_...``; publishable keys (``pk_...``) cannot make server-side calls
  and are refused. The characters after the prefix are letters and digits.
- Stripe webhook endpoint secrets (https://docs.stripe.com/webhooks#verify-manually)
  start with ``whsec_``; several are accepted while one is rolled.
- Adyen Checkout (https://docs.adyen.com/api-explorer/Checkout/71/post/payments):
  an API key (``X-API-Key``) and a merchant account code (``merchantAccount``);
  ``recurringProcessingModel`` one of ``CardOnFile``, ``Subscription``,
  ``UnscheduledCardOnFile``.
- Adyen webhook HMAC keys (https://docs.adyen.com/development-resources/webhooks/verify-hmac-signatures)
  are hex strings (hex-decoded to the HMAC-SHA256 key; the Customer Area
  generates 64 hex digits); several are accepted while one is rotated.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from gateway.validation import FieldViolation, RequestInvalid
from payments.adyen import RECURRING_MODELS
from switchboard.tenants.v1 import tenants_pb2
from tenants.provider_config import MAX_FIELD_CHARS

#: The processors a tenant can configure, by the name used in the API and the ledger.
PROCESSORS: tuple[str, ...] = ("stripe", "adyen")
#: The secret fields of each processor, by their API names (sealed, never returned).
SECRET_FIELDS: dict[str, tuple[str, str]] = {
    "stripe": ("secret_key", "webhook_secrets"),
    "adyen": ("api_key", "hmac_keys"),
}
#: Failover priorities: 0 (first) to this, inclusive.
MAX_PRIORITY = 1000
#: At most this many webhook secrets / HMAC keys per processor (two suffice for a rotation).
MAX_WEBHOOK_SECRETS = 5
#: Adyen HMAC keys: hex digits, even count, within these bounds (64 is what Adyen generates).
MIN_HMAC_HEX_DIGITS = 32
MAX_HMAC_HEX_DIGITS = 256
#: Longest merchant account code accepted.
MAX_MERCHANT_ACCOUNT_CHARS = 255

_STRIPE_KEY_RE = re.compile(r"^(sk|rk)_(test|live)_[A-Za-z0-9]{8,}$")
_STRIPE_WEBHOOK_SECRET_RE = re.compile(r"^whsec_[A-Za-z0-9_+/=-]{8,}$")
_HEX_RE = re.compile(r"^[0-9A-Fa-f]+$")
_PRINTABLE_NO_SPACE_RE = re.compile(r"^[!-~]+$")


@dataclass(frozen=True, repr=False)
class ProcessorSecrets:
    """The secrets of one processor configuration, as sealed.

    ``api_key``: Stripe's secret key or Adyen's API key. ``webhook_secrets``:
    Stripe ``whsec_...`` endpoint secrets or Adyen hex HMAC keys, in the order
    configured (possibly empty). The repr shows only how many there are.
    """

    api_key: str
    webhook_secrets: tuple[str, ...] = ()

    def __repr__(self) -> str:
        return f"ProcessorSecrets(api_key=<redacted>, webhook_secrets=<{len(self.webhook_secrets)} redacted>)"

    __str__ = __repr__

    def to_json(self) -> bytes:
        """The sealed plaintext: UTF-8 JSON ``{"api_key": str, "webhook_secrets": [str, ...]}``.

        Keys sorted, so equal secrets give equal bytes (and fingerprints).
        """
        return json.dumps(
            {"api_key": self.api_key, "webhook_secrets": list(self.webhook_secrets)}, sort_keys=True
        ).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes) -> ProcessorSecrets:
        """Inverse of :meth:`to_json`.

        Raises ``ValueError`` (whose message quotes nothing of ``data``) if it
        is not that shape.
        """
        try:
            value = json.loads(data)
        except ValueError:
            raise ValueError("the opened processor secrets are not JSON") from None
        if not isinstance(value, dict):
            raise ValueError("the opened processor secrets are not a JSON object")
        api_key = value.get("api_key")
        webhook_secrets = value.get("webhook_secrets", [])
        if not isinstance(api_key, str) or not api_key:
            raise ValueError("the opened processor secrets have no api_key")
        if not isinstance(webhook_secrets, list) or not all(isinstance(s, str) for s in webhook_secrets):
            raise ValueError("the opened processor secrets have malformed webhook_secrets")
        return cls(api_key=api_key, webhook_secrets=tuple(webhook_secrets))


@dataclass(frozen=True)
class SplitProcessorConfig:
    """A validated processor configuration.

    ``processor``: ``"stripe"`` or ``"adyen"``. ``priority``: 0-1000, lower
    first. ``settings``: the non-secret fields by name (all strings).
    ``secrets``: what is sealed. ``secret_fields``: the API names of the secret
    fields that are set.
    """

    processor: str
    priority: int
    settings: dict[str, str]
    secrets: ProcessorSecrets = field(repr=False)

    @property
    def secret_fields(self) -> list[str]:
        """API names of the secret fields that are set (non-empty), sorted."""
        key_field, webhook_field = SECRET_FIELDS[self.processor]
        names = [key_field] if self.secrets.api_key else []
        if self.secrets.webhook_secrets:
            names.append(webhook_field)
        return sorted(names)


def _bad(path: str, description: str) -> FieldViolation:
    return FieldViolation(field=path, description=description)


def _check_url(path: str, url: str, violations: list[FieldViolation]) -> None:
    if not url:
        return
    if len(url) > MAX_FIELD_CHARS:
        violations.append(_bad(path, f"at most {MAX_FIELD_CHARS} characters"))
        return
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        violations.append(_bad(path, "an http(s) URL such as https://api.example.com"))
    elif parts.username or parts.password:
        violations.append(_bad(path, "must not contain credentials"))


def _check_secret_list(
    path: str,
    values: list[str],
    check_one: Callable[[str], str | None],
    violations: list[FieldViolation],
    *,
    casefold: bool = False,
) -> tuple[str, ...]:
    """Check each entry with ``check_one(entry) -> description | None``; return them stripped."""
    if len(values) > MAX_WEBHOOK_SECRETS:
        violations.append(_bad(path, f"at most {MAX_WEBHOOK_SECRETS} (two are enough for a rotation)"))
    seen: set[str] = set()
    cleaned: list[str] = []
    for index, raw in enumerate(values):
        value = raw.strip()
        where = f"{path}[{index}]"
        problem = "required (remove empty entries)" if not value else check_one(value)
        if problem is not None:
            violations.append(_bad(where, problem))
        key = value.lower() if casefold else value
        if value and key in seen:
            violations.append(_bad(where, "appears twice"))
        seen.add(key)
        cleaned.append(value)
    return tuple(cleaned)


def _stripe_key_problem(key: str) -> str | None:
    if len(key) > MAX_FIELD_CHARS:
        return f"at most {MAX_FIELD_CHARS} characters"
    if key.startswith("pk_"):
        return (
            "a publishable key (pk_...) cannot make server-side calls: use the secret key "
            "(sk_test_/sk_live_) or a restricted key (rk_test_/rk_live_); https://docs.stripe.com/keys"
        )
    if not _STRIPE_KEY_RE.match(key):
        return (
            "a Stripe secret key (sk_test_... / sk_live_...) or restricted key (rk_test_... / rk_live_...); "
            "https://docs.stripe.com/keys"
        )
    return None


def _stripe_webhook_secret_problem(secret: str) -> str | None:
    if len(secret) > MAX_FIELD_CHARS:
        return f"at most {MAX_FIELD_CHARS} characters"
    if not _STRIPE_WEBHOOK_SECRET_RE.match(secret):
        return "a webhook endpoint signing secret: 'whsec_' followed by its letters and digits"
    return None


def _adyen_hmac_key_problem(key: str) -> str | None:
    if not _HEX_RE.match(key):
        return "the HMAC key in hex, as shown in the Customer Area"
    if len(key) % 2:
        return "an even number of hex digits (whole bytes)"
    if not MIN_HMAC_HEX_DIGITS <= len(key) <= MAX_HMAC_HEX_DIGITS:
        return f"{MIN_HMAC_HEX_DIGITS}-{MAX_HMAC_HEX_DIGITS} hex digits (Adyen generates 64)"
    return None


def _split_stripe(
    c: tenants_pb2.StripeConfig, p: str, v: list[FieldViolation]
) -> tuple[dict[str, str], ProcessorSecrets]:
    key = c.secret_key.strip()
    settings = {"base_url": c.base_url}
    if not key:
        v.append(_bad(f"{p}.secret_key", "required: the account's secret (sk_) or restricted (rk_) key"))
    else:
        problem = _stripe_key_problem(key)
        if problem is not None:
            v.append(_bad(f"{p}.secret_key", problem))
        else:
            kind, mode = key.split("_", 2)[:2]
            settings.update(mode=mode, key_type="secret" if kind == "sk" else "restricted")
    webhook_secrets = _check_secret_list(
        f"{p}.webhook_secrets", list(c.webhook_secrets), _stripe_webhook_secret_problem, v
    )
    _check_url(f"{p}.base_url", c.base_url, v)
    return settings, ProcessorSecrets(api_key=key, webhook_secrets=webhook_secrets)


def _split_adyen(
    c: tenants_pb2.AdyenConfig, p: str, v: list[FieldViolation]
) -> tuple[dict[str, str], ProcessorSecrets]:
    key = c.api_key.strip()
    if not key:
        v.append(_bad(f"{p}.api_key", "required: the web-service user's API key"))
    elif len(key) > MAX_FIELD_CHARS:
        v.append(_bad(f"{p}.api_key", f"at most {MAX_FIELD_CHARS} characters"))
    elif not _PRINTABLE_NO_SPACE_RE.match(key):
        v.append(_bad(f"{p}.api_key", "printable characters without spaces"))
    merchant = c.merchant_account.strip()
    if not merchant:
        v.append(_bad(f"{p}.merchant_account", "required: the merchant account code"))
    elif len(merchant) > MAX_MERCHANT_ACCOUNT_CHARS or not _PRINTABLE_NO_SPACE_RE.match(merchant):
        v.append(
            _bad(
                f"{p}.merchant_account",
                f"the merchant account code: 1-{MAX_MERCHANT_ACCOUNT_CHARS} printable characters, no spaces",
            )
        )
    hmac_keys = _check_secret_list(
        f"{p}.hmac_keys", list(c.hmac_keys), _adyen_hmac_key_problem, v, casefold=True
    )
    # Hex is case-insensitive; stored as the Customer Area shows it (upper case).
    hmac_keys = tuple(key.upper() for key in hmac_keys)
    _check_url(f"{p}.base_url", c.base_url, v)
    _check_url(f"{p}.return_url", c.return_url, v)
    if c.recurring_processing_model and c.recurring_processing_model not in RECURRING_MODELS:
        v.append(_bad(f"{p}.recurring_processing_model", f"empty or one of {', '.join(RECURRING_MODELS)}"))
    settings = {
        "merchant_account": merchant,
        "base_url": c.base_url,
        "return_url": c.return_url,
        "recurring_processing_model": c.recurring_processing_model,
    }
    return settings, ProcessorSecrets(api_key=key, webhook_secrets=hmac_keys)


def split_processor_config(config: tenants_pb2.ProcessorConfig) -> SplitProcessorConfig:
    """Validate ``config`` and split it into settings and secrets.

    Raises ``RequestInvalid`` with every violation, paths under ``config``
    (``config``, ``config.priority``, ``config.<processor>.<field>``,
    ``config.<processor>.<list field>[<index>]``).
    """
    processor = config.WhichOneof("processor")
    if processor is None:
        raise RequestInvalid([_bad("config", f"set one of {', '.join(PROCESSORS)}")])
    violations: list[FieldViolation] = []
    if not 0 <= config.priority <= MAX_PRIORITY:
        violations.append(_bad("config.priority", f"0 (first) to {MAX_PRIORITY}"))
    path = f"config.{processor}"
    if processor == "stripe":
        settings, secrets = _split_stripe(config.stripe, path, violations)
    else:
        settings, secrets = _split_adyen(config.adyen, path, violations)
    if violations:
        raise RequestInvalid(violations)
    return SplitProcessorConfig(
        processor=processor, priority=config.priority, settings=settings, secrets=secrets
    )


def parse_processor_name(value: str) -> str | None:
    """``value`` if it names a known processor (``"stripe"``, ``"adyen"``), else ``None``."""
    return value if value in PROCESSORS else None
