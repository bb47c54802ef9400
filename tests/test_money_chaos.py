"""Money chaos (issue "Payments", item 10): never two charges for one payment request.

One tenant's Stripe processor is a :class:`ChaosStripe` (FakeStripe on loopback
with seeded faults on charge requests); the gateway and the outbox relay run in
this process; the payment worker (with its janitor) is a separate OS process
(``switchboard payment-worker``) that a seeded monkey SIGKILLs and starts again.

- **Phase A**: 1,000 concurrent ``CreatePayment`` calls sharing ONE
  ``request_id`` over several gRPC channels (some with a 2 ms deadline: the
  client loses the answer and retries with the same ``request_id``), then a
  second wave of 500 retries of the same request.
- **Phase B**: 100 distinct payments (EUR, USD, JPY, GBP; every tenth one a
  card that declines), each sent 3 times at once, in waves while the worker
  is being killed.
- **Faults** on charge requests at the processor: the answer lost after the
  charge (``lost_response``), answers slower than the Stripe client's 30 s
  timeout (the charge happens after the client gave up), HTTP 500,
  connection resets, malformed answers and 429s. The same-key payment's sends
  only get the faults that strike after the charge (lost answer, slow answer):
  a fault before it (500, reset, malformed, 429 three times) would rightly end
  it FAILED after the lookup finds nothing, and the test wants one outcome for
  it, SUCCEEDED with exactly one charge.
- **The broker** (this test's own Tansu, memory storage) is SIGKILLed once
  during phase B and started again empty: topics, committed offsets and every
  command not yet consumed are gone. The relay's payment sweeper
  (``SWITCHBOARD_PAYMENT_SWEEP_AFTER_S``, 40 s here: longer than a slow
  processor call holds a command in the worker) publishes the lost commands
  again, and the worker's idempotency absorbs the copies.

Then, once every payment is final (bounded wait; UNKNOWN ones are resolved by
the janitor's lookup): every ``request_id`` has exactly one payment, the
same-key one SUCCEEDED with exactly one charge; the fake
recorded at most one charge per payment, exactly one for each SUCCEEDED one
and none for a FAILED one; each ledger journal balances; every processor
clearing balance equals what the fake captured, per currency; ``verify_chain``
and ``switchboard ledger verify`` pass. Finally one posting is altered in the
database (superuser, triggers bypassed): both name exactly that journal.

The figures appear in pytest's terminal summary (tests/figures.py).
``MONEY_CHAOS_SEED`` replays a run's fault plan, traffic and kill schedule (the
interleaving of requests still varies from run to run).

Timing: the Stripe connector's request timeout is 30 s (payments/stripe.py,
not a setting), so the lease of a call in flight
(``SWITCHBOARD_PAYMENT_LOOKUP_AFTER_S``) is 35 s and the first lookup of an
UNKNOWN attempt waits 35 s too (never sooner than a request that may still be
executing at the processor). A run takes two to two and a half minutes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any
from urllib.parse import parse_qsl

import asyncpg
import grpc
import pytest
from aiohttp import web

from gateway.relay import OutboxRelay
from gateway.server import Gateway, start_gateway
from payments.janitor import JANITOR_LEASE_S
from payments.ledger import account_balances
from payments.ledger_verify import BreakReason, verify_chain
from switchboard.embedded import EmbeddedKafka, free_port
from switchboard.fakes.http import Fault
from switchboard.fakes.stripe import FakeStripe
from switchboard.payments.v1 import payments_pb2, payments_pb2_grpc
from switchboard.settings import Settings
from tenants.sealing import MasterKeyRing
from tests.conftest import TenantCredentials
from tests.helpers import wait_for
from tests.test_payment_service import create_request
from tests.test_payment_worker import use_stripe
from tests.test_processor_config import STRIPE_KEY
from tests.test_tenant_providers import gateway_env

if TYPE_CHECKING:
    PaymentStub = payments_pb2_grpc.PaymentServiceAsyncStub

pytestmark = [pytest.mark.chaos, pytest.mark.slow]

SAME_KEY_CALLS = 1_000
SAME_KEY_RETRIES = 500
DISTINCT_PAYMENTS = 100
COPIES = 3
WAVES = 10
CHANNELS = 8
KILLS = 3
#: Share of calls given a 2 ms deadline: the client loses the answer and retries.
SHORT_DEADLINE_SHARE = 0.1
SHORT_DEADLINE_S = 0.002
CALL_TIMEOUT_S = 60.0
MAX_TRIES = 20
#: The Stripe client's request timeout (payments/stripe.py StripeProcessor, not a setting).
STRIPE_CLIENT_TIMEOUT_S = 30.0
#: A slow answer arrives this long after the request: the client has given up by then.
SLOW_S = STRIPE_CLIENT_TIMEOUT_S + 1.5
#: How long every payment may take to become final after the traffic and the kills.
FINAL_TIMEOUT_S = 150.0
#: Charge-request faults and their probabilities (per charge request at the fake).
FAULTS: tuple[tuple[str, float], ...] = (
    ("lost_response", 0.08),
    ("slow", 0.03),
    ("http_500", 0.05),
    ("reset", 0.05),
    ("malformed", 0.02),
    ("rate_limited", 0.03),
)
#: The faults that strike after the charge was made (the answer is lost or late): the only ones the
#: same-key payment's sends get, so that it ends SUCCEEDED whatever the plan.
AFTER_THE_CHARGE = frozenset({"lost_response", "slow"})
#: Metadata marking the same-key payment's charge requests at the fake.
SAME_KEY_MARK = ("money_chaos", "same-key")
#: The relay's payment sweeper deadline here: longer than a slow processor call (31.5 s) can hold a
#: consumed command back in the worker, so a copy is only made for a command the broker lost.
PAYMENT_SWEEP_AFTER_S = 40.0
#: Phase B wave before which the broker is killed (seeded in this range), and how long it stays down.
BROKER_KILL_WAVES = (2, 6)
BROKER_DOWN_S = (1.0, 4.0)
CURRENCIES = ("EUR", "USD", "JPY", "GBP")
DECLINING_TOKEN = "pm_card_chargeDeclined"
WORKER_SETTINGS = {
    # The lease of a processor call in flight must exceed the Stripe client's 30 s timeout.
    "SWITCHBOARD_PAYMENT_LOOKUP_AFTER_S": "35",
    # First lookup of an UNKNOWN attempt no sooner than the lease of its last send.
    "SWITCHBOARD_PAYMENT_LOOKUP_SCHEDULE_S": "35,5,5",
    "SWITCHBOARD_PAYMENT_JANITOR_INTERVAL_S": "0.5",
    "SWITCHBOARD_PAYMENT_BREAKER_COOL_DOWN_S": "3",
    "SWITCHBOARD_SHUTDOWN_GRACE_S": "30",
    "SWITCHBOARD_LOG_LEVEL": "info",
    "PYTHONUNBUFFERED": "1",
}
RETRYABLE = frozenset({grpc.StatusCode.ABORTED, grpc.StatusCode.UNAVAILABLE})
FINAL = ("succeeded", "failed")


def log(message: str) -> None:
    """One progress line (shown with ``pytest -s``)."""
    print(f"[money-chaos {time.strftime('%H:%M:%S')}] {message}", flush=True)


# --- the processor --------------------------------------------------------------------------------


class ChaosStripe(FakeStripe):
    """FakeStripe whose charge requests (``POST /v1/payment_intents``) draw a fault from a seeded plan.

    Lookups (search, list, retrieve) are answered normally. ``charge_requests``
    counts charge requests, ``injected`` the faults by kind, ``in_flight`` the
    charge requests being handled right now (a slow one stays in flight past the
    client's timeout).
    """

    def __init__(self, secret_key: str, rng: random.Random) -> None:
        super().__init__(secret_key)
        self._rng = rng
        self.charge_requests = 0
        self.in_flight = 0
        self.injected: Counter[str] = Counter()
        #: Faults of the same-key payment's sends: injected, and spared (struck before the charge).
        self.same_key_faults: Counter[str] = Counter()

    def _draw(self, *, after_the_charge_only: bool) -> Fault | None:
        """The next charge request's fault from the seeded plan (None: answered normally). With
        ``after_the_charge_only`` a planned fault that would strike before the charge is spared
        (the plan still advances, so a seed replays the same plan)."""
        roll = self._rng.random()
        for kind, probability in FAULTS:
            if roll < probability:
                if after_the_charge_only and kind not in AFTER_THE_CHARGE:
                    self.same_key_faults[f"{kind} (spared)"] += 1
                    return None
                self.injected[kind] += 1
                if after_the_charge_only:
                    self.same_key_faults[kind] += 1
                return _fault(kind)
            roll -= probability
        return None

    async def apply_faults(self, request: web.Request) -> web.StreamResponse | None:
        """Queue this charge request's planned fault (if any), then apply the queue as usual."""
        if request.method == "POST" and request.path == "/v1/payment_intents" and not self.faults:
            self.charge_requests += 1
            form = dict(parse_qsl((await request.read()).decode("utf-8", "replace")))
            same_key = form.get(f"metadata[{SAME_KEY_MARK[0]}]") == SAME_KEY_MARK[1]
            fault = self._draw(after_the_charge_only=same_key)
            if fault is not None:
                self.faults.append(fault)
        return await super().apply_faults(request)

    async def _create_intent(self, request: web.Request) -> web.StreamResponse:
        """FakeStripe's handler, counted in ``in_flight`` while it runs."""
        self.in_flight += 1
        try:
            return await super()._create_intent(request)
        finally:
            self.in_flight -= 1

    def charges_by_payment(self) -> dict[str, list[dict[str, Any]]]:
        """The recorded charges by ``metadata[switchboard_payment_id]``."""
        found: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for charge in self.charges:
            found[str(charge["metadata"].get("switchboard_payment_id", ""))].append(charge)
        return found

    def reads(self, path: str) -> int:
        """GET requests answered on ``path``."""
        return sum(1 for r in self.received if r.method == "GET" and r.path == path)


def _fault(kind: str) -> Fault:
    """The Fault of a FAULTS kind."""
    if kind == "lost_response":
        return Fault.lost_response()
    if kind == "slow":
        return Fault.slow(SLOW_S)
    if kind == "http_500":
        return FakeStripe.error(500, "api_error", message="injected internal error")
    if kind == "reset":
        return Fault.reset()
    if kind == "malformed":
        return Fault.malformed()
    if kind == "rate_limited":
        return Fault.rate_limited(retry_after_s=1)
    raise ValueError(kind)


# --- the payment worker process and the monkey ---------------------------------------------------


@dataclass
class Kill:
    """One SIGKILL of the payment worker."""

    at_s: float
    downtime_s: float
    in_flight: int
    charge_requests: int
    #: Wall-clock time once the process was reaped (its janitor's claims are all older).
    reaped_at: datetime = field(default_factory=lambda: datetime.now(UTC))


class WorkerProcess:
    """``switchboard payment-worker`` as a subprocess; each start logs to its own file."""

    def __init__(self, env: dict[str, str], log_dir: Path) -> None:
        self._env = env
        self._log_dir = log_dir
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        """Start a new worker process."""
        self.starts += 1
        self._close_log()
        self._log = (self._log_dir / f"payment-worker-{self.starts}.log").open("wb")
        # No preexec_fn: this process speaks gRPC, so it may only vfork + exec.
        self._process = subprocess.Popen(
            [sys.executable, "-m", "switchboard.cli", "payment-worker"],
            env=self._env,
            stdout=subprocess.DEVNULL,
            stderr=self._log,
        )

    async def kill(self) -> None:
        """SIGKILL the running worker and reap it."""
        assert self._process is not None
        self._process.send_signal(signal.SIGKILL)
        await asyncio.to_thread(self._process.wait, 30)

    async def stop(self) -> int:
        """SIGTERM; returns the exit code (it drains and commits first)."""
        assert self._process is not None
        self._process.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(self._process.wait, 60)
        self._close_log()
        return code

    def kill_leftover(self) -> None:
        """SIGKILL the process if it is still running (cleanup after a failure)."""
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait(30)
        self._close_log()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


async def run_monkey(
    worker: WorkerProcess, stripe: ChaosStripe, rng: random.Random, started: float, kills: list[Kill]
) -> None:
    """SIGKILL the worker ``KILLS`` times, each while it is working: once a seeded number of charge
    requests (5-40 for the first kill, then 1-12) reached Stripe since the last start (killing anyway
    after 90 s without them), and start it again after a seeded downtime."""
    for index in range(KILLS):
        wanted = stripe.charge_requests + (rng.randint(5, 40) if index == 0 else rng.randint(1, 12))
        downtime = rng.uniform(0.3, 3.0)

        async def working(wanted: int = wanted) -> bool:
            return stripe.charge_requests >= wanted

        with contextlib.suppress(AssertionError):  # raised after the timeout: kill anyway
            await wait_for(working, timeout_s=90.0, interval_s=0.005)
        kill = Kill(time.monotonic() - started, downtime, stripe.in_flight, stripe.charge_requests)
        await worker.kill()
        kill.reaped_at = datetime.now(UTC)
        kills.append(kill)
        log(
            f"SIGKILL #{index + 1} payment worker at {kill.at_s:.1f} s "
            f"({kill.in_flight} charge request(s) in flight at Stripe), down {downtime:.1f} s"
        )
        await asyncio.sleep(downtime)
        worker.start()


@dataclass
class BrokerKill:
    """The broker's SIGKILL: when (s since the start), how long it was down, and the commands
    the relay had published by then."""

    at_s: float = 0.0
    downtime_s: float = 0.0
    published_before: int = 0


async def kill_broker(
    broker: EmbeddedKafka, downtime_s: float, started: float, relay: OutboxRelay, record: BrokerKill
) -> None:
    """SIGKILL the broker (memory storage: everything it held is gone) and start it again, empty,
    after ``downtime_s``; the port may take a moment to be free again."""
    record.at_s = time.monotonic() - started
    record.published_before = relay.published
    await asyncio.to_thread(broker.kill)
    log(f"SIGKILL broker at {record.at_s:.1f} s ({relay.published} outbox rows published so far)")
    await asyncio.sleep(downtime_s)
    for attempt in range(20):
        try:
            await asyncio.to_thread(broker.start)
            break
        except (RuntimeError, TimeoutError):
            if attempt == 19:
                raise
            await asyncio.sleep(0.5)
    record.downtime_s = time.monotonic() - started - record.at_s
    log(f"broker back, empty, after {record.downtime_s:.1f} s")


# --- the clients ---------------------------------------------------------------------------------


@dataclass
class Calls:
    """What the clients sent and were answered."""

    sent: int = 0
    codes: Counter[str] = field(default_factory=Counter)
    short_deadline: int = 0
    ids: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    answered_statuses: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))

    async def create(
        self,
        stub: PaymentStub,
        request: payments_pb2.CreatePaymentRequest,
        metadata: tuple[tuple[str, str], ...],
        *,
        lose_first_answer: bool,
    ) -> None:
        """CreatePayment until answered OK, retrying ABORTED / UNAVAILABLE (and the deadline the
        client set itself) with the same request_id. Raises AssertionError on anything else."""
        for attempt in range(MAX_TRIES):
            short = lose_first_answer and attempt == 0
            self.sent += 1
            self.short_deadline += short
            try:
                response = await stub.CreatePayment(
                    request, metadata=metadata, timeout=SHORT_DEADLINE_S if short else CALL_TIMEOUT_S
                )
            except grpc.aio.AioRpcError as exc:
                self.codes[exc.code().name] += 1
                if exc.code() in RETRYABLE or (short and exc.code() is grpc.StatusCode.DEADLINE_EXCEEDED):
                    continue
                raise AssertionError(f"{request.request_id}: {exc.code().name} {exc.details()}") from None
            self.codes["OK"] += 1
            self.ids[request.request_id].add(response.payment.payment_id)
            status = payments_pb2.PaymentStatus.Name(response.payment.status)
            self.answered_statuses[request.request_id][status] += 1
            return
        raise AssertionError(f"{request.request_id}: no OK answer in {MAX_TRIES} tries")


@dataclass
class Channels:
    """Several gRPC channels to the gateway, used round-robin."""

    stubs: list[PaymentStub]
    _next: int = 0

    def stub(self) -> PaymentStub:
        """The next channel's stub."""
        self._next = (self._next + 1) % len(self.stubs)
        return self.stubs[self._next]


@contextlib.asynccontextmanager
async def open_channels(port: int) -> AsyncIterator[Channels]:
    """``CHANNELS`` insecure channels to 127.0.0.1:``port`` (closed after use)."""
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}") for _ in range(CHANNELS)]
    try:
        yield Channels([payments_pb2_grpc.PaymentServiceStub(c) for c in channels])
    finally:
        for channel in channels:
            await channel.close(None)


def distinct_requests(rng: random.Random, seed: int) -> list[payments_pb2.CreatePaymentRequest]:
    """Phase B's payments: seeded amounts and currencies; every tenth one with a declining card."""
    requests = []
    for n in range(DISTINCT_PAYMENTS):
        declines = n % 10 == 7
        requests.append(
            create_request(
                request_id=f"money-chaos-{seed}-{n}",
                amount_minor=rng.randint(100, 99_999),
                currency=rng.choice(CURRENCIES),
                payment_method=DECLINING_TOKEN if declines else "pm_card_visa",
                description=f"money chaos {n}",
                metadata={"n": str(n)},
            )
        )
    return requests


# --- waiting and checking ------------------------------------------------------------------------


async def wait_until_final(
    pool: asyncpg.Pool, tenant_id: uuid.UUID, last_kill: datetime | None, rescued: list[uuid.UUID]
) -> float:
    """Wait (bounded) until every payment of the tenant is SUCCEEDED or FAILED; returns the seconds.

    Lookups claimed by a janitor that was then SIGKILLed stay leased for
    ``JANITOR_LEASE_S`` (10 min) before another janitor may take them, as
    documented; such leases (taken before ``last_kill``, so ending before
    ``last_kill + JANITOR_LEASE_S``, while the running janitor's end later) are
    moved to now instead of waiting 10 minutes, and counted in ``rescued``.
    """
    started = time.monotonic()
    deadline = started + FINAL_TIMEOUT_S
    next_report = started
    while True:
        if last_kill is not None:
            moved = await pool.fetch(
                """UPDATE payment_attempts SET next_lookup_at = now()
                    WHERE tenant_id = $1 AND status IN ('pending', 'unknown')
                      AND next_lookup_at > now() + interval '5 minutes' AND next_lookup_at <= $2
                RETURNING payment_id""",
                tenant_id,
                last_kill + timedelta(seconds=JANITOR_LEASE_S),
            )
            rescued.extend(r["payment_id"] for r in moved)
        rows = await pool.fetch(
            "SELECT status, count(*) AS n FROM payments WHERE tenant_id = $1 GROUP BY status", tenant_id
        )
        statuses = {r["status"]: r["n"] for r in rows}
        if all(status in FINAL for status in statuses):
            return time.monotonic() - started
        now = time.monotonic()
        if now > deadline:
            raise AssertionError(f"payments not final after {FINAL_TIMEOUT_S} s: {statuses}")
        if now >= next_report:
            log(f"waiting for final statuses: {dict(sorted(statuses.items()))}")
            next_report = now + 10.0
        await asyncio.sleep(0.25)


async def _broker_back(record: BrokerKill) -> bool:
    return record.downtime_s > 0


async def tamper(pool: asyncpg.Pool, sql: str, *args: Any) -> str:
    """Run ``sql`` as the superuser with the ledger's triggers switched off."""
    async with pool.acquire() as conn:
        await conn.execute("SET session_replication_role = replica")
        try:
            return await conn.execute(sql, *args)
        finally:
            await conn.execute("RESET session_replication_role")


async def ledger_verify_cli(database_url: str) -> subprocess.CompletedProcess[str]:
    """``switchboard ledger verify`` against this test's database."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SWITCHBOARD_")}
    env.update(SWITCHBOARD_DATABASE_URL=database_url, COLUMNS="250")
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "switchboard.cli", "ledger", "verify"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


async def timed(figures: dict[str, Any], name: str, work: Awaitable[Any]) -> Any:
    """Await ``work`` and store its duration in ``figures[name]`` (seconds)."""
    started = time.monotonic()
    try:
        return await work
    finally:
        figures[name] = round(time.monotonic() - started, 1)


async def cancel(task: asyncio.Task[None]) -> None:
    """Cancel ``task`` if it is still running and wait for it."""
    if not task.done():
        task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def print_figures(figures: dict[str, Any]) -> str:
    """Print every figure, one per line; return the lines."""
    width = max(len(name) for name in figures)
    text = "\n".join(f"  {name.ljust(width)}  {value}" for name, value in figures.items())
    log("figures:\n" + text)
    return text


# --- the test ------------------------------------------------------------------------------------


@pytest.fixture
def kafka() -> Iterator[EmbeddedKafka]:
    """A broker of this test's own (it is SIGKILLed and started again, empty, mid-run)."""
    broker = EmbeddedKafka(free_port())
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture
async def own_pool(settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    """A pool big enough for 1,000 concurrent calls queueing for it, the relay and the checks."""
    created = await asyncpg.create_pool(settings.require_database_url(), min_size=2, max_size=30)
    assert created is not None
    yield created
    await created.close()


@pytest.mark.timeout(600)
async def test_money_chaos_never_charges_twice_and_the_ledger_verifies(
    own_pool: asyncpg.Pool,
    settings: Settings,
    tenant: TenantCredentials,
    key_ring: MasterKeyRing,
    tmp_path: Path,
    kafka: EmbeddedKafka,
    report_figures: Callable[[str, str], None],
) -> None:
    pool = own_pool
    seed = int(os.environ.get("MONEY_CHAOS_SEED") or random.SystemRandom().randrange(2**32))
    log(f"MONEY_CHAOS_SEED={seed} (set it to replay this run's plan)")
    rng = random.Random(seed)
    fault_rng, kill_rng, traffic_rng, tamper_rng = (random.Random(rng.getrandbits(64)) for _ in range(4))
    figures: dict[str, Any] = {"seed": seed}
    started = time.monotonic()

    stripe = ChaosStripe(STRIPE_KEY, fault_rng)
    env = gateway_env(
        settings, SWITCHBOARD_KAFKA_PARTITIONS=str(settings.kafka_partitions), **WORKER_SETTINGS
    )
    worker = WorkerProcess(env, tmp_path)
    kills: list[Kill] = []
    calls = Calls()
    same_key = create_request(
        request_id=f"money-chaos-{seed}-same-key",
        amount_minor=4242,
        currency="EUR",
        metadata=dict([SAME_KEY_MARK]),
    )
    distinct = distinct_requests(traffic_rng, seed)
    lose = [traffic_rng.random() < SHORT_DEADLINE_SHARE for _ in range(SAME_KEY_CALLS + SAME_KEY_RETRIES)]
    lose_distinct = [traffic_rng.random() < 3 * SHORT_DEADLINE_SHARE for _ in range(DISTINCT_PAYMENTS)]
    wave_gaps = [traffic_rng.uniform(1.0, 3.0) for _ in range(WAVES)]
    broker_wave = kill_rng.randint(*BROKER_KILL_WAVES)
    broker_down_s = kill_rng.uniform(*BROKER_DOWN_S)
    broker_kill = BrokerKill()
    rescued: list[uuid.UUID] = []
    relay_settings = settings.model_copy(
        update={"payment_sweep_after_s": PAYMENT_SWEEP_AFTER_S, "relay_sweep_interval_s": 1.0}
    )
    async with contextlib.AsyncExitStack() as stack:
        await stripe.start()
        stack.push_async_callback(stripe.stop)
        await use_stripe(pool, key_ring, tenant.tenant_id, stripe)
        gateway: Gateway = await start_gateway(pool, settings, key_ring, "127.0.0.1:0")
        stack.push_async_callback(gateway.stop, 1.0)
        relay = OutboxRelay(pool, relay_settings)
        relaying = asyncio.create_task(relay.run())

        async def stop_relay() -> None:
            relay.stop()
            await relaying

        stack.push_async_callback(stop_relay)
        worker.start()
        stack.callback(worker.kill_leftover)
        channels = await stack.enter_async_context(open_channels(gateway.port))
        monkey = asyncio.create_task(run_monkey(worker, stripe, kill_rng, started, kills))
        stack.push_async_callback(cancel, monkey)

        async def phase_a() -> None:
            for first, last in ((0, SAME_KEY_CALLS), (SAME_KEY_CALLS, SAME_KEY_CALLS + SAME_KEY_RETRIES)):
                await asyncio.gather(
                    *(
                        calls.create(channels.stub(), same_key, tenant.metadata, lose_first_answer=lose[i])
                        for i in range(first, last)
                    )
                )

        async def phase_b() -> None:
            per_wave = DISTINCT_PAYMENTS // WAVES
            for wave, gap in enumerate(wave_gaps):
                if wave == broker_wave:  # the broker dies with this wave's commands on their way
                    killing = asyncio.create_task(
                        kill_broker(kafka, broker_down_s, started, relay, broker_kill)
                    )
                    stack.push_async_callback(cancel, killing)
                numbered = list(enumerate(distinct))[wave * per_wave : (wave + 1) * per_wave]
                await asyncio.gather(
                    *(
                        calls.create(
                            channels.stub(),
                            request,
                            tenant.metadata,
                            lose_first_answer=copy == 0 and lose_distinct[n],
                        )
                        for n, request in numbered
                        for copy in range(COPIES)
                    )
                )
                await asyncio.sleep(gap)  # traffic pacing: money keeps moving while the monkey kills

        await timed(figures, "phase A s (1,500 same-key calls)", phase_a())
        log(f"phase A done: {dict(calls.codes)}")
        await timed(figures, "phase B s (300 calls, 100 payments)", phase_b())
        log(f"phase B done: {dict(calls.codes)}")
        await asyncio.wait_for(asyncio.shield(monkey), 120)
        await wait_for(lambda: _broker_back(broker_kill), timeout_s=60)
        last_kill = kills[-1].reaped_at if kills else None
        await timed(
            figures, "wait for final statuses s", wait_until_final(pool, tenant.tenant_id, last_kill, rescued)
        )
        worker_exit = await worker.stop()

    # --- the records ---
    payments = await pool.fetch(
        """SELECT id, request_id, status, amount_minor, currency, amount_captured_minor, processor_reference,
                  failure_code
             FROM payments WHERE tenant_id = $1""",
        tenant.tenant_id,
    )
    by_request: dict[str, list[asyncpg.Record]] = defaultdict(list)
    for row in payments:
        by_request[row["request_id"]].append(row)
    (same_row,) = by_request[same_key.request_id]  # exactly one payment for the 1,500 calls
    statuses = Counter(row["status"] for row in payments)
    charges = stripe.charges_by_payment()
    causes = Counter(
        r["cause"]
        for r in await pool.fetch(
            "SELECT cause FROM payment_transitions WHERE tenant_id = $1", tenant.tenant_id
        )
    )
    attempts = await pool.fetchrow(
        """SELECT count(*) AS n, coalesce(sum(sends), 0) AS sends, coalesce(sum(lookups), 0) AS lookups
             FROM payment_attempts WHERE tenant_id = $1""",
        tenant.tenant_id,
    )
    assert attempts is not None
    unbalanced = await pool.fetch(
        """SELECT journal_id, currency, sum(amount_minor) AS total FROM ledger_postings
            WHERE tenant_id = $1 GROUP BY journal_id, currency HAVING sum(amount_minor) <> 0""",
        tenant.tenant_id,
    )
    journals = await pool.fetch(
        "SELECT id, payment_id, kind FROM ledger_journals WHERE tenant_id = $1 ORDER BY seq", tenant.tenant_id
    )
    balances = {
        (b.account, b.currency): b.balance_minor for b in await account_balances(pool, tenant.tenant_id)
    }
    captured_at_stripe: Counter[str] = Counter()
    for charge in stripe.captured_charges():
        captured_at_stripe[str(charge["currency"]).upper()] += int(charge["amount_captured"])
    clearing = {
        cur: amount for (account, cur), amount in balances.items() if account == "processor_clearing:stripe"
    }
    verified = await verify_chain(pool, tenant.tenant_id)
    cli_ok = await ledger_verify_cli(settings.require_database_url())

    # --- one posting altered directly in the database ---
    target = tamper_rng.choice(journals)
    altered = await tamper(
        pool,
        "UPDATE ledger_postings SET amount_minor = amount_minor + 1 WHERE journal_id = $1 AND line_no = 2",
        target["id"],
    )
    broken_result = await verify_chain(pool, tenant.tenant_id)
    cli_broken = await ledger_verify_cli(settings.require_database_url())

    figures.update(
        {
            "CreatePayment calls sent": calls.sent,
            "  of them with a 2 ms deadline (answer lost, retried)": calls.short_deadline,
            "answers by code": dict(sorted(calls.codes.items())),
            "request_ids": len(calls.ids),
            "distinct payment ids answered (all request_ids)": len(set().union(*calls.ids.values())),
            "same-key OK answers": sum(calls.answered_statuses[same_key.request_id].values()),
            "same-key distinct payment ids answered": len(calls.ids[same_key.request_id]),
            "same-key payment rows": len(by_request[same_key.request_id]),
            "payment rows": len(payments),
            "payment statuses": dict(sorted(statuses.items())),
            "declining cards among them": sum(r.payment_method == DECLINING_TOKEN for r in distinct),
            "FAILED payments by failure code": dict(
                sorted(Counter(r["failure_code"] for r in payments if r["status"] == "failed").items())
            ),
            "charge requests at Stripe": stripe.charge_requests,
            "faults injected": dict(sorted(stripe.injected.items())),
            "idempotent replays at Stripe": len(stripe.replays),
            "charges recorded at Stripe": len(stripe.charges),
            "captured charges at Stripe": len(stripe.captured_charges()),
            "payments with >1 charge": sum(1 for found in charges.values() if len(found) > 1),
            "same-key payment: status, charges at Stripe": (
                same_row["status"],
                len(charges.get(str(same_row["id"]), [])),
            ),
            "  faults planned for its sends (spared: before the charge)": dict(
                sorted(stripe.same_key_faults.items())
            ),
            "broker SIGKILL (at s, down s, outbox rows published before)": (
                round(broker_kill.at_s, 1),
                round(broker_kill.downtime_s, 1),
                broker_kill.published_before,
            ),
            "payment commands swept back (lost with the broker, or held back)": relay.swept_payment_commands,
            "worker SIGKILLs": len(kills),
            "kills (at s, down s, charges in flight, charge requests so far)": [
                (round(k.at_s, 1), round(k.downtime_s, 1), k.in_flight, k.charge_requests) for k in kills
            ],
            "worker starts": worker.starts,
            "worker exit code on SIGTERM": worker_exit,
            "attempts / sends / lookups scheduled": (attempts["n"], attempts["sends"], attempts["lookups"]),
            "UNKNOWN (attempt_unknown)": causes["attempt_unknown"],
            "UNKNOWN resolved: succeeded / failed": (causes["resolved_succeeded"], causes["resolved_failed"]),
            "Stripe searches / lists (lookups)": (
                stripe.reads("/v1/payment_intents/search"),
                stripe.reads("/v1/payment_intents"),
            ),
            "janitor leases of killed workers expired early": len(rescued),
            "transitions by cause": dict(sorted(causes.items())),
            "journals": len(journals),
            "unbalanced journals": len(unbalanced),
            "processor_clearing:stripe by currency": dict(sorted(clearing.items())),
            "captured at Stripe by currency": dict(sorted(captured_at_stripe.items())),
            "verify_chain": "OK" if verified.ok else f"BROKEN {verified.broken}",
            "switchboard ledger verify exit": cli_ok.returncode,
            "altered posting of journal": str(target["id"]),
            "verify_chain after the change": [
                (str(b.journal_id), b.sequence, [r.value for r in b.reasons]) for b in broken_result.broken
            ],
            "switchboard ledger verify exit after the change": cli_broken.returncode,
            "total s": round(time.monotonic() - started, 1),
            "worker logs": str(tmp_path),
        }
    )
    report_figures("money chaos", print_figures(figures))

    # --- the guarantees ---
    assert len(kills) == KILLS
    assert worker_exit == 0
    assert set(calls.codes) <= {"OK", "ABORTED", "UNAVAILABLE", "DEADLINE_EXCEEDED"}, calls.codes
    assert calls.codes["DEADLINE_EXCEEDED"] <= calls.short_deadline
    # Idempotency: one payment per request_id, and every OK answer names it.
    expected_requests = {same_key.request_id} | {r.request_id for r in distinct}
    assert set(calls.ids) == expected_requests
    assert set(by_request) == expected_requests
    for request_id, rows in by_request.items():
        assert len(rows) == 1, (request_id, rows)
        assert calls.ids[request_id] == {str(rows[0]["id"])}, request_id
    assert sum(calls.answered_statuses[same_key.request_id].values()) == SAME_KEY_CALLS + SAME_KEY_RETRIES
    # The same-key payment: charged, exactly once, for its amount.
    assert same_row["status"] == "succeeded", same_row
    (same_charge,) = charges[str(same_row["id"])]
    assert same_charge["captured"]
    assert same_charge["amount_captured"] == 4242
    assert same_charge["payment_intent"] == same_row["processor_reference"]
    # The broker was killed mid-run, came back empty, and nothing was lost.
    assert broker_kill.at_s > 0
    assert broker_kill.downtime_s > 0
    # The first answer is replayed, even after the payment moved on.
    assert set(calls.answered_statuses[same_key.request_id]) == {"PAYMENT_STATUS_REQUIRES_PROCESSING"}
    # Money: at most one charge per payment; exactly one per SUCCEEDED payment, none per FAILED one.
    assert set(statuses) <= set(FINAL), statuses
    known = {str(row["id"]) for row in payments}
    assert set(charges) <= known, set(charges) - known
    for row in payments:
        found = charges.get(str(row["id"]), [])
        if row["status"] == "succeeded":
            assert len(found) == 1, (row, found)
            (charge,) = found
            assert charge["captured"]
            assert charge["amount_captured"] == row["amount_minor"] == row["amount_captured_minor"]
            assert str(charge["currency"]).upper() == row["currency"]
            assert charge["payment_intent"] == row["processor_reference"]
        else:
            assert found == [], (row, found)
    assert len(stripe.charges) == len(stripe.captured_charges()) == statuses["succeeded"]
    declined = {r.request_id for r in distinct if r.payment_method == DECLINING_TOKEN}
    assert all(by_request[request_id][0]["status"] == "failed" for request_id in declined)
    assert stripe.injected["lost_response"] >= 1  # the chaos happened
    # Every UNKNOWN was resolved, by the janitor's lookup (no webhooks here).
    assert causes["attempt_unknown"] >= 1
    assert causes["resolved_succeeded"] + causes["resolved_failed"] == causes["attempt_unknown"]
    # Ledger: one capture journal per SUCCEEDED payment, every journal balanced, clearing = Stripe.
    assert len(journals) == statuses["succeeded"]
    succeeded_ids = {row["id"] for row in payments if row["status"] == "succeeded"}
    assert {j["payment_id"] for j in journals} == succeeded_ids
    assert unbalanced == []
    assert clearing == dict(captured_at_stripe)
    for currency, amount in captured_at_stripe.items():
        assert balances[("merchant_balance", currency)] == -amount
        assert balances.get(("customer_receivable", currency), 0) == 0
    assert verified.ok, verified
    assert cli_ok.returncode == 0, cli_ok.stdout + cli_ok.stderr
    assert f"{len(journals)} journal(s)" in cli_ok.stdout
    # A posting altered in the database is found, and exactly its journal is named.
    assert altered == "UPDATE 1"
    assert not broken_result.ok
    (broken,) = broken_result.broken
    assert broken.journal_id == target["id"]
    assert broken.reasons == (BreakReason.POSTING_ALTERED, BreakReason.UNBALANCED)
    assert cli_broken.returncode == 1, cli_broken.stdout + cli_broken.stderr
    assert f"journal {target['id']}" in cli_broken.stdout
    assert "posting_altered" in cli_broken.stdout
