"""Property-based fuzzing of PaymentService through the real gRPC server, as tests/test_fuzz.py does for
notifications (issue "Reliability", item 7: "never INTERNAL, never a partial write, the offending field
named").

Every example starts from a valid request and replaces a few fields by random, empty, boundary (limit - 1,
limit, limit + 1), oversized, int64-extreme or odd-but-valid-UTF-8 values (the value strategies of
tests/test_fuzz.py), plus payment-specific ones: card numbers (Luhn-valid, with spaces or dashes), currency
codes that are lower case, withdrawn, fund codes or metals, amounts around 0 and 999,999,999,999, unknown
enum numbers, payment ids that are not UUIDs or belong to another tenant, malformed timestamps and page
tokens. An independent model of the documented limits (the proto comments and docs/payments.md) says
whether the request must be accepted, must be rejected or may go either way. The properties:

- the status is one the API documents for a request alone (OK, INVALID_ARGUMENT, FAILED_PRECONDITION,
  NOT_FOUND) and never INTERNAL, UNKNOWN or RESOURCE_EXHAUSTED;
- INVALID_ARGUMENT carries a BadRequest whose every violation names a perturbed field, and names every
  field the model knows is bad (unless the list was capped);
- writes are all or nothing, exactly as documented: a rejected request writes nothing (not even its
  request_id), an accepted CreatePayment one payment, its first transition, one outbox row and one
  idempotency record; CapturePayment / RefundPayment their row, its first history row, one command and the
  record; an error answer that is stored (NOT_FOUND, a status the payment does not allow) the record only;
  a replay nothing, and the same answer again; reads write nothing.

Requests that are not decodable (invalid UTF-8 in a string field, truncated or random bytes) are
INVALID_ARGUMENT naming the field. Runs are derandomized; ``SWITCHBOARD_FUZZ_SCALE`` scales them.
"""

from __future__ import annotations

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
from google.protobuf.message import DecodeError, Message
from google.rpc import status_pb2
from hypothesis import assume, event, example, given, note, settings
from hypothesis import strategies as st

from gateway.server import Gateway
from switchboard.fakes.stripe import FakeStripe
from switchboard.payments.v1 import payments_pb2, payments_pb2_grpc
from tenants.sealing import MasterKeyRing
from tests.conftest import TenantCredentials, make_tenant
from tests.test_fuzz import (
    EMAILS,
    FUZZ,
    INVALID_UTF8,
    KNOWN_GOOD_EMAILS,
    KNOWN_GOOD_PHONES,
    MARKER,
    MAX_REQUEST_BYTES,
    PHONES,
    bad_request,
    check_violations,
    delta,
    examples,
    metadata_maps,
    near,
    often,
    rich,
    text,
)
from tests.test_payment_worker import Rig, fake_stripe, make_rig, use_stripe

if TYPE_CHECKING:
    Stub: TypeAlias = payments_pb2_grpc.PaymentServiceAsyncStub

__all__ = ["fake_stripe"]  # fixture shared with test_payment_worker

SERVICE = "/switchboard.payments.v1.PaymentService"
#: Codes a request alone may get (ABORTED and UNAVAILABLE need contention or an outage; none here).
ALLOWED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.NOT_FOUND,
}
TABLES = (
    "payments",
    "payment_transitions",
    "payment_attempts",
    "payment_captures",
    "payment_refunds",
    "payment_operation_transitions",
    "outbox",
    "idempotency_keys",
)
CREATE_EXAMPLES = examples(250)
MUTATION_EXAMPLES = examples(200)
READ_EXAMPLES = examples(150)
RAW_EXAMPLES = examples(120)
AMOUNT_MAX = 999_999_999_999
INT64 = (-(2**63), 2**63 - 1)
TIMESTAMP_SECONDS = (-62_135_596_800, 253_402_300_799)  # 0001-01-01 .. 9999-12-31 (google.protobuf.Timestamp)
#: Currencies the model knows the answer for; any other three upper-case letters may go either way.
GOOD_CURRENCIES = ("EUR", "USD", "JPY", "KWD", "ISK", "CLP", "BHD")
BAD_CURRENCIES = (
    "XAU",
    "XXX",
    "XTS",
    "CHE",
    "CLF",
    "HRK",
    "SLL",
    "ZWL",
    "ABC",
    "eur",
    "Eur",
    "EU",
    "EURO",
    "",
)
UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
METADATA_KEY_RE = re.compile(r"[A-Za-z0-9_.\-/]{1,64}")


@pytest.fixture(autouse=True)
def _print_profile() -> None:
    print(
        f"hypothesis: derandomize=True database=None max_examples: create={CREATE_EXAMPLES} "
        f"mutations={MUTATION_EXAMPLES} reads={READ_EXAMPLES} raw={RAW_EXAMPLES}"
    )


# --- values ----------------------------------------------------------------------------------------


def luhn_valid(digits: str) -> bool:
    """ISO/IEC 7812 check digit (the model's own)."""
    total = 0
    for position, char in enumerate(reversed(digits)):
        value = int(char) * (2 if position % 2 else 1)
        total += value - 9 if value > 9 else value
    return total % 10 == 0


def looks_like_card(text: str) -> bool:
    """12-19 digits, spaces and dashes allowed between them, passing Luhn: card data (PCI DSS)."""
    if not re.fullmatch(r"[0-9][0-9 -]*[0-9]", text):
        return False
    digits = re.sub(r"[ -]", "", text)
    return 12 <= len(digits) <= 19 and luhn_valid(digits)


def amounts(zero_allowed: bool) -> st.SearchStrategy[int]:
    edges = (-1, 0, 1, 2, AMOUNT_MAX - 1, AMOUNT_MAX, AMOUNT_MAX + 1, *INT64)
    return st.one_of(
        st.sampled_from(edges),
        st.integers(*INT64),
        st.integers(0, 5000) if zero_allowed else st.integers(1, 5000),
    )


def enum_numbers(known: int) -> st.SearchStrategy[int]:
    return st.one_of(st.integers(0, known), st.sampled_from((known + 1, -1, 2**31 - 1, -(2**31))))


REQUEST_IDS = often(
    near(st.from_regex(r"[\x21-\x7e]{1,127}", fullmatch=True)),
    text((128,), extra=("abc\n", "abc ", " abc", "ab\x7f", "é", "~" * 128, "pay ment")),
    st.from_regex(r"[\x21-\x7e]{1,128}", fullmatch=True),
)
TOKENS = often(
    st.sampled_from(("pm_card_visa", "pm_card_mastercard", "pm_" + "x" * 252, "pm_" + "x" * 253)),
    st.sampled_from(
        (
            "4242424242424242",
            "4242 4242 4242 4242",
            "4242-4242-4242-4242",
            "4000056655665556",
            "378282246310005",
            "4242424242424241",  # fails Luhn: an odd token, not a card
            "424242424242",
            "12345678903",
            "pm card",
            "pm_card_visa\n",
            "pm_é",
            "",
        )
    ),
    near(st.sampled_from(("pm_card_visa", "4242424242424242"))),
    text((255,)),
)
CURRENCIES = st.one_of(
    st.sampled_from(GOOD_CURRENCIES + BAD_CURRENCIES),
    st.from_regex(r"[A-Z]{3}", fullmatch=True),
    near(st.sampled_from(GOOD_CURRENCIES)),
    text((3,), huge=False),
)
PAYMENT_IDS = ("unknown", "other_tenant", "capturable", "refundable", "cancelable")


def create_values() -> dict[str, st.SearchStrategy[Any]]:
    return {
        "request_id": REQUEST_IDS,
        "amount_minor": amounts(zero_allowed=False),
        "currency": CURRENCIES,
        "customer_reference": text((128,)),
        "customer.email": st.one_of(st.sampled_from(EMAILS), text((254, 320))),
        "customer.phone_number": st.one_of(st.sampled_from(PHONES), text((16,))),
        "payment_method": TOKENS,
        "capture_method": enum_numbers(2),
        "description": text((1000,)),
        "metadata": metadata_maps(small=False),
    }


CREATE_VALUES = create_values()


# --- requests and the model ------------------------------------------------------------------------


@dataclass(frozen=True)
class Perturbed:
    """A valid request of ``method`` with the fields of ``perturbed`` replaced."""

    method: str
    perturbed: Mapping[str, Any] = field(default_factory=dict)
    target: str = "unknown"  # the payment a mutation names, when payment_id is not perturbed

    def build(self, targets: Mapping[str, str]) -> Any:
        request: Any
        if self.method == "CreatePayment":
            request = payments_pb2.CreatePaymentRequest(
                request_id=f"fuzz-{uuid.uuid4()}",
                amount_minor=1050,
                currency="EUR",
                customer_reference="cust-1",
                customer=payments_pb2.CustomerContact(
                    email=KNOWN_GOOD_EMAILS[0], phone_number=KNOWN_GOOD_PHONES[0]
                ),
                payment_method="pm_card_visa",
                description="fuzz",
                metadata={"order": "42"},
            )
        else:
            request = getattr(payments_pb2, f"{self.method}Request")(
                request_id=f"fuzz-{uuid.uuid4()}", payment_id=targets[self.target]
            )
        for path, value in self.perturbed.items():
            *parents, name = path.split(".")
            holder: Any = request
            for parent in parents:
                holder = getattr(holder, parent)
            if isinstance(value, dict):
                getattr(holder, name).clear()
                getattr(holder, name).update(value)
            else:
                setattr(holder, name, value)
        return request


def expect_create(request: payments_pb2.CreatePaymentRequest) -> tuple[set[str], bool]:
    """(fields that must be named, whether the model cannot tell): proto comments and docs/payments.md."""
    bad: set[str] = set()
    unknown = False
    if not re.fullmatch(r"[\x21-\x7e]{1,128}", request.request_id):
        bad.add("request_id")
    if not 1 <= request.amount_minor <= AMOUNT_MAX:
        bad.add("amount_minor")
    if request.currency not in GOOD_CURRENCIES:
        if request.currency in BAD_CURRENCIES or not re.fullmatch(r"[A-Z]{3}", request.currency):
            bad.add("currency")
        else:
            unknown = True  # three letters: whether ISO 4217 lists it is the table's business
    reference = request.customer_reference
    if len(reference) > 128 or re.search(r"[\x00-\x1f\x7f]", reference):
        bad.add("customer_reference")
    email = request.customer.email
    if email and email not in KNOWN_GOOD_EMAILS:
        if (
            "@" not in email
            or len(email) > 254
            or any(c.isspace() or unicodedata.category(c) == "Cc" for c in email)
        ):
            bad.add("customer.email")
        else:
            unknown = True
    phone = request.customer.phone_number
    if phone and phone not in KNOWN_GOOD_PHONES:
        if not re.fullmatch(r"\+[1-9][0-9]{1,14}", phone):
            bad.add("customer.phone_number")
        else:
            unknown = True
    token = request.payment_method
    if not re.fullmatch(r"[\x21-\x7e]{1,255}", token) or looks_like_card(token):
        bad.add("payment_method")
    if request.capture_method not in (0, 1, 2):
        bad.add("capture_method")
    if len(request.description) > 1000 or "\x00" in request.description:
        bad.add("description")
    metadata = request.metadata
    if len(metadata) > 32 or any(
        not METADATA_KEY_RE.fullmatch(k) or len(v) > 512 or "\x00" in v for k, v in metadata.items()
    ):
        bad.add("metadata")
    return bad, unknown


def expect_mutation(request: Any) -> tuple[set[str], bool]:
    """The model of CapturePayment, CancelPayment and RefundPayment requests."""
    bad: set[str] = set()
    unknown = False
    if not re.fullmatch(r"[\x21-\x7e]{1,128}", request.request_id):
        bad.add("request_id")
    if not UUID_RE.fullmatch(request.payment_id):
        try:
            uuid.UUID(request.payment_id)
            unknown = True  # another spelling of a UUID (braces, upper case, no dashes)
        except ValueError:
            bad.add("payment_id")
    if hasattr(request, "amount_minor") and not 0 <= request.amount_minor <= AMOUNT_MAX:
        bad.add("amount_minor")
    if hasattr(request, "reason") and (len(request.reason) > 500 or "\x00" in request.reason):
        bad.add("reason")
    return bad, unknown


#: Rows an accepted (OK, first) request writes.
WRITES: Mapping[str, Counter[str]] = {
    "CreatePayment": Counter(payments=1, payment_transitions=1, outbox=1, idempotency_keys=1),
    "CapturePayment": Counter(
        payment_captures=1, payment_operation_transitions=1, outbox=1, idempotency_keys=1
    ),
    "RefundPayment": Counter(
        payment_refunds=1, payment_operation_transitions=1, outbox=1, idempotency_keys=1
    ),
}


@dataclass
class Answers:
    """The first answer of every request_id the tenant used: its request encoding, code and reply."""

    first: dict[str, tuple[bytes, grpc.StatusCode, bytes]] = field(default_factory=dict)

    def check(
        self,
        request: Any,
        method: str,
        perturbed: set[str],
        code: grpc.StatusCode,
        status: status_pb2.Status | None,
        reply: Message | None,
        cancel_writes: Counter[str] | None = None,
    ) -> Counter[str]:
        """Check one answer against the model; return the rows it must have written."""
        bad, unknown = expect_create(request) if method == "CreatePayment" else expect_mutation(request)
        verdict = "invalid" if bad else "unknown" if unknown else "valid"
        note(f"{method}: model {verdict} {sorted(bad)}; answer {code.name}")
        event(f"{method}: model {verdict}, answer {code.name}")
        assert code in ALLOWED, (code, status)
        fingerprint = request.SerializeToString(deterministic=True)
        earlier = self.first.get(request.request_id)
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            assert status is not None
            violations = bad_request(status)
            # A well-formed capture above the authorized amount: an answer about the payment, which
            # is stored with the key like any other (docs/payments.md, "Idempotency").
            by_payment = (
                method == "CapturePayment" and not bad and [v.field for v in violations] == ["amount_minor"]
            )
            assert verdict != "valid" or by_payment, ("a valid request was rejected", status)
            check_violations(status, perturbed, bad)
            if not by_payment:
                return Counter()
            if earlier is not None:
                assert earlier[:2] == (fingerprint, code), "a replay did not get the first answer"
                return Counter()
            self.first[request.request_id] = (fingerprint, code, status.SerializeToString())
            return Counter(idempotency_keys=1)
        assert not bad, f"bad fields {sorted(bad)} were not rejected"
        answer = (reply if reply is not None else status or status_pb2.Status()).SerializeToString(
            deterministic=True
        )
        if earlier is not None:
            if earlier[0] == fingerprint:
                assert (code, answer) == earlier[1:], "a replay did not get the first answer"
            else:
                assert code == grpc.StatusCode.FAILED_PRECONDITION, ("a reused request_id", code)
            return Counter()
        self.first[request.request_id] = (fingerprint, code, answer)
        if code != grpc.StatusCode.OK:
            return Counter(idempotency_keys=1)  # the error answer is stored with the key
        if method == "CancelPayment":
            assert cancel_writes is not None
            return cancel_writes
        return WRITES[method]


async def counts(pool: asyncpg.Pool) -> Counter[str]:
    found: Counter[str] = Counter()
    async with pool.acquire() as conn:
        for table in TABLES:
            found[table] = await conn.fetchval(f"SELECT count(*) FROM {table}")  # noqa: S608
    return found


# --- fixtures --------------------------------------------------------------------------------------


@pytest.fixture
async def stub(gateway: Gateway) -> AsyncIterator[Stub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        yield payments_pb2_grpc.PaymentServiceStub(channel)


@pytest.fixture
async def rig(pool: asyncpg.Pool, settings: Any, tenant: TenantCredentials) -> AsyncIterator[Rig]:
    made = await make_rig(pool, settings, tenant.tenant_id)
    yield made
    await made.processors.close()


@pytest.fixture
async def targets(
    rig: Rig, fake_stripe: FakeStripe, key_ring: MasterKeyRing, pool: asyncpg.Pool
) -> dict[str, str]:
    """Payment ids by role: one that can be captured, refunded, canceled; another tenant's; unknown."""
    await use_stripe(pool, key_ring, rig.tenant_id, fake_stripe)
    capturable, _ = await rig.charge(capture_method=payments_pb2.CAPTURE_METHOD_MANUAL, amount_minor=5000)
    refundable, _ = await rig.charge(amount_minor=5000)
    cancelable = await rig.create()
    other = await make_tenant(pool, "globex")
    other_rig = await make_rig(pool, rig.settings, other.tenant_id)
    foreign = await other_rig.create()
    await other_rig.processors.close()
    return {
        "capturable": str(capturable),
        "refundable": str(refundable),
        "cancelable": str(cancelable),
        "other_tenant": str(foreign),
        "unknown": str(uuid.uuid4()),
    }


@pytest.fixture
def answers() -> Answers:
    return Answers()


async def call(stub: Stub, method: str, request: Message, metadata: Any) -> tuple[grpc.StatusCode, Any, Any]:
    """(code, rich status or None, reply or None)."""
    try:
        reply = await getattr(stub, method)(request, metadata=metadata, timeout=60)
    except grpc.aio.AioRpcError as error:
        return error.code(), rich(error), None
    return grpc.StatusCode.OK, None, reply


# --- CreatePayment ---------------------------------------------------------------------------------


@st.composite
def create_cases(draw: st.DrawFn) -> Perturbed:
    chosen = draw(st.lists(st.sampled_from(tuple(CREATE_VALUES)), unique=True, max_size=4))
    return Perturbed("CreatePayment", {name: draw(CREATE_VALUES[name]) for name in chosen})


CREATE_REGRESSIONS = (
    Perturbed("CreatePayment", {"request_id": "pay\n"}),
    Perturbed("CreatePayment", {"payment_method": "4242 4242 4242 4242"}),
    Perturbed("CreatePayment", {"payment_method": "pm_card_visa\n"}),
    Perturbed("CreatePayment", {"currency": "eur", "amount_minor": 2**63 - 1}),
    Perturbed("CreatePayment", {"amount_minor": AMOUNT_MAX + 1, "capture_method": 2**31 - 1}),
    Perturbed("CreatePayment", {"metadata": {"!" * 100_000: "v"}}),
    Perturbed("CreatePayment", {"metadata": {f"k{i}": "v" for i in range(20_000)}}),
    Perturbed("CreatePayment", {"customer.email": EMAILS[-2], "customer_reference": "\x00" * 129}),
    Perturbed("CreatePayment", {"request_id": "same-key"}),
    Perturbed("CreatePayment", {"request_id": "same-key", "amount_minor": 1}),
)


def with_examples(
    name: str, cases: tuple[Perturbed, ...]
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def decorate(test: Callable[..., Any]) -> Callable[..., Any]:
        for case in reversed(cases):
            test = example(**{name: case})(test)
        return test

    return decorate


@settings(FUZZ, max_examples=CREATE_EXAMPLES)
@given(case=create_cases())
@with_examples("case", CREATE_REGRESSIONS)
async def test_create_payment_fuzz(
    stub: Stub, tenant: TenantCredentials, pool: asyncpg.Pool, answers: Answers, case: Perturbed
) -> None:
    request = case.build({})
    assume(request.ByteSize() <= MAX_REQUEST_BYTES)
    before = await counts(pool)
    code, status, reply = await call(stub, "CreatePayment", request, tenant.metadata)
    written = delta(before, await counts(pool))
    assert written == answers.check(request, "CreatePayment", set(case.perturbed), code, status, reply)
    if reply is not None:
        assert reply.payment.status == payments_pb2.PAYMENT_STATUS_REQUIRES_PROCESSING


# --- CapturePayment, CancelPayment, RefundPayment ---------------------------------------------------


def mutation_values(method: str) -> dict[str, st.SearchStrategy[Any]]:
    values: dict[str, st.SearchStrategy[Any]] = {
        "request_id": REQUEST_IDS,
        "payment_id": st.one_of(
            st.sampled_from(("", "not-a-uuid", "00000000-0000-0000-0000-00000000000g", "payments/1")),
            st.builds(lambda u: str(u).upper(), st.uuids()),
            st.builds(lambda u: "{" + str(u) + "}", st.uuids()),
            st.builds(lambda u: u.hex, st.uuids()),
            near(st.builds(str, st.uuids())),
            text((36,)),
        ),
    }
    if method != "CancelPayment":
        values["amount_minor"] = amounts(zero_allowed=True)
    if method != "CapturePayment":
        values["reason"] = text((500,))
    return values


MUTATIONS = ("CapturePayment", "CancelPayment", "RefundPayment")
MUTATION_VALUES = {method: mutation_values(method) for method in MUTATIONS}
DEFAULT_TARGET = {
    "CapturePayment": "capturable",
    "CancelPayment": "cancelable",
    "RefundPayment": "refundable",
}


@st.composite
def mutation_cases(draw: st.DrawFn) -> Perturbed:
    method = draw(st.sampled_from(MUTATIONS))
    values = MUTATION_VALUES[method]
    chosen = draw(st.lists(st.sampled_from(tuple(values)), unique=True, max_size=3))
    target = draw(st.sampled_from((DEFAULT_TARGET[method], DEFAULT_TARGET[method], *PAYMENT_IDS)))
    return Perturbed(method, {name: draw(values[name]) for name in chosen}, target)


MUTATION_REGRESSIONS = (
    Perturbed("CapturePayment", {"amount_minor": 5001}, "capturable"),  # above the authorization
    Perturbed("CapturePayment", {"amount_minor": 2**63 - 1, "payment_id": "x"}, "capturable"),
    Perturbed("RefundPayment", {"amount_minor": 5001}, "refundable"),  # above what was captured
    Perturbed("RefundPayment", {"reason": "\x00"}, "refundable"),
    Perturbed("CancelPayment", {}, "other_tenant"),
    Perturbed("CancelPayment", {"reason": "r" * 501}, "cancelable"),
    Perturbed("RefundPayment", {}, "capturable"),  # not SUCCEEDED
)


@settings(FUZZ, max_examples=MUTATION_EXAMPLES)
@given(case=mutation_cases())
@with_examples("case", MUTATION_REGRESSIONS)
async def test_capture_cancel_refund_fuzz(
    stub: Stub,
    tenant: TenantCredentials,
    pool: asyncpg.Pool,
    answers: Answers,
    targets: dict[str, str],
    case: Perturbed,
) -> None:
    request: Any = case.build(targets)
    assume(request.ByteSize() <= MAX_REQUEST_BYTES)
    before = await counts(pool)
    status_before = await _status(pool, request.payment_id)
    code, status, reply = await call(stub, case.method, request, tenant.metadata)
    written = delta(before, await counts(pool))
    # A cancel of a REQUIRES_PROCESSING payment records its transition to CANCELED; of an
    # authorization, only the command (the payment waits for the processor).
    cancel_writes = Counter(outbox=1, idempotency_keys=1)
    if status_before == "requires_processing":
        cancel_writes["payment_transitions"] = 1
    expected = answers.check(request, case.method, set(case.perturbed), code, status, reply, cancel_writes)
    assert written == expected
    if code == grpc.StatusCode.NOT_FOUND:
        assert request.payment_id not in (targets["capturable"], targets["refundable"], targets["cancelable"])


def _parses_as_uuid(value: str) -> bool:
    """Another spelling of a UUID (upper case, braces, no dashes): a payment id either way."""
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


async def _status(pool: asyncpg.Pool, payment_id: str) -> str | None:
    try:
        parsed = uuid.UUID(payment_id)
    except ValueError:
        return None
    found: str | None = await pool.fetchval("SELECT status FROM payments WHERE id = $1", parsed)
    return found


# --- GetPayment and ListPayments -------------------------------------------------------------------


@st.composite
def timestamps(draw: st.DrawFn) -> dict[str, int] | None:
    if draw(st.booleans()):
        return None
    seconds = draw(
        st.one_of(
            st.sampled_from(
                (TIMESTAMP_SECONDS[0] - 1, *TIMESTAMP_SECONDS, TIMESTAMP_SECONDS[1] + 1, 0, *INT64)
            ),
            st.integers(0, 2_000_000_000),
        )
    )
    nanos = draw(st.sampled_from((0, 1, 999_999_999, 1_000_000_000, -1, 2**31 - 1)))
    return {"seconds": seconds, "nanos": nanos}


@dataclass(frozen=True)
class Read:
    """A GetPayment (``payment_id`` set) or ListPayments request's fields."""

    payment_id: str | None = None
    page_size: int = 0
    status: int = 0
    currency: str = ""
    customer_reference: str = ""
    page_token: str = ""
    after: dict[str, int] | None = None
    before: dict[str, int] | None = None


def valid_time(stamp: dict[str, int] | None) -> bool:
    return stamp is None or (
        TIMESTAMP_SECONDS[0] <= stamp["seconds"] <= TIMESTAMP_SECONDS[1]
        and 0 <= stamp["nanos"] <= 999_999_999
    )


@st.composite
def reads(draw: st.DrawFn) -> Read:
    if draw(st.booleans()):
        return Read(payment_id=draw(MUTATION_VALUES["CancelPayment"]["payment_id"]))
    return Read(
        page_size=draw(
            st.one_of(st.sampled_from((-1, 0, 1, 999, 1000, 1001, 2**31 - 1, -(2**31))), st.integers(0, 5))
        ),
        status=draw(enum_numbers(7)),
        currency=draw(st.one_of(st.just(""), CURRENCIES)),
        customer_reference=draw(st.one_of(st.just(""), text((128,), huge=False))),
        page_token=draw(
            st.one_of(st.just(""), st.sampled_from(("x", "AAAA", "==", "eyJ9")), text((64,), huge=False))
        ),
        after=draw(timestamps()),
        before=draw(timestamps()),
    )


@settings(FUZZ, max_examples=READ_EXAMPLES)
@given(read=reads())
@example(read=Read(after={"seconds": 10, "nanos": 0}, before={"seconds": 5, "nanos": 0}))
@example(read=Read(after={"seconds": 2**63 - 1, "nanos": 0}, page_size=2**31 - 1))
@example(read=Read(payment_id="{" + str(uuid.UUID(int=1)) + "}"))
@example(read=Read(before={"seconds": TIMESTAMP_SECONDS[1], "nanos": 999_999_999}))
@example(read=Read(after={"seconds": 0, "nanos": 1_000_000_000}))
@example(read=Read(after={"seconds": 0, "nanos": 1}, before={"seconds": 0, "nanos": 1}))  # equal, below 1 us
async def test_get_and_list_payments_fuzz(
    stub: Stub, tenant: TenantCredentials, pool: asyncpg.Pool, targets: dict[str, str], read: Read
) -> None:
    before = await counts(pool)
    if read.payment_id is not None:
        request: Any = payments_pb2.GetPaymentRequest(payment_id=read.payment_id)
        code, status, reply = await call(stub, "GetPayment", request, tenant.metadata)
        bad = (
            set()
            if UUID_RE.fullmatch(read.payment_id) or _parses_as_uuid(read.payment_id)
            else {"payment_id"}
        )
        mine = {targets["capturable"], targets["refundable"], targets["cancelable"]}
        if code == grpc.StatusCode.OK:
            assert str(uuid.UUID(reply.payment.payment_id)) in mine
        perturbed = {"payment_id"}
    else:
        request = payments_pb2.ListPaymentsRequest(
            page_size=read.page_size,
            status=read.status,  # type: ignore[arg-type]  # unknown enum numbers on purpose
            currency=read.currency,
            customer_reference=read.customer_reference,
            page_token=read.page_token,
        )
        for name, stamp in (("create_time_after", read.after), ("create_time_before", read.before)):
            if stamp is not None:
                getattr(request, name).seconds = stamp["seconds"]
                getattr(request, name).nanos = stamp["nanos"]
        code, status, reply = await call(stub, "ListPayments", request, tenant.metadata)
        bad = set()
        if not 0 <= read.page_size <= 1000:
            bad.add("page_size")
        if read.status not in range(8):
            bad.add("status")
        if (
            read.currency
            and read.currency not in GOOD_CURRENCIES
            and (read.currency in BAD_CURRENCIES or not re.fullmatch(r"[A-Z]{3}", read.currency))
        ):
            bad.add("currency")
        if len(read.customer_reference) > 128:
            bad.add("customer_reference")
        for name, stamp in (("create_time_after", read.after), ("create_time_before", read.before)):
            if not valid_time(stamp):
                bad.add(name)
        lower, upper = read.after, read.before
        if (
            lower is not None
            and upper is not None
            and valid_time(lower)
            and valid_time(upper)
            and (upper["seconds"], upper["nanos"]) <= (lower["seconds"], lower["nanos"])
        ):
            bad.add("create_time_before")
        if read.page_token and not bad:
            bad.add("page_token")  # we issued no token: checked once the filters are valid
        perturbed = {
            "page_size",
            "status",
            "currency",
            "customer_reference",
            "page_token",
            "create_time_after",
            "create_time_before",
        }
        if code == grpc.StatusCode.OK:
            assert not read.page_token  # we issued no token: any other is refused
            assert {p.payment_id for p in reply.payments} <= {
                targets["capturable"],
                targets["refundable"],
                targets["cancelable"],
            }
    note(f"model bad {sorted(bad)}; answer {code.name}")
    assert code in {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND}, (
        code,
        status,
    )
    if bad:
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, bad)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        assert status is not None
        check_violations(status, perturbed, bad)
    assert delta(before, await counts(pool)) == Counter()  # reads never write


# --- raw bytes -------------------------------------------------------------------------------------

STRING_FIELDS = (
    "request_id",
    "currency",
    "customer_reference",
    "customer.email",
    "payment_method",
    "description",
)


def corrupt(path: str, bad: bytes) -> tuple[bytes, bytes]:
    """(a valid CreatePaymentRequest encoding, the same with invalid UTF-8 in ``path``), same length."""
    marked: Any = Perturbed("CreatePayment", {path: MARKER}).build({})
    encoded = marked.SerializeToString()
    marker = MARKER.encode()
    assert encoded.count(marker) == 1
    return encoded, encoded.replace(marker, bad.ljust(len(marker), b"x"))


@st.composite
def raw_payloads(draw: st.DrawFn) -> tuple[str, bytes, str | None]:
    """(method, bytes, the field the answer must name when known)."""
    kind = draw(st.sampled_from(("garbage", "utf8", "truncated", "mutation")))
    if kind == "garbage":
        return (
            draw(st.sampled_from(("CreatePayment", "GetPayment", "ListPayments"))),
            draw(st.binary(max_size=64)),
            None,
        )
    if kind == "mutation":
        method = draw(st.sampled_from(MUTATIONS))
        field_number = draw(st.sampled_from((1, 2)))  # request_id, payment_id
        bad = draw(st.sampled_from(INVALID_UTF8))
        payload = bytes([field_number << 3 | 2, len(bad)]) + bad
        return method, payload, ("request_id", "payment_id")[field_number - 1]
    path = draw(st.sampled_from(STRING_FIELDS))
    valid, payload = corrupt(path, draw(st.sampled_from(INVALID_UTF8)))
    if kind == "truncated":
        return "CreatePayment", valid[: draw(st.integers(0, max(0, len(valid) - 1)))], None
    return "CreatePayment", payload, path


def decodes(method: str, payload: bytes) -> bool:
    try:
        getattr(payments_pb2, f"{method}Request").FromString(payload)
    except DecodeError:
        return False
    return True


@settings(FUZZ, max_examples=RAW_EXAMPLES)
@given(raw=raw_payloads())
@example(raw=("CreatePayment", b"\x0a\x02\xc3\x28", "request_id"))
@example(raw=("CreatePayment", b"\x2a\x03\x0a\x01\xff", "customer.email"))
@example(raw=("RefundPayment", b"\x12\x01\xff", "payment_id"))
async def test_undecodable_payment_requests_are_invalid_argument(
    gateway: Gateway, tenant: TenantCredentials, pool: asyncpg.Pool, raw: tuple[str, bytes, str | None]
) -> None:
    method, payload, named = raw
    assume(not decodes(method, payload))
    before = await counts(pool)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        send = channel.unary_unary(
            f"{SERVICE}/{method}", request_serializer=lambda b: b, response_deserializer=lambda b: b
        )
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await send(payload, metadata=tenant.metadata, timeout=60)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (info.value.code(), info.value.details())
    status = rich(info.value)
    assert status is not None
    violations = bad_request(status)
    if named is not None:
        assert [v.field for v in violations] == [named]
    assert delta(before, await counts(pool)) == Counter()
