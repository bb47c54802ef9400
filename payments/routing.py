"""Which processor a payment goes to: per-tenant routing rules and a circuit breaker per processor.

**Routing rules** (table ``payment_routes``, migration 0012) are a tenant's
ordered list of :class:`RouteRule`: a rule matches a payment by ``currency``
(ISO 4217, ``None`` = any), an inclusive amount range in minor units
(``min_amount_minor`` / ``max_amount_minor``, ``None`` = unbounded) and a
``payment_method_prefix`` (``""`` = any; e.g. ``"pm_"`` for Stripe
PaymentMethods, ``"stored_"`` for Adyen stored-method ids). The **first
matching rule wins** and its ``processors`` are the payment's route, in
order. Without a matching rule the route is every configured processor in
configuration priority order (``processor_configs.priority``, then name:
:meth:`tenants.processor_cache.ProcessorCache.processors_for`). Either way a
processor that is not configured, or whose configuration cannot be used, is
left out (:func:`route_for`). Rules are read per payment (one indexed query),
so a change applies to the next payment without any cache to invalidate.

Rules are set as a whole from a JSON document (:func:`parse_route_config`,
``switchboard payments routes set TENANT --config FILE``)::

    {"rules": [
      {"currency": "EUR", "max_amount_minor": 100000, "processors": ["adyen", "stripe"]},
      {"payment_method_prefix": "pm_", "processors": ["stripe"]}
    ]}

A processor's payment-method tokens are its own (a Stripe ``pm_...`` means
nothing to Adyen), so a failover to another processor only helps for methods
both accept (network tokens, a shared vault); prefix rules keep the others on
their processor.

**Circuit breaker** (:class:`CircuitBreaker`, one per tenant and processor in
:class:`CircuitBreakers`, in the memory of each worker process): the classic
closed / open / half-open machine (M. Nygard, "Release It!", 2nd ed., ch. 5;
https://martinfowler.com/bliki/CircuitBreaker.html). CLOSED lets calls through
and counts consecutive failures; ``failure_threshold`` of them in a row OPEN
it. OPEN refuses calls (the payment goes to the next processor of its route)
until ``cool_down_s`` seconds have passed; then it is HALF_OPEN and lets ONE
probe call through: a success closes it, a failure opens it for another
cool-down. A probe that never reports (its worker died) is replaced by a new
one after ``cool_down_s``. What counts as a failure is the caller's choice
(payments/execution.py: every processor error except a card decline).
Times come from an injectable monotonic ``clock`` (seconds).
"""

from __future__ import annotations

import enum
import json
import re
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import asyncpg
from cachetools import LRUCache

from switchboard.db.pool import Connection

#: At most this many rules per tenant (also a database CHECK on ``position``).
MAX_RULES = 1000
#: At most this many processors in one rule (also a database CHECK).
MAX_PROCESSORS_PER_RULE = 16
#: Longest payment-method prefix (characters; also a database CHECK).
MAX_PREFIX_CHARS = 255

_PROCESSOR_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
_CURRENCY_RE = re.compile(r"[A-Z]{3}")
_RULE_FIELDS = frozenset(
    {"currency", "min_amount_minor", "max_amount_minor", "payment_method_prefix", "processors"}
)


class RouteConfigError(ValueError):
    """A routing configuration that breaks a rule; ``problems`` lists every one (``rules[i].field: why``)."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("invalid routing configuration: " + "; ".join(self.problems))


@dataclass(frozen=True)
class RouteRule:
    """One routing rule: payments matching every condition go to ``processors``, in that order.

    ``currency``: ISO 4217 upper-case code, or ``None`` for any. ``min_amount_minor`` /
    ``max_amount_minor``: inclusive bounds in minor units of the payment's currency,
    ``None`` for unbounded. ``payment_method_prefix``: ``""`` for any.
    ``processors``: 1-16 distinct processor names (``stripe``, ``adyen``).
    """

    processors: tuple[str, ...]
    currency: str | None = None
    min_amount_minor: int | None = None
    max_amount_minor: int | None = None
    payment_method_prefix: str = ""

    def matches(self, currency: str, amount_minor: int, payment_method: str) -> bool:
        """Whether a payment of ``amount_minor`` minor units of ``currency`` with ``payment_method``
        satisfies every condition of this rule."""
        if self.currency is not None and self.currency != currency:
            return False
        if self.min_amount_minor is not None and amount_minor < self.min_amount_minor:
            return False
        if self.max_amount_minor is not None and amount_minor > self.max_amount_minor:
            return False
        return payment_method.startswith(self.payment_method_prefix)

    def to_json(self) -> dict[str, Any]:
        """The rule as it appears in a configuration document (unset conditions left out)."""
        out: dict[str, Any] = {}
        if self.currency is not None:
            out["currency"] = self.currency
        if self.min_amount_minor is not None:
            out["min_amount_minor"] = self.min_amount_minor
        if self.max_amount_minor is not None:
            out["max_amount_minor"] = self.max_amount_minor
        if self.payment_method_prefix:
            out["payment_method_prefix"] = self.payment_method_prefix
        out["processors"] = list(self.processors)
        return out


def _amount(value: Any, where: str, problems: list[str]) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        problems.append(f"{where}: must be a positive integer number of minor units, got {value!r}")
        return None
    if value >= 2**63:
        problems.append(f"{where}: does not fit in 64 bits")
        return None
    return value


def _rule(index: int, raw: Any, problems: list[str]) -> RouteRule | None:
    where = f"rules[{index}]"
    if not isinstance(raw, Mapping):
        problems.append(f"{where}: must be an object")
        return None
    before = len(problems)
    unknown = sorted(set(raw) - _RULE_FIELDS)
    if unknown:
        problems.append(f"{where}: unknown field(s) {', '.join(unknown)}")
    currency = raw.get("currency")
    if currency is not None and (not isinstance(currency, str) or not _CURRENCY_RE.fullmatch(currency)):
        problems.append(f"{where}.currency: must be an ISO 4217 code of three upper-case letters")
    low = _amount(raw.get("min_amount_minor"), f"{where}.min_amount_minor", problems)
    high = _amount(raw.get("max_amount_minor"), f"{where}.max_amount_minor", problems)
    if low is not None and high is not None and low > high:
        problems.append(f"{where}: min_amount_minor ({low}) exceeds max_amount_minor ({high})")
    prefix = raw.get("payment_method_prefix", "")
    if not isinstance(prefix, str) or len(prefix) > MAX_PREFIX_CHARS:
        problems.append(f"{where}.payment_method_prefix: must be a string of at most {MAX_PREFIX_CHARS}")
    names = raw.get("processors")
    if not isinstance(names, list) or not 1 <= len(names) <= MAX_PROCESSORS_PER_RULE:
        problems.append(f"{where}.processors: must list 1 to {MAX_PROCESSORS_PER_RULE} processor names")
    else:
        bad = [n for n in names if not isinstance(n, str) or not _PROCESSOR_RE.fullmatch(n)]
        if bad:
            problems.append(f"{where}.processors: not processor names: {bad!r}")
        elif len(set(names)) != len(names):
            problems.append(f"{where}.processors: a processor is listed twice")
    if len(problems) > before or not isinstance(names, list):
        return None
    return RouteRule(
        processors=tuple(str(n) for n in names),
        currency=currency,
        min_amount_minor=low,
        max_amount_minor=high,
        payment_method_prefix=prefix,
    )


def parse_route_config(document: str | bytes) -> list[RouteRule]:
    """Parse a routing configuration (JSON, ``{"rules": [...]}``, shape in the module docstring).

    Returns the rules in order (possibly none: the default route). Raises
    :class:`RouteConfigError` naming every problem (not JSON, unknown fields, bad
    currency, amounts, prefix or processor names, more than :data:`MAX_RULES` rules).
    Processor names are not checked against the tenant's configuration here: a rule
    may name a processor configured later (it is skipped until then).
    """
    try:
        data = json.loads(document)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RouteConfigError([f"not JSON: {exc}"]) from None
    if not isinstance(data, Mapping) or set(data) - {"rules"}:
        raise RouteConfigError(['the document must be an object {"rules": [...]}'])
    raw_rules = data.get("rules", [])
    if not isinstance(raw_rules, list):
        raise RouteConfigError(["rules: must be a list"])
    if len(raw_rules) > MAX_RULES:
        raise RouteConfigError([f"rules: at most {MAX_RULES} rules, got {len(raw_rules)}"])
    problems: list[str] = []
    rules = [_rule(i, raw, problems) for i, raw in enumerate(raw_rules)]
    if problems:
        raise RouteConfigError(problems)
    return [r for r in rules if r is not None]


async def load_route_rules(conn: Connection | asyncpg.Pool, tenant_id: uuid.UUID) -> list[RouteRule]:
    """The tenant's routing rules in evaluation order (empty: the default route)."""
    rows = await conn.fetch(
        """SELECT currency, min_amount_minor, max_amount_minor, payment_method_prefix, processors
             FROM payment_routes WHERE tenant_id = $1 ORDER BY position""",
        tenant_id,
    )
    return [
        RouteRule(
            processors=tuple(r["processors"]),
            currency=r["currency"],
            min_amount_minor=r["min_amount_minor"],
            max_amount_minor=r["max_amount_minor"],
            payment_method_prefix=r["payment_method_prefix"],
        )
        for r in rows
    ]


async def replace_route_rules(conn: Connection, tenant_id: uuid.UUID, rules: Sequence[RouteRule]) -> int:
    """Replace the tenant's routing rules with ``rules`` (in order) inside the caller's transaction.

    Returns how many were stored; an empty sequence restores the default route.
    Raises asyncpg's ``ForeignKeyViolationError`` for an unknown tenant and
    ``ValueError`` for more than :data:`MAX_RULES` rules.
    """
    if len(rules) > MAX_RULES:
        raise ValueError(f"at most {MAX_RULES} routing rules per tenant")
    await conn.execute("DELETE FROM payment_routes WHERE tenant_id = $1", tenant_id)
    if rules:
        await conn.executemany(
            """INSERT INTO payment_routes (tenant_id, position, currency, min_amount_minor,
                                           max_amount_minor, payment_method_prefix, processors)
               VALUES ($1, $2, $3, $4, $5, $6, $7)""",
            [
                (
                    tenant_id,
                    position,
                    r.currency,
                    r.min_amount_minor,
                    r.max_amount_minor,
                    r.payment_method_prefix,
                    list(r.processors),
                )
                for position, r in enumerate(rules, start=1)
            ],
        )
    return len(rules)


def route_for(
    rules: Sequence[RouteRule],
    usable: Sequence[str],
    *,
    currency: str,
    amount_minor: int,
    payment_method: str,
) -> list[str]:
    """The ordered processor names a payment may be tried at.

    ``rules``: the tenant's rules in order; ``usable``: the tenant's usable processors in
    configuration priority order. The first rule matching the payment gives the order
    (names that are not usable are skipped); with no matching rule the route is
    ``usable`` itself. May be empty (nothing configured, or the matching rule names only
    unusable processors: the rule is not bypassed).
    """
    available = set(usable)
    for rule in rules:
        if rule.matches(currency, amount_minor, payment_method):
            return [name for name in rule.processors if name in available]
    return list(usable)


# --- circuit breaker --------------------------------------------------------------------------------


class BreakerState(enum.StrEnum):
    """A circuit breaker's state."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """One processor's breaker (see the module docstring).

    ``failure_threshold`` (>= 1): consecutive failures that open it. ``cool_down_s``
    (> 0, seconds): how long it stays open before a probe, and how long a probe may
    stay unreported before another is let through. ``clock``: monotonic seconds.
    Raises ``ValueError`` for bad limits. Not thread-safe (one event loop).
    """

    def __init__(
        self, failure_threshold: int, cool_down_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if failure_threshold < 1:
            raise ValueError(f"failure_threshold must be at least 1, not {failure_threshold}")
        if not cool_down_s > 0:
            raise ValueError(f"cool_down_s must be positive, not {cool_down_s}")
        self.failure_threshold = failure_threshold
        self.cool_down_s = cool_down_s
        self._clock = clock
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._probe_started_at: float | None = None

    def __repr__(self) -> str:
        return f"CircuitBreaker(state={self.state.value}, failures={self._failures})"

    @property
    def state(self) -> BreakerState:
        """The current state (OPEN turns HALF_OPEN once the cool-down has passed)."""
        if self._state is BreakerState.OPEN and self._clock() >= self._opened_at + self.cool_down_s:
            self._state = BreakerState.HALF_OPEN
            self._probe_started_at = None
        return self._state

    @property
    def consecutive_failures(self) -> int:
        """Failures since the last success (or since it closed)."""
        return self._failures

    def allow(self) -> bool:
        """Whether a call may go to the processor now. In HALF_OPEN, True reserves the one probe:
        report its result with :meth:`record_success` / :meth:`record_failure`."""
        state = self.state
        if state is BreakerState.CLOSED:
            return True
        if state is BreakerState.OPEN:
            return False
        now = self._clock()
        if self._probe_started_at is not None and now < self._probe_started_at + self.cool_down_s:
            return False
        self._probe_started_at = now
        return True

    def retry_at(self) -> float:
        """The clock time at which :meth:`allow` may next say yes (now when it already would)."""
        state = self.state
        now = self._clock()
        if state is BreakerState.OPEN:
            return self._opened_at + self.cool_down_s
        if state is BreakerState.HALF_OPEN and self._probe_started_at is not None:
            return max(now, self._probe_started_at + self.cool_down_s)
        return now

    def record_success(self) -> None:
        """A call answered: close the breaker and forget the failures."""
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._probe_started_at = None

    def record_failure(self) -> None:
        """A call failed: count it; open at the threshold, or again after a failed probe."""
        self._failures += 1
        if self.state is BreakerState.HALF_OPEN or self._failures >= self.failure_threshold:
            self._state = BreakerState.OPEN
            self._opened_at = self._clock()
            self._probe_started_at = None


class BreakerSource(Protocol):
    """What payments/execution.py needs from the breakers (:class:`CircuitBreakers` implements it)."""

    def allow(self, tenant_id: uuid.UUID, processor: str) -> bool:
        """Whether a call may go to ``processor`` of the tenant now (may reserve a probe)."""
        ...

    def retry_in_s(self, tenant_id: uuid.UUID, processor: str) -> float:
        """Seconds until :meth:`allow` may say yes (0 when it already would)."""
        ...

    def record(self, tenant_id: uuid.UUID, processor: str, *, ok: bool) -> None:
        """Report the outcome of a call that :meth:`allow` let through."""
        ...


class CircuitBreakers:
    """A :class:`CircuitBreaker` per (tenant, processor), created closed on first use.

    At most ``max_breakers`` are kept (least recently used dropped: a dropped breaker
    comes back closed). ``failure_threshold``, ``cool_down_s`` and ``clock`` as for
    :class:`CircuitBreaker`.
    """

    def __init__(
        self,
        failure_threshold: int = 5,
        cool_down_s: float = 30.0,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_breakers: int = 10_000,
    ) -> None:
        CircuitBreaker(failure_threshold, cool_down_s, clock)  # validate the limits once, here
        self.failure_threshold = failure_threshold
        self.cool_down_s = cool_down_s
        self._clock = clock
        self._breakers: LRUCache[tuple[uuid.UUID, str], CircuitBreaker] = LRUCache(maxsize=max_breakers)

    def breaker(self, tenant_id: uuid.UUID, processor: str) -> CircuitBreaker:
        """The breaker of ``processor`` for the tenant (created closed)."""
        key = (tenant_id, processor)
        found = self._breakers.get(key)
        if found is None:
            found = CircuitBreaker(self.failure_threshold, self.cool_down_s, self._clock)
            self._breakers[key] = found
        return found

    def allow(self, tenant_id: uuid.UUID, processor: str) -> bool:
        """:meth:`CircuitBreaker.allow` of the tenant's ``processor``."""
        return self.breaker(tenant_id, processor).allow()

    def retry_in_s(self, tenant_id: uuid.UUID, processor: str) -> float:
        """Seconds until the tenant's ``processor`` breaker may let a call through."""
        breaker = self.breaker(tenant_id, processor)
        return max(0.0, breaker.retry_at() - self._clock())

    def record(self, tenant_id: uuid.UUID, processor: str, *, ok: bool) -> None:
        """Report a call's outcome to the tenant's ``processor`` breaker."""
        breaker = self.breaker(tenant_id, processor)
        if ok:
            breaker.record_success()
        else:
            breaker.record_failure()
