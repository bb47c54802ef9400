"""Property-based fuzzing of SendNotification and SendNotificationBatch through the real gRPC server.

Every example is built from a valid request in which a few fields are "perturbed": replaced by random,
empty, boundary (limit - 1, limit, limit + 1), oversized (up to a few hundred KB) or odd-but-valid-UTF-8
values (NUL, control characters, CRLF, U+FFFD, U+FEFF, U+10FFFF, combining and bidi marks, unknown enum
numbers, huge maps). An independent model of the documented limits (the proto comments) says whether
the request must be accepted, must be rejected or may go either way (addresses, whose syntax is the
libraries' business). The properties, for each example:

- the status is OK, INVALID_ARGUMENT or FAILED_PRECONDITION (a reused request_id) and never INTERNAL,
  UNKNOWN or RESOURCE_EXHAUSTED (requests stay under gRPC's 4 MB default);
- INVALID_ARGUMENT carries a BadRequest whose every field violation names a perturbed field (prefix
  match: ``push.data["k"]`` for a perturbed ``push.data``), and names every field the model knows is
  bad unless the list was capped;
- nothing is written for a rejected request; an accepted one writes one notification, one
  idempotency key, one delivery per planned channel (one for a fallback chain) and as many outbox
  rows; a replay writes nothing; a batch writes the rows of its newly accepted items only.

Raw bytes that are not a decodable request (corrupt wire format, invalid UTF-8 in a string field) are
sent with identity serializers; registered with ``add_notification_service_to_server`` they are
INVALID_ARGUMENT naming the field, never UNKNOWN/INTERNAL.

The database is per test function, not per example: each property tracks accepted request ids itself
and compares row-count deltas around every call. Runs are derandomized (reproducible in CI); set
``SWITCHBOARD_FUZZ_SCALE`` (e.g. 10) for a longer local run.
"""

from __future__ import annotations

import enum
import os
import re
import unicodedata
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeAlias

import asyncpg
import grpc
import pytest
from google.protobuf.message import DecodeError
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from hypothesis import HealthCheck, assume, event, example, given, note, settings
from hypothesis import strategies as st

from gateway.auth import Authenticator
from gateway.service import NotificationService, add_notification_service_to_server
from gateway.validation import VIOLATIONS_CAPPED_DESCRIPTION
from switchboard.notify.v1 import notify_pb2, notify_pb2_grpc
from tests.conftest import TenantCredentials
from tests.helpers import row_counts

if TYPE_CHECKING:
    from gateway.server import Gateway

    Stub: TypeAlias = notify_pb2_grpc.NotificationServiceAsyncStub

SCALE = float(os.environ.get("SWITCHBOARD_FUZZ_SCALE", "1"))
FUZZ = settings(
    derandomize=True,
    database=None,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
SERVICE = "/switchboard.notify.v1.NotificationService"
#: Stay below gRPC's default 4 MB receive limit (a bigger request is RESOURCE_EXHAUSTED by design).
MAX_REQUEST_BYTES = 3_500_000
ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION}
EMAIL, SMS, PUSH, ALL = (
    notify_pb2.CHANNEL_EMAIL,
    notify_pb2.CHANNEL_SMS,
    notify_pb2.CHANNEL_PUSH,
    notify_pb2.CHANNEL_ALL,
)


def examples(count: int) -> int:
    """``count`` scaled by SWITCHBOARD_FUZZ_SCALE."""
    return max(1, int(count * SCALE))


SINGLE_EXAMPLES = examples(300)
BATCH_EXAMPLES = examples(50)
RAW_EXAMPLES = examples(150)


@pytest.fixture(autouse=True)
def _print_profile() -> None:
    """Say how examples are drawn (shown with ``-s`` or ``-rA``); derandomized, so no seed to keep."""
    print(
        f"hypothesis: derandomize=True database=None scale={SCALE} max_examples: "
        f"single={SINGLE_EXAMPLES} batch={BATCH_EXAMPLES} raw={RAW_EXAMPLES}"
    )


# --- values ----------------------------------------------------------------------------------------

#: Valid UTF-8 code points that tend to break things: NUL and control characters, CR/LF, NEL,
#: zero-width and bidi marks, BOM, replacement and non-characters, combining marks, the largest
#: code point, astral characters, quoting and path punctuation.
ODD_CHARS = (
    *"\x00\x01\x08\t\n\r\x0b\x0c\x1b\x1f\x7f\x80\x85\x9f\xa0\xad",
    *"\u0300\u0345\u034f\u200b\u200c\u200d\u200e\u200f\u202a\u202e\u2028\u2029\u2066\u3000",
    *"\ufeff\ufffc\ufffd\ufffe\uffff\U0001f600\U000e0001\U0010fffe\U0010ffff",
    *"é€ßİﬁ٣𝟘",
    *" \"\\%'[]<>&@+.-_:/",
)
#: One character per UTF-8 width, plus NUL and a space.
FILLERS = ("a", "é", "€", "\U0010ffff", "\x00", " ")
FIXED_ODD = (
    "",
    " ",
    "\t\r\n",
    "\r\n",
    "\x00",
    "a\x00b",
    "\ufeff",
    "\ufeffa",
    "\u200f",
    "\u202eevil",
    "\ufffd",
    "\U0010ffff",
    "e\u0301",
    "\u0301",
    "a\r\nBcc: x@example.com",
    "%00",
    "\\u0000",
)


def utf8_len(text: str) -> int:
    return len(text.encode("utf-8"))


@st.composite
def sized_text(draw: st.DrawFn, limits: tuple[int, ...]) -> str:
    """A string of about a limit's length (minus one, exactly, plus one), in characters or in
    UTF-8 bytes depending on the filler, with odd characters around it."""
    filler = draw(st.sampled_from(FILLERS))
    target = draw(st.sampled_from(sorted({0, 1, *(limit + d for limit in limits for d in (-1, 0, 1))})))
    prefix = draw(st.text(st.sampled_from(ODD_CHARS), max_size=2))
    suffix = draw(st.text(st.sampled_from(ODD_CHARS), max_size=2))
    by_bytes = draw(st.booleans())
    rest = target - (utf8_len(prefix + suffix) if by_bytes else len(prefix + suffix))
    count = max(0, rest // utf8_len(filler) if by_bytes else rest)
    return prefix + filler * count + suffix


def huge_text() -> st.SearchStrategy[str]:
    """Oversized strings: 64 KiB to 300 KB of one character (bounded)."""
    return st.builds(
        lambda filler, size: filler * (size // utf8_len(filler)),
        st.sampled_from(FILLERS),
        st.sampled_from((65_536, 262_145, 300_000)),
    )


def text(
    limits: tuple[int, ...], *, huge: bool = True, extra: tuple[str, ...] = ()
) -> st.SearchStrategy[str]:
    """Any kind of string for a field with the given limits."""
    options: list[st.SearchStrategy[str]] = [
        st.sampled_from(FIXED_ODD + extra),
        st.text(max_size=40),
        st.text(st.sampled_from(ODD_CHARS), max_size=40),
        sized_text(limits),
    ]
    if huge:
        options.append(huge_text())
    return st.one_of(options)


def near(valid: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """A valid value with an odd character after (mostly) or before it: a trailing newline passes a
    ``$``-anchored pattern; NUL, BOM and bidi marks are invisible in logs."""
    odd = st.sampled_from(("\n", "\r\n", " ", "\x00", "\ufeff", "\u200f"))
    return st.one_of(st.builds(str.__add__, valid, odd), st.builds(str.__add__, odd, valid))


def often(first: st.SearchStrategy[str], *rest: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """``first`` about 40% of the time (``one_of`` would give it an equal share only)."""
    others = st.one_of(rest)
    return st.integers(0, 9).flatmap(lambda i: first if i < 4 else others)


def enum_lists() -> st.SearchStrategy[list[int]]:
    """Channel lists: known values, unknown enum numbers (any int32), duplicates, thousands of items."""
    value = st.one_of(st.sampled_from([0, 1, 2, 3, 4, 5]), st.integers(-(2**31), 2**31 - 1))
    return st.one_of(
        st.lists(value, max_size=6),
        st.permutations([EMAIL, SMS, PUSH]).map(list),
        st.sampled_from(([9] * 5000, [ALL] * 5000, list(range(-2500, 2500)), [EMAIL, EMAIL], [ALL, 0])),
    )


def string_maps(
    key: st.SearchStrategy[str], value: st.SearchStrategy[str]
) -> st.SearchStrategy[dict[str, str]]:
    return st.dictionaries(key, value, max_size=6)


def huge_maps(limits: tuple[int, ...]) -> st.SearchStrategy[dict[str, str]]:
    """Maps around a size limit, with thousands of entries, or with very long / non-ASCII keys."""
    return st.one_of(
        st.builds(
            lambda n, prefix: {f"{prefix}{i}": "v" for i in range(n)},
            st.sampled_from(sorted({*(limit + d for limit in limits for d in (-1, 0, 1)), 1000, 20_000})),
            st.sampled_from(("k", "google.", "!", "\U0010ffff" * 40)),
        ),
        st.builds(
            lambda n, filler: {filler * 200 + str(i): "v" for i in range(n)},
            st.sampled_from((1, 30, 300)),
            st.sampled_from(FILLERS),
        ),
    )


PUSH_KEYS = st.one_of(
    st.sampled_from(("k", "", "from", "message_type", "notification", "google.x", "gcm.x", "google", "From")),
    st.sampled_from(("k\x00", "\x00", "k" * 4095, "\U0010ffff", "\ufeffk", "a\r\nb")),
    st.text(max_size=12),
    st.text(st.sampled_from(ODD_CHARS), max_size=6),
)
METADATA_KEYS = often(
    near(st.from_regex(r"[A-Za-z0-9_.\-/]{1,8}", fullmatch=True)),
    st.from_regex(r"[A-Za-z0-9_.\-/]{1,64}", fullmatch=True),
    st.sampled_from(("", "k" * 64, "k" * 65, "k\n", "k ", "ké", "k\x00", "\ufeffk", "order")),
    st.text(max_size=12),
)


def push_data(small: bool) -> st.SearchStrategy[dict[str, str]]:
    maps = [
        string_maps(PUSH_KEYS, text((4096,), huge=False)),
        st.builds(lambda n: {"k": "v" * n}, st.sampled_from((4094, 4095, 4096))),
        st.builds(lambda n: {"k": "é" * n}, st.sampled_from((2047, 2048))),
    ]
    if not small:
        maps.append(huge_maps((4096,)))
    return st.one_of(maps)


def metadata_maps(small: bool) -> st.SearchStrategy[dict[str, str]]:
    maps = [
        string_maps(METADATA_KEYS, text((512,), huge=False)),
        st.builds(lambda n: {f"k{i}": "v" for i in range(n)}, st.sampled_from((31, 32, 33))),
        st.builds(lambda v: {"k": v}, st.sampled_from(("v" * 512, "v" * 513, "é" * 512, "\U0010ffff" * 513))),
    ]
    if not small:
        maps.append(huge_maps((32,)))
    return st.one_of(maps)


KNOWN_GOOD_EMAILS = ("ada@example.com", "Ada.Lovelace+tag@Example.COM", "x" * 64 + "@example.com")
KNOWN_GOOD_PHONES = ("+14155550123", "+442071838750", "+919876543210")
EMAILS = (
    *KNOWN_GOOD_EMAILS,
    "ada@example.com\n",
    "ada@example.com ",
    "<ada@example.com>",
    "Ada <ada@example.com>",
    "ada@localhost",
    "ada@[127.0.0.1]",
    "用户@例子.广告",
    "ada@xn--bcher-kva.example",
    "x" * 65 + "@example.com",
    "ada@" + "b" * 63 + ".com",
    "ada@" + "b" * 64 + ".com",
    "ada\x00@example.com",
    "ada@example.com\ufeff",
    "ada@exa\u200fmple.com",
    "".join(chr(0xE000 + i) for i in range(3000)) + "@example.com",
    "a@" + "".join(chr(c) for c in range(0x2000, 0x2070)) + ".com",
)
PHONES = (
    *KNOWN_GOOD_PHONES,
    "+14155550123\n",
    " +14155550123",
    "+1 415 555 0123",
    "+1",
    "+123456789012345",
    "+1234567890123456",
    "+0123",
    "+٤١٥٥٥٥٠١٢٣",
    "+" + "".join(chr(0xFF10 + int(d)) for d in "14155550123"),  # fullwidth digits
    "14155550123",
)


def field_values(small: bool) -> dict[str, st.SearchStrategy[Any]]:
    """The perturbation strategy of every field (``small``: no huge values, for 500-item batches)."""
    huge = not small
    return {
        "request_id": often(
            near(st.from_regex(r"[\x21-\x7e]{1,127}", fullmatch=True)),
            text((128,), huge=huge, extra=("abc\n", "abc ", " abc", "ab\x7f", "é", "\x21", "~" * 128)),
            st.from_regex(r"[\x21-\x7e]{1,128}", fullmatch=True),
        ),
        "channels": enum_lists(),
        "fallback_channels": enum_lists(),
        "recipient.email": st.one_of(
            st.sampled_from(EMAILS), near(st.sampled_from(KNOWN_GOOD_EMAILS)), text((254, 320), huge=huge)
        ),
        "recipient.phone_number": often(
            near(st.sampled_from(KNOWN_GOOD_PHONES)),
            st.sampled_from(PHONES),
            st.from_regex(r"\+[1-9][0-9]{1,14}", fullmatch=True),
            text((16,), huge=huge),
        ),
        "recipient.fcm_token": often(
            near(st.from_regex(r"[A-Za-z0-9_:.\-]{1,64}", fullmatch=True)),
            st.from_regex(r"[A-Za-z0-9_:.\-]{1,64}", fullmatch=True),
            st.sampled_from(("a" * 4096, "a" * 4097, "tok\n", "tok en", "tok:é", "tok\x00")),
            text((4096,), huge=huge),
        ),
        "email.subject": text((998,), huge=huge),
        "email.text": text((262_144,), huge=huge),
        "email.html": text((262_144,), huge=huge),
        "sms.text": text((1600,), huge=huge),
        "push.title": text((256,), huge=huge),
        "push.body": text((2048,), huge=huge),
        "push.data": push_data(small),
        "metadata": metadata_maps(small),
    }


FIELDS = tuple(field_values(False))
FULL_VALUES = field_values(False)
SMALL_VALUES = field_values(True)


# --- requests --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """A valid baseline (routing and recipients) and the fields replaced by fuzzed values."""

    fallback: bool
    routing: tuple[int, ...]
    email: str = KNOWN_GOOD_EMAILS[0]
    phone: str = KNOWN_GOOD_PHONES[0]
    perturbed: Mapping[str, Any] = field(default_factory=dict)

    def perturbed_fields(self) -> set[str]:
        """The perturbed field paths; channels and fallback_channels exclude each other, so
        perturbing one of them may be reported on the other."""
        fields = set(self.perturbed)
        if fields & {"channels", "fallback_channels"}:
            fields |= {"channels", "fallback_channels"}
        return fields

    def build(self) -> notify_pb2.SendNotificationRequest:
        """The request; a fresh request_id unless that field is perturbed."""
        request = notify_pb2.SendNotificationRequest(
            request_id=f"fuzz-{uuid.uuid4()}",
            recipient=notify_pb2.Recipient(
                email=self.email, phone_number=self.phone, fcm_token="tok:APA91b-test_token"
            ),
            email=notify_pb2.EmailContent(subject="Hello", text="Plain body", html="<p>HTML body</p>"),
            sms=notify_pb2.SmsContent(text="Hello by SMS"),
            push=notify_pb2.PushContent(title="Hello", body="By push", data={"k": "v"}),
            metadata={"order": "42"},
        )
        routing: Any = request.fallback_channels if self.fallback else request.channels
        routing.extend(self.routing)
        for path, value in self.perturbed.items():
            *parents, name = path.split(".")
            target: Any = request
            for parent in parents:
                target = getattr(target, parent)
            if isinstance(value, list):
                del getattr(target, name)[:]
                getattr(target, name).extend(value)
            elif isinstance(value, dict):
                getattr(target, name).clear()
                getattr(target, name).update(value)
            else:
                setattr(target, name, value)
        return request


@st.composite
def cases(draw: st.DrawFn, small: bool = False, max_fields: int = 4) -> Case:
    fallback = draw(st.booleans())
    if fallback:
        routing = tuple(draw(st.permutations([EMAIL, SMS, PUSH]))[: draw(st.integers(1, 3))])
    else:
        routing = tuple(draw(st.lists(st.sampled_from([EMAIL, SMS, PUSH, ALL]), min_size=1, max_size=3)))
    values = SMALL_VALUES if small else FULL_VALUES
    chosen = draw(st.lists(st.sampled_from(FIELDS), unique=True, max_size=max_fields))
    return Case(
        fallback=fallback,
        routing=routing,
        email=draw(st.sampled_from(KNOWN_GOOD_EMAILS)),
        phone=draw(st.sampled_from(KNOWN_GOOD_PHONES)),
        perturbed={name: draw(values[name]) for name in chosen},
    )


# --- the model -------------------------------------------------------------------------------------


class Verdict(enum.Enum):
    VALID = "valid"
    INVALID = "invalid"
    UNKNOWN = "unknown"


@dataclass
class Expectation:
    """What the documented limits say about a request."""

    bad: set[str]  # field paths that must be named (one per bad field)
    unknown: bool  # an address whose validity is the libraries' business
    deliveries: tuple[int, ...]  # channels of the deliveries created on acceptance

    @property
    def verdict(self) -> Verdict:
        if self.bad:
            return Verdict.INVALID
        return Verdict.UNKNOWN if self.unknown else Verdict.VALID


def _blank(value: str) -> bool:
    return not value.strip()


def expect(request: notify_pb2.SendNotificationRequest) -> Expectation:
    """The model: limits from the proto comments, written independently of gateway/validation.py."""
    bad: set[str] = set()
    unknown = False
    if not re.fullmatch(r"[\x21-\x7e]{1,128}", request.request_id):
        bad.add("request_id")
    checked: list[int] = []
    if request.fallback_channels:
        if request.channels:
            bad.add("channels")
        for value in request.fallback_channels:
            if value in (EMAIL, SMS, PUSH) and value not in checked:
                checked.append(value)
            else:
                bad.add("fallback_channels")
        deliveries = tuple(checked[:1])
    else:
        if not request.channels:
            bad.add("channels")
        for value in request.channels:
            if value == ALL:
                checked += [EMAIL, SMS, PUSH]
            elif value in (EMAIL, SMS, PUSH):
                checked.append(value)
            else:
                bad.add("channels")
        deliveries = tuple(sorted(set(checked)))
    recipient = request.recipient
    if EMAIL in checked:
        address = recipient.email
        if (
            not address
            or "@" not in address
            or len(address) > 254
            or any(c.isspace() or unicodedata.category(c) == "Cc" for c in address)
        ):
            bad.add("recipient.email")
        elif address not in KNOWN_GOOD_EMAILS:
            unknown = True
        subject = request.email.subject
        if _blank(subject) or len(subject) > 998 or re.search(r"[\x00-\x1f\x7f]", subject):
            bad.add("email.subject")
        for name, body in (("text", request.email.text), ("html", request.email.html)):
            if utf8_len(body) > 262_144 or "\x00" in body:
                bad.add(f"email.{name}")
        if _blank(request.email.text) and _blank(request.email.html):
            bad.add("email.text")
    if SMS in checked:
        phone = recipient.phone_number
        if not re.fullmatch(r"\+[1-9][0-9]{1,14}", phone):
            bad.add("recipient.phone_number")
        elif phone not in KNOWN_GOOD_PHONES:
            unknown = True
        sms = request.sms.text
        if _blank(sms) or len(sms) > 1600 or "\x00" in sms:
            bad.add("sms.text")
    if PUSH in checked:
        if not re.fullmatch(r"[A-Za-z0-9_:.\-]{1,4096}", recipient.fcm_token):
            bad.add("recipient.fcm_token")
        push = request.push
        if _blank(push.title) and _blank(push.body) and not push.data:
            bad.add("push")
        if len(push.title) > 256 or "\x00" in push.title:
            bad.add("push.title")
        if len(push.body) > 2048 or "\x00" in push.body:
            bad.add("push.body")
        reserved = {"from", "message_type", "notification"}
        if sum(utf8_len(k) + utf8_len(v) for k, v in push.data.items()) > 4096 or any(
            not k or k in reserved or k.startswith(("google.", "gcm.")) or "\x00" in k + v
            for k, v in push.data.items()
        ):
            bad.add("push.data")
    metadata = request.metadata
    if len(metadata) > 32 or any(
        not re.fullmatch(r"[A-Za-z0-9_.\-/]{1,64}", k) or len(v) > 512 or "\x00" in v
        for k, v in metadata.items()
    ):
        bad.add("metadata")
    return Expectation(bad=bad, unknown=unknown, deliveries=deliveries)


def related(path: str, other: str) -> bool:
    """``path`` and ``other`` are the same field or one is inside the other (``push`` / ``push.title``,
    ``metadata`` / ``metadata["k"]``, ``requests[1]`` / ``requests[1].sms.text``)."""
    short, long = sorted((path, other), key=len)
    return long == short or (long.startswith(short) and long[len(short)] in ".[")


def bad_request(status: status_pb2.Status) -> list[error_details_pb2.BadRequest.FieldViolation]:
    """The field violations of ``status``'s BadRequest detail (which must be there)."""
    for detail in status.details:
        found = error_details_pb2.BadRequest()
        if detail.Unpack(found):
            assert found.field_violations, "an empty BadRequest"
            return list(found.field_violations)
    raise AssertionError(f"INVALID_ARGUMENT without a BadRequest detail: {status}")


def check_violations(status: status_pb2.Status, perturbed: set[str], bad: set[str]) -> None:
    """Every violation names a perturbed field; every known-bad field is named (unless capped)."""
    violations = bad_request(status)
    for violation in violations:
        assert any(related(violation.field, p) for p in perturbed), (violation.field, perturbed)
    if not any(v.description.startswith(VIOLATIONS_CAPPED_DESCRIPTION) for v in violations):
        for name in bad:
            assert any(related(v.field, name) for v in violations), (name, [v.field for v in violations])


@dataclass
class Ledger:
    """The accepted request ids of the test's tenant: the first request's encoding and answer."""

    accepted: dict[str, tuple[bytes, notify_pb2.SendNotificationResponse]] = field(default_factory=dict)

    def check(
        self,
        request: notify_pb2.SendNotificationRequest,
        perturbed: set[str],
        code: grpc.StatusCode,
        status: status_pb2.Status | None,
        response: notify_pb2.SendNotificationResponse | None,
    ) -> Counter[str]:
        """Check one outcome against the model; return the rows it must have written."""
        model = expect(request)
        note(f"model: {model.verdict.value} {sorted(model.bad)}; answer: {code.name}")
        event(f"model {model.verdict.value}, answer {code.name}")
        assert code in ALLOWED, (code, status)
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            assert status is not None
            assert model.verdict is not Verdict.VALID, ("a valid request was rejected", status)
            check_violations(status, perturbed, model.bad)
            return Counter()
        assert model.verdict is not Verdict.INVALID, f"bad fields {sorted(model.bad)} were not rejected"
        fingerprint = request.SerializeToString(deterministic=True)
        first = self.accepted.get(request.request_id)
        if first is None:
            assert code == grpc.StatusCode.OK, (code, status)
            assert response is not None
            self.accepted[request.request_id] = (fingerprint, response)
            assert response.status == notify_pb2.NOTIFICATION_STATUS_ACCEPTED
            assert tuple(d.channel for d in response.deliveries) == model.deliveries
            planned = len(model.deliveries)
            return Counter(notifications=1, idempotency_keys=1, deliveries=planned, outbox=planned)
        if first[0] == fingerprint:
            assert code == grpc.StatusCode.OK, ("a replay was not answered with the first answer", status)
            assert response == first[1]
        else:
            assert code == grpc.StatusCode.FAILED_PRECONDITION, ("a reused request_id", code)
        return Counter()


async def counts(pool: asyncpg.Pool) -> Counter[str]:
    return Counter(await row_counts(pool))


def delta(before: Counter[str], after: Counter[str]) -> Counter[str]:
    """after - before, keeping only non-zero changes (negative ones too)."""
    return Counter({k: after[k] - before[k] for k in after if after[k] != before[k]})


def rich(error: grpc.aio.AioRpcError) -> status_pb2.Status | None:
    found: status_pb2.Status | None = rpc_status.from_call(error)  # type: ignore[arg-type]
    return found


# --- SendNotification ------------------------------------------------------------------------------

REGRESSIONS: list[tuple[str, Case]] = [
    # A trailing newline passed the `$`-anchored patterns (request_id, E.164, FCM token, metadata key).
    ("request_id newline", Case(False, (EMAIL,), perturbed={"request_id": "abc\n"})),
    ("phone newline", Case(False, (SMS,), perturbed={"recipient.phone_number": "+14155550123\n"})),
    ("fcm token newline", Case(False, (PUSH,), perturbed={"recipient.fcm_token": "tok\n"})),
    ("metadata key newline", Case(False, (EMAIL,), perturbed={"metadata": {"k\n": "v"}})),
    # Errors too big for gRPC's 8 KiB trailers reached the client as RESOURCE_EXHAUSTED.
    (
        "email echoed in the description",
        Case(False, (EMAIL,), perturbed={"recipient.email": EMAILS[-2]}),
    ),
    ("thousands of bad channels", Case(False, (EMAIL,), perturbed={"channels": [9] * 5000})),
    (
        "thousands of bad keys",
        Case(False, (PUSH,), perturbed={"push.data": {f"google.{i}": "v" for i in range(3000)}}),
    ),
    ("a huge bad key", Case(False, (EMAIL,), perturbed={"metadata": {"!" * 100_000: "v"}})),
    (
        "long non-ASCII keys",
        Case(False, (EMAIL,), perturbed={"metadata": {"\U0010ffff" * 200 + str(i): "v" for i in range(30)}}),
    ),
]


def with_regressions(test: Callable[..., Any]) -> Callable[..., Any]:
    for _, case in reversed(REGRESSIONS):
        test = example(case=case)(test)
    return test


@settings(FUZZ, max_examples=SINGLE_EXAMPLES)
@given(case=cases())
@with_regressions
async def test_send_notification_fuzz(
    stub: Stub, tenant: TenantCredentials, pool: asyncpg.Pool, ledger: Ledger, case: Case
) -> None:
    request = case.build()
    assume(request.ByteSize() <= MAX_REQUEST_BYTES)
    before = await counts(pool)
    response: notify_pb2.SendNotificationResponse | None = None
    status: status_pb2.Status | None = None
    code, details = grpc.StatusCode.OK, ""
    try:
        response = await stub.SendNotification(request, metadata=tenant.metadata, timeout=60)
    except grpc.aio.AioRpcError as error:
        code, details, status = error.code(), error.details() or "", rich(error)
    assert code in ALLOWED, (code, details)
    written = delta(before, await counts(pool))
    assert written == ledger.check(request, case.perturbed_fields(), code, status, response)


@pytest.fixture
def ledger() -> Ledger:
    return Ledger()


# --- SendNotificationBatch -------------------------------------------------------------------------


@dataclass(frozen=True)
class Batch:
    """``size`` items cycling through ``templates``; an item with an unperturbed request_id gets a
    fresh one, so a template with a perturbed request_id repeats it (replays or reuses in the batch)."""

    size: int
    templates: tuple[Case, ...]

    def build(self) -> tuple[notify_pb2.SendNotificationBatchRequest, list[Case]]:
        items = [self.templates[i % len(self.templates)] for i in range(self.size)]
        return notify_pb2.SendNotificationBatchRequest(requests=[c.build() for c in items]), items


@st.composite
def batches(draw: st.DrawFn) -> Batch:
    size = draw(st.sampled_from((0, 1, 1, 2, 3, 5, 8, 500, 501)))
    small = size > 8
    templates = draw(st.lists(cases(small=small, max_fields=3), min_size=1, max_size=4 if small else 8))
    return Batch(size, tuple(templates))


@settings(FUZZ, max_examples=BATCH_EXAMPLES)
@given(batch=batches())
@example(batch=Batch(0, (Case(False, (ALL,)),)))
@example(batch=Batch(501, (Case(False, (ALL,)),)))
@example(
    batch=Batch(
        500,
        (
            Case(False, (ALL,)),
            Case(True, (PUSH, SMS), perturbed={"request_id": "dup"}),
            Case(False, (EMAIL,), perturbed={"push.data": {f"google.{i}": "v" for i in range(300)}}),
            Case(False, (SMS,), perturbed={"metadata": {"!" * 20_000: "v"}}),
        ),
    )
)
async def test_send_notification_batch_fuzz(
    stub: Stub, tenant: TenantCredentials, pool: asyncpg.Pool, ledger: Ledger, batch: Batch
) -> None:
    request, items = batch.build()
    assume(request.ByteSize() <= MAX_REQUEST_BYTES)
    before = await counts(pool)
    failure: grpc.aio.AioRpcError | None = None
    try:
        reply = await stub.SendNotificationBatch(request, metadata=tenant.metadata, timeout=120)
    except grpc.aio.AioRpcError as error:
        failure = error
    if failure is not None:
        assert failure.code() == grpc.StatusCode.INVALID_ARGUMENT, (failure.code(), failure.details())
        assert not 1 <= batch.size <= 500, "a batch of an allowed size was rejected as a whole"
        status = rich(failure)
        assert status is not None
        assert [v.field for v in bad_request(status)] == ["requests"]
        assert delta(before, await counts(pool)) == Counter()
        return
    assert 1 <= batch.size <= 500
    assert len(reply.results) == batch.size
    expected: Counter[str] = Counter()
    for item, case, result in zip(request.requests, items, reply.results, strict=True):
        if result.WhichOneof("result") == "response":
            expected += ledger.check(item, case.perturbed_fields(), grpc.StatusCode.OK, None, result.response)
        else:
            assert result.WhichOneof("result") == "error"
            code = grpc.StatusCode.FAILED_PRECONDITION
            if result.error.code == code_pb2.INVALID_ARGUMENT:
                code = grpc.StatusCode.INVALID_ARGUMENT
            else:
                assert result.error.code == code_pb2.FAILED_PRECONDITION, result.error
            expected += ledger.check(item, case.perturbed_fields(), code, result.error, None)
    assert delta(before, await counts(pool)) == expected


# --- raw bytes -------------------------------------------------------------------------------------

#: Byte sequences that are not UTF-8: a lone continuation byte, 0xFF, an overlong '/', a truncated
#: sequence, an encoded surrogate (CESU-8) and a code point above U+10FFFF.
INVALID_UTF8 = (b"\x80", b"\xff", b"\xc0\xaf", b"\xe2\x82", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"a\xc3(")
MARKER = "\x02\x03MARK\x03\x02"
STRING_FIELDS = (
    "request_id",
    "recipient.email",
    "recipient.phone_number",
    "recipient.fcm_token",
    "email.subject",
    "email.text",
    "email.html",
    "sms.text",
    "push.title",
    "push.body",
    "push.data",  # a key or a value; the map is named
    "metadata",
)


@dataclass(frozen=True)
class RawCase:
    """Bytes for SendNotification (``batch_index`` None) or SendNotificationBatch, and the field path
    the answer must name when it is known."""

    payload: bytes
    batch_index: int | None = None
    field: str | None = None


def corrupt(case: Case, path: str, in_key: bool, bad: bytes) -> tuple[bytes, bytes]:
    """(valid encoding, the same with invalid UTF-8 in ``path``), same length, so every length
    prefix stays right."""
    marked = case.build()
    if path in ("push.data", "metadata"):
        target = marked.push.data if path == "push.data" else marked.metadata
        target.clear()
        target.update({MARKER: "v"} if in_key else {"k": MARKER})
    else:
        *parents, name = path.split(".")
        holder: Any = marked
        for parent in parents:
            holder = getattr(holder, parent)
        setattr(holder, name, MARKER)
    encoded = marked.SerializeToString()
    marker = MARKER.encode()
    assert encoded.count(marker) == 1
    return encoded, encoded.replace(marker, bad.ljust(len(marker), b"x"))


@st.composite
def raw_cases(draw: st.DrawFn) -> RawCase:
    kind = draw(st.sampled_from(("garbage", "utf8", "utf8-batch", "truncated")))
    if kind == "garbage":
        return RawCase(draw(st.binary(max_size=64)))
    case = draw(cases(small=True, max_fields=2))
    path = draw(st.sampled_from(STRING_FIELDS))
    valid, payload = corrupt(case, path, draw(st.booleans()), draw(st.sampled_from(INVALID_UTF8)))
    if kind == "truncated":
        return RawCase(valid[: draw(st.integers(0, max(0, len(valid) - 1)))])
    if kind == "utf8":
        return RawCase(payload, field=path)
    index = draw(st.integers(0, 2))
    others = [Case(False, (ALL,)).build().SerializeToString() for _ in range(3)]
    others[index] = payload
    # A SendNotificationBatchRequest is its items as field 1 (length-delimited).
    batch = b"".join(b"\x0a" + _varint(len(item)) + item for item in others)
    return RawCase(batch, batch_index=index, field=f"requests[{index}].{path}")


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


@pytest.fixture
async def raw_port(pool: asyncpg.Pool) -> AsyncIterator[int]:
    """A server registering NotificationService with ``add_notification_service_to_server``."""
    server = grpc.aio.server()
    add_notification_service_to_server(NotificationService(pool, Authenticator(pool)), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield port
    await server.stop(1)


async def call_raw(port: int, method: str, payload: bytes, metadata: Any) -> tuple[grpc.StatusCode, Any]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary(
            f"{SERVICE}/{method}",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        try:
            return grpc.StatusCode.OK, await call(payload, metadata=metadata, timeout=60)
        except grpc.aio.AioRpcError as error:
            return error.code(), error


def decodes(payload: bytes, batch: bool) -> bool:
    message = notify_pb2.SendNotificationBatchRequest() if batch else notify_pb2.SendNotificationRequest()
    try:
        message.ParseFromString(payload)
    except DecodeError:
        return False
    return True


@settings(FUZZ, max_examples=RAW_EXAMPLES)
@given(raw=raw_cases())
@example(raw=RawCase(b"\xff\xff\xff"))
@example(raw=RawCase(b"\x0a\x02\xc3\x28", field="request_id"))
@example(raw=RawCase(b"\x3a\x06\x0a\x01\xff\x12\x01a", field="metadata"))
@example(raw=RawCase(b"\x1a\x03\x0a\x01\xff", field="recipient.email"))
@example(raw=RawCase(b"\x0a\x05\x1a\x03\x0a\x01\xff", batch_index=0, field="requests[0].recipient.email"))
async def test_undecodable_requests_are_invalid_argument(
    raw_port: int, tenant: TenantCredentials, pool: asyncpg.Pool, raw: RawCase
) -> None:
    batch = raw.batch_index is not None
    assume(not decodes(raw.payload, batch))
    before = await counts(pool)
    method = "SendNotificationBatch" if batch else "SendNotification"
    code, error = await call_raw(raw_port, method, raw.payload, tenant.metadata)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, error)
    status = rich(error)
    assert status is not None
    violations = bad_request(status)
    if raw.field is not None:
        assert [v.field for v in violations] == [raw.field]
    assert delta(before, await counts(pool)) == Counter()


async def test_undecodable_request_is_authenticated_first(raw_port: int, tenant: TenantCredentials) -> None:
    code, _ = await call_raw(raw_port, "SendNotification", b"\xff\xff", (("authorization", "Bearer nope"),))
    assert code == grpc.StatusCode.UNAUTHENTICATED


async def test_decodable_requests_still_work_through_the_wrapper(
    raw_port: int, tenant: TenantCredentials, pool: asyncpg.Pool
) -> None:
    request = Case(False, (ALL,)).build()
    code, reply = await call_raw(raw_port, "SendNotification", request.SerializeToString(), tenant.metadata)
    assert code == grpc.StatusCode.OK
    accepted = notify_pb2.SendNotificationResponse.FromString(reply)
    assert len(accepted.deliveries) == 3
    get = notify_pb2.GetNotificationRequest(notification_id=accepted.notification_id)
    code, reply = await call_raw(raw_port, "GetNotification", get.SerializeToString(), tenant.metadata)
    assert code == grpc.StatusCode.OK
    assert notify_pb2.GetNotificationResponse.FromString(reply).notification.request_id == request.request_id
    listed = notify_pb2.ListNotificationsRequest(page_size=5).SerializeToString()
    code, reply = await call_raw(raw_port, "ListNotifications", listed, tenant.metadata)
    assert code == grpc.StatusCode.OK
    assert len(notify_pb2.ListNotificationsResponse.FromString(reply).notifications) == 1
    async with grpc.aio.insecure_channel(f"127.0.0.1:{raw_port}") as channel:
        watch = channel.unary_stream(
            f"{SERVICE}/WatchNotification", request_serializer=lambda b: b, response_deserializer=lambda b: b
        )
        payload = notify_pb2.WatchNotificationRequest(notification_id=accepted.notification_id)
        call = watch(payload.SerializeToString(), metadata=tenant.metadata, timeout=10)
        message = await call.read()
        assert isinstance(message, bytes)
        first = notify_pb2.WatchNotificationResponse.FromString(message)
        assert first.notification.notification_id == accepted.notification_id
        call.cancel()
        # A stream's undecodable request is INVALID_ARGUMENT as well.
        call = watch(b"\x0a\x01\xff", metadata=tenant.metadata, timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call.read()
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        status = rich(caught.value)
        assert status is not None
        assert [v.field for v in bad_request(status)] == ["notification_id"]


async def test_the_gateway_answers_undecodable_requests_invalid_argument(
    gateway: Gateway, tenant: TenantCredentials
) -> None:
    code, error = await call_raw(gateway.port, "SendNotification", b"\x0a\x02\xc3\x28", tenant.metadata)
    assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, error)
