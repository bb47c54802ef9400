"""The client side of the crash-and-fault suite (tests/test_chaos.py).

- :class:`Driver`: starts ``python -m tests.chaos_harness driver`` (which owns
  every process of the stack, see tests/chaos_harness.py) and talks to it in
  JSON lines.
- :func:`create_tenants`: tenants through TenantAdminService, each with its own
  SMTP, Twilio and FCM configuration pointing at its own fakes.
- :class:`TrafficClient`: sends the planned notifications (single calls and
  batches) at a steady pace, retrying UNAVAILABLE / DEADLINE_EXCEEDED with the
  same request_id until ACCEPTED, for at most 100 tries or 120 s per request.
- :func:`analyze`: PostgreSQL and the providers' journal compared with what the
  client was told: final states, lost, duplicates and their likely causes,
  anything delivered that was never ACCEPTED.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import sys
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncpg
import grpc

from switchboard.notify.v1 import notify_pb2, notify_pb2_grpc
from switchboard.tenants.v1 import tenants_pb2, tenants_pb2_grpc
from tests.chaos_harness import (
    ADMIN_TOKEN,
    CHANNELS,
    MARKER_PREFIX,
    PUSH_MARKER_KEY,
    REPO_ROOT,
    WORKERS,
    FakesSpec,
    PlannedKill,
)

if TYPE_CHECKING:
    NotifyStub = notify_pb2_grpc.NotificationServiceAsyncStub
    AdminStub = tenants_pb2_grpc.TenantAdminServiceAsyncStub

CHANNEL_ENUM = {
    "email": notify_pb2.CHANNEL_EMAIL,
    "sms": notify_pb2.CHANNEL_SMS,
    "push": notify_pb2.CHANNEL_PUSH,
}
CHANNEL_BY_ENUM = {v: k for k, v in CHANNEL_ENUM.items()}
#: gRPC codes after which the client retries with the same request_id.
RETRYABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
#: google.rpc.Code number -> grpc.StatusCode (whose values are (number, name) pairs).
STATUS_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


# -- the driver ----------------------------------------------------------------------------


class DriverError(Exception):
    """The driver reported an error or went away."""


class Driver:
    """The ``tests.chaos_harness driver`` process and its JSON-lines events."""

    def __init__(
        self, root: Path, spec_path: Path, on_event: Callable[[dict[str, Any]], None] | None = None
    ) -> None:
        self._root = root
        self._on_event = on_event
        self._spec_path = spec_path
        self._process: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()
        self.events: list[dict[str, Any]] = []
        self.log_path = root / "driver.log"

    async def start(self, timeout_s: float) -> dict[str, Any]:
        """Start the driver; return its ``ready`` event (addresses of the running stack)."""
        self._root.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            # No preexec_fn: the test process uses gRPC, so it only vforks + execs.
            self._process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "tests.chaos_harness",
                "driver",
                "--root",
                str(self._root),
                "--spec",
                str(self._spec_path),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=log,
                cwd=REPO_ROOT,
                start_new_session=True,
            )
        self._reader = asyncio.create_task(self._read())
        return await self.wait_for("ready", timeout_s)

    @property
    def pid(self) -> int | None:
        """The driver's pid (also its session id) once started."""
        return self._process.pid if self._process is not None else None

    async def _read(self) -> None:
        assert self._process is not None
        assert self._process.stdout is not None
        while line := await self._process.stdout.readline():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            self.events.append(event)
            if self._on_event is not None:
                self._on_event(event)
            self._changed.set()
        self.events.append({"event": "eof"})
        self._changed.set()

    async def wait_for(self, event: str, timeout_s: float, *, fail_on_error: bool = True) -> dict[str, Any]:
        """The first ``event``; raises :class:`DriverError` on an earlier ``error`` event
        (unless ``fail_on_error`` is false) or if the driver exits first, ``TimeoutError``
        after ``timeout_s``."""
        async with asyncio.timeout(timeout_s):
            while True:
                for item in self.events:
                    if item["event"] == event:
                        return item
                    if item["event"] == "error" and fail_on_error:
                        raise DriverError(item["message"])
                    if item["event"] == "eof":
                        raise DriverError(f"the driver exited; see {self.log_path}")
                self._changed.clear()
                await self._changed.wait()

    async def send(self, **command: Any) -> None:
        """Send one command (``cmd=...``)."""
        assert self._process is not None
        assert self._process.stdin is not None
        self._process.stdin.write((json.dumps(command) + "\n").encode())
        await self._process.stdin.drain()

    async def stop(self, timeout_s: float = 120.0) -> dict[str, Any] | None:
        """Shut the stack down; return the ``stopped`` event (per-component stats, leftovers)."""
        process = self._process
        if process is None:
            return None
        stopped: dict[str, Any] | None = None
        with contextlib.suppress(Exception):
            await self.send(cmd="shutdown")
        try:
            stopped = await self.wait_for("stopped", timeout_s, fail_on_error=False)
        except (DriverError, TimeoutError):
            stopped = None
        finally:
            if process.stdin is not None:
                process.stdin.close()
            try:
                await asyncio.wait_for(process.wait(), 30)
            except TimeoutError:
                process.kill()
                await process.wait()
            if self._reader is not None:
                self._reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._reader
        return stopped

    def kill_events(self) -> list[KillEvent]:
        """Executed kills (paired with their restarts)."""
        kills: list[KillEvent] = []
        for item in self.events:
            if item["event"] == "kill":
                kills.append(KillEvent(item["component"], item["t"], 0.0, item["downtime_s"]))
            elif item["event"] == "restart":
                for kill in reversed(kills):
                    if kill.component == item["component"] and not kill.restarted_at:
                        kill.restarted_at = item["t"]
                        break
        return kills

    def exits(self) -> list[tuple[float, str, int]]:
        """(time, component, exit code) of every exit the supervisor saw."""
        return [(e["t"], e["component"], e["code"]) for e in self.events if e["event"] == "exited"]


@dataclass
class KillEvent:
    """One executed kill (wall-clock times)."""

    component: str
    killed_at: float
    restarted_at: float
    downtime_s: float


# -- tenants -------------------------------------------------------------------------------


@dataclass
class TenantAccess:
    """A tenant created through the admin API, with its API key."""

    name: str
    tenant_id: str
    api_key: str

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """gRPC metadata authenticating as this tenant."""
        return (("authorization", f"Bearer {self.api_key}"),)


async def create_tenants(grpc_addr: str, spec: FakesSpec) -> list[TenantAccess]:
    """Through TenantAdminService: each tenant with its own SMTP, Twilio and FCM configuration."""
    operator = (("authorization", f"Bearer {ADMIN_TOKEN}"),)
    created = []
    async with grpc.aio.insecure_channel(grpc_addr) as channel:
        admin: AdminStub = tenants_pb2_grpc.TenantAdminServiceStub(channel)
        for fakes in spec.tenants:
            reply = await admin.CreateTenant(
                tenants_pb2.CreateTenantRequest(
                    request_id=str(uuid.uuid4()), name=fakes.name, display_name=f"Chaos {fakes.name}"
                ),
                metadata=operator,
                wait_for_ready=True,
                timeout=30,
            )
            tenant_id = reply.tenant.tenant_id
            configs = [
                (
                    notify_pb2.CHANNEL_EMAIL,
                    tenants_pb2.ProviderConfig(
                        smtp=tenants_pb2.SmtpConfig(
                            host="127.0.0.1",
                            port=fakes.smtp_port,
                            tls_mode=tenants_pb2.SMTP_TLS_MODE_NONE,
                            from_address=f"Chaos {fakes.name} <no-reply@{fakes.name}.example>",
                        )
                    ),
                ),
                (
                    notify_pb2.CHANNEL_SMS,
                    tenants_pb2.ProviderConfig(
                        twilio=tenants_pb2.TwilioConfig(
                            account_sid=fakes.twilio_account_sid,
                            auth_token=fakes.twilio_auth_token,
                            from_number="+15005550006",
                            base_url=f"http://127.0.0.1:{fakes.twilio_port}",
                        )
                    ),
                ),
                (
                    notify_pb2.CHANNEL_PUSH,
                    tenants_pb2.ProviderConfig(
                        fcm=tenants_pb2.FcmConfig(
                            service_account_json=json.dumps(fakes.service_account),
                            endpoint_base=spec.fcm_base_url,
                        )
                    ),
                ),
            ]
            for channel_value, config in configs:
                await admin.SetProviderConfig(
                    tenants_pb2.SetProviderConfigRequest(
                        request_id=str(uuid.uuid4()),
                        tenant_id=tenant_id,
                        channel=channel_value,
                        config=config,
                    ),
                    metadata=operator,
                    timeout=30,
                )
            key = await admin.CreateApiKey(
                tenants_pb2.CreateApiKeyRequest(request_id=str(uuid.uuid4()), tenant_id=tenant_id),
                metadata=operator,
                timeout=30,
            )
            created.append(TenantAccess(fakes.name, tenant_id, key.secret))
    return created


# -- the traffic ---------------------------------------------------------------------------


@dataclass(frozen=True)
class PlannedNotification:
    """One notification the client will send; its request_id is also its marker."""

    request_id: str
    tenant: int
    channels: tuple[str, ...]
    valid: bool
    number: int

    def request(self) -> notify_pb2.SendNotificationRequest:
        """The SendNotificationRequest; an invalid one has a key FCM reserves in push.data."""
        marker = MARKER_PREFIX + self.request_id
        data = {PUSH_MARKER_KEY: self.request_id}
        if not self.valid:
            data["from"] = "reserved by FCM"  # INVALID_ARGUMENT: push.data["from"]
        return notify_pb2.SendNotificationRequest(
            request_id=self.request_id,
            channels=[CHANNEL_ENUM[c] for c in self.channels],
            recipient=notify_pb2.Recipient(
                email=f"user{self.number}@example.com",
                phone_number="+14155550123",
                fcm_token=f"tok:chaos-{self.number}",
            ),
            email=notify_pb2.EmailContent(subject=marker, text=f"notification {self.number}"),
            sms=notify_pb2.SmsContent(text=marker),
            push=notify_pb2.PushContent(title="chaos", body=f"notification {self.number}", data=data),
            metadata={"chaos": "1"},
        )


#: (channels, weight): the notifications' channel mix.
CHANNEL_MIX: list[tuple[tuple[str, ...], int]] = [
    (("email", "sms", "push"), 10),
    (("email",), 2),
    (("sms",), 2),
    (("push",), 2),
    (("email", "sms"), 1),
    (("email", "push"), 1),
    (("sms", "push"), 1),
]


def plan_traffic(
    rng: random.Random, notifications: int, tenants: int, invalid_share: float = 0.01
) -> list[list[PlannedNotification]]:
    """Units of work (one single call, or one batch of 5-30) over ``tenants``:
    ``notifications`` valid ones, plus about ``invalid_share`` as many invalid ones mixed in."""
    mixes = [m for m, _ in CHANNEL_MIX]
    weights = [w for _, w in CHANNEL_MIX]
    units: list[list[PlannedNotification]] = []
    valid = number = 0
    while valid < notifications:
        tenant = rng.randrange(tenants)
        size = 1 if rng.random() < 0.5 else min(rng.randint(5, 30), notifications - valid)
        unit = []
        for _ in range(size):
            number += 1
            is_valid = rng.random() >= invalid_share
            channels = rng.choices(mixes, weights)[0] if is_valid else ("sms", "push")
            request_id = str(uuid.UUID(int=rng.getrandbits(128)))
            unit.append(PlannedNotification(request_id, tenant, channels, is_valid, number))
            valid += is_valid
        units.append(unit)
    return units


@dataclass
class Accepted:
    """An ACCEPTED notification: whose, its id, its delivery per channel, after how many tries."""

    tenant: str
    notification_id: str
    deliveries: dict[str, str]
    tries: int


@dataclass
class ClientRecord:
    """What the client was told."""

    accepted: dict[str, Accepted] = field(default_factory=dict)
    #: request_id -> why it never got ACCEPTED (status code, or "gave up after N tries").
    not_accepted: dict[str, str] = field(default_factory=dict)
    expected_invalid: set[str] = field(default_factory=set)
    rpcs: int = 0
    single_calls: int = 0
    batch_calls: int = 0
    retries: int = 0
    failed_attempts: Counter[str] = field(default_factory=Counter)
    accepted_after_retry: int = 0


class TrafficClient:
    """Sends the planned units at a steady pace with bounded concurrency; see the module docstring."""

    def __init__(
        self,
        grpc_addr: str,
        tenants: list[TenantAccess],
        units: list[list[PlannedNotification]],
        *,
        send_s: float,
        rng: random.Random,
        max_in_flight: int = 48,
        attempt_timeout_s: float = 5.0,
        max_tries: int = 100,
        give_up_after_s: float = 120.0,
    ) -> None:
        self._addr = grpc_addr
        self._tenants = tenants
        self._units = units
        self._send_s = send_s
        self._rng = rng
        self._max_in_flight = max_in_flight
        self._attempt_timeout_s = attempt_timeout_s
        self._max_tries = max_tries
        self._give_up_after_s = give_up_after_s
        self.record = ClientRecord()
        for unit in units:
            self.record.expected_invalid.update(n.request_id for n in unit if not n.valid)

    async def run(self) -> ClientRecord:
        """Send every unit; return the record."""
        options = [
            # Reconnect quickly after a gateway restart (gRPC's default backoff grows to 120 s).
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000),
        ]
        loop = asyncio.get_running_loop()
        async with grpc.aio.insecure_channel(self._addr, options=options) as channel:
            stub: NotifyStub = notify_pb2_grpc.NotificationServiceStub(channel)
            gate = asyncio.Semaphore(self._max_in_flight)
            interval = self._send_s / max(1, len(self._units))
            start = loop.time()
            async with asyncio.TaskGroup() as group:
                for index, unit in enumerate(self._units):
                    await asyncio.sleep(max(0.0, start + index * interval - loop.time()))
                    await gate.acquire()
                    task = group.create_task(self._send_unit(stub, unit))
                    task.add_done_callback(lambda _task: gate.release())
        return self.record

    async def _call(
        self,
        stub: NotifyStub,
        tenant: TenantAccess,
        requests: list[notify_pb2.SendNotificationRequest],
        single: bool,
    ) -> list[notify_pb2.SendNotificationResponse | str]:
        """One attempt: the outcome per request (a response, or why that item was refused)."""
        self.record.rpcs += 1
        if single:
            self.record.single_calls += 1
            reply = await stub.SendNotification(
                requests[0], metadata=tenant.metadata, timeout=self._attempt_timeout_s
            )
            return [reply]
        self.record.batch_calls += 1
        batch = await stub.SendNotificationBatch(
            notify_pb2.SendNotificationBatchRequest(requests=requests),
            metadata=tenant.metadata,
            timeout=self._attempt_timeout_s,
        )
        return [
            r.response if r.HasField("response") else f"item {STATUS_BY_NUMBER[r.error.code].name}"
            for r in batch.results
        ]

    async def _send_unit(self, stub: NotifyStub, unit: list[PlannedNotification]) -> None:
        tenant = self._tenants[unit[0].tenant]
        requests = [n.request() for n in unit]
        single = len(unit) == 1 and self._rng.random() < 0.9  # a few 1-item batches too
        tries = 0
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + self._give_up_after_s
        while True:
            tries += 1
            try:
                outcomes = await self._call(stub, tenant, requests, single)
            except grpc.aio.AioRpcError as error:
                code = error.code()
                self.record.failed_attempts[code.name] += 1
                if code in RETRYABLE_CODES and tries < self._max_tries and loop.time() < give_up_at:
                    self.record.retries += 1
                    await asyncio.sleep(min(1.0, 0.05 * 2**tries) * self._rng.uniform(0.5, 1.5))
                    continue
                reason = code.name if code not in RETRYABLE_CODES else f"gave up after {tries} tries"
                for item in unit:
                    self.record.not_accepted[item.request_id] = reason
                return
            for item, outcome in zip(unit, outcomes, strict=True):
                if isinstance(outcome, str):
                    self.record.not_accepted[item.request_id] = outcome
                    continue
                self.record.accepted[item.request_id] = Accepted(
                    tenant=tenant.name,
                    notification_id=outcome.notification_id,
                    deliveries={CHANNEL_BY_ENUM[d.channel]: d.delivery_id for d in outcome.deliveries},
                    tries=tries,
                )
                self.record.accepted_after_retry += tries > 1
            return


# -- the verdict ---------------------------------------------------------------------------


@dataclass
class Duplicate:
    """A delivery a provider received more than once."""

    request_id: str
    channel: str
    delivery_id: str
    received: int
    attempts: int
    unfinished_attempts: int
    cause: str


@dataclass
class Report:
    """The figures of one chaos run (also written as JSON)."""

    seed: int
    elapsed_s: float = 0.0
    startup_s: float = 0.0
    send_s: float = 0.0
    drain_s: float = 0.0
    sweep_after_s: float = 0.0
    planned_notifications: int = 0
    accepted_notifications: int = 0
    accepted_deliveries: int = 0
    accepted_after_retry: int = 0
    not_accepted: dict[str, int] = field(default_factory=dict)
    rpcs: int = 0
    single_calls: int = 0
    batch_calls: int = 0
    retries: int = 0
    failed_attempts: dict[str, int] = field(default_factory=dict)
    final: int = 0
    not_final: int = 0
    delivered: int = 0
    failed: int = 0
    attempts_total: int = 0
    received_messages: int = 0
    received_deliveries: int = 0
    lost: int = 0
    lost_examples: list[str] = field(default_factory=list)
    duplicates: int = 0
    duplicate_deliveries: int = 0
    duplicate_causes: dict[str, int] = field(default_factory=dict)
    duplicate_bound: int = 0
    duplicate_examples: list[dict[str, Any]] = field(default_factory=list)
    unaccepted_delivered: int = 0
    unaccepted_delivered_examples: list[str] = field(default_factory=list)
    #: Committed notifications the client never saw ACCEPTED for, by :func:`unaccepted_commits` kind.
    committed_but_not_accepted: int = 0
    committed_after_giving_up: int = 0
    committed_after_refusal: int = 0
    committed_never_sent: int = 0
    committed_not_accepted_examples: list[str] = field(default_factory=list)
    idempotency_violations: int = 0
    wrong_tenant: int = 0
    wrong_delivery_id: int = 0
    republished_rows: int = 0
    kills: dict[str, int] = field(default_factory=dict)
    kill_events: list[dict[str, Any]] = field(default_factory=list)
    exits_on_their_own: dict[str, list[int]] = field(default_factory=dict)
    leftover_processes: list[str] = field(default_factory=list)
    log_dir: str = ""

    def summary(self) -> str:
        """The figures, human-readable."""
        return "\n".join(
            [
                f"seed {self.seed}: {self.elapsed_s:.1f} s in all (start-up {self.startup_s:.1f} s, "
                f"sending {self.send_s:.1f} s, draining {self.drain_s:.1f} s; sweep after "
                f"{self.sweep_after_s:g} s)",
                f"client: {self.planned_notifications} notifications planned, "
                f"{self.accepted_notifications} ACCEPTED ({self.accepted_after_retry} after a retry); "
                f"not accepted {self.not_accepted}; {self.rpcs} RPCs ({self.single_calls} single, "
                f"{self.batch_calls} batch), {self.retries} retries; failed attempts {self.failed_attempts}",
                f"deliveries: {self.accepted_deliveries} accepted, {self.final} final "
                f"({self.delivered} DELIVERED, {self.failed} FAILED), {self.not_final} not final; "
                f"{self.attempts_total} attempts; {self.republished_rows} extra outbox rows "
                "(sweeper re-publications and retries)",
                f"providers: {self.received_messages} messages for {self.received_deliveries} deliveries; "
                f"LOST {self.lost}; DUPLICATES {self.duplicates} in {self.duplicate_deliveries} deliveries "
                f"(bound {self.duplicate_bound}): {self.duplicate_causes}",
                f"delivered but never ACCEPTED {self.unaccepted_delivered}; committed but never ACCEPTED "
                f"{self.committed_but_not_accepted} (after the client gave up "
                f"{self.committed_after_giving_up}, after a refusal {self.committed_after_refusal}, "
                f"never sent {self.committed_never_sent}); request_id processed twice "
                f"{self.idempotency_violations}; to the wrong tenant's provider {self.wrong_tenant}; "
                f"wrong delivery id {self.wrong_delivery_id}",
                f"kills {self.kills} ({sum(self.kills.values())} in all); exits on their own "
                f"{self.exits_on_their_own}; leftover processes {len(self.leftover_processes)}",
            ]
        )


#: Why a committed notification's request_id never got ACCEPTED (see :func:`unaccepted_commits`).
GAVE_UP, REFUSED, NEVER_SENT = "gave up", "refused", "never sent"


def unaccepted_commits(committed: list[str], record: ClientRecord) -> dict[str, str]:
    """The committed request_ids the client never saw ACCEPTED for, each with its kind.

    What a commit without an ACCEPTED means depends on the last answer the client got:

    - :data:`GAVE_UP`: the client's last attempt ended UNAVAILABLE or DEADLINE_EXCEEDED
      (the gateway died, or the answer came too late) and it stopped retrying. Such an
      answer says nothing about the outcome: the request may have committed just before
      the answer was lost. Legitimate; the client learns the outcome by retrying with
      the same request_id (docs/idempotency.md), and the notification is delivered.
    - :data:`REFUSED`: the client was told a definitive error (INVALID_ARGUMENT, ...).
      A commit then breaks the guarantee: nothing the client did not get ACCEPTED for
      is delivered, unless the client was left not knowing.
    - :data:`NEVER_SENT`: a request_id this client never sent; always a fault.
    """
    kinds = {}
    for request_id in committed:
        if request_id in record.accepted:
            continue
        reason = record.not_accepted.get(request_id)
        if reason is None:
            kinds[request_id] = NEVER_SENT
        elif reason.startswith("gave up"):
            kinds[request_id] = GAVE_UP
        else:
            kinds[request_id] = REFUSED
    return kinds


def duplicate_bound(kills: dict[str, int], exits: dict[str, list[int]], tenants: int) -> int:
    """The most duplicate sends the documented window allows.

    A duplicate needs a send the provider accepted whose DELIVERED was never
    recorded: the worker died (SIGKILL, or an exit of its own) or PostgreSQL
    went away between the provider's answer and the commit. A channel worker
    sends one delivery at a time per lane, and lanes are (partition, tenant
    key): at most ``tenants`` sends in flight per worker. A PostgreSQL kill can
    catch all three workers at once.
    """
    worker_deaths = sum(kills.get(w, 0) + len(exits.get(w, [])) for w in WORKERS)
    return (worker_deaths + len(CHANNELS) * kills.get("postgres", 0)) * tenants


def classify_duplicate(
    channel: str, first_t: float, last_t: float, kills: list[KillEvent], exits: list[tuple[float, str, int]]
) -> str:
    """The likely cause of a duplicate first received at ``first_t`` and again at ``last_t``:
    the first death, between the two, of the channel's worker or of PostgreSQL."""
    deaths = sorted([(k.killed_at, k.component) for k in kills] + [(t, c) for t, c, _ in exits])
    nearby = [(t, c) for t, c in deaths if first_t - 1.0 <= t <= last_t]
    for _, component in nearby:
        if component == f"worker-{channel}":
            return f"worker-{channel} died between provider acceptance and recording (at-least-once window)"
        if component == "postgres":
            return "PostgreSQL died between provider acceptance and recording (outcome lost, redelivered)"
    if nearby:
        return "unexplained, near the death of " + ", ".join(sorted({c for _, c in nearby}))
    return "unexplained"


async def wait_until_final(
    database_url: str, notification_ids: list[str], timeout_s: float, log: Callable[[str], None]
) -> int:
    """Poll until every delivery of ``notification_ids`` is DELIVERED or FAILED, at most
    ``timeout_s``; return how many are not."""
    ids = [uuid.UUID(n) for n in notification_ids]
    deadline = time.monotonic() + timeout_s
    pending = -1
    next_log = 0.0
    while True:
        try:
            conn = await asyncpg.connect(database_url, timeout=5)
            try:
                pending = int(
                    await conn.fetchval(
                        """SELECT count(*) FROM deliveries WHERE notification_id = ANY($1::uuid[])
                              AND status NOT IN ('delivered', 'failed')""",
                        ids,
                        timeout=10,
                    )
                )
            finally:
                await conn.close()
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as error:
            log(f"drain: database not reachable ({type(error).__name__}); retrying")
        if pending == 0 or time.monotonic() > deadline:
            return pending
        if time.monotonic() > next_log:
            next_log = time.monotonic() + 10
            log(f"drain: {pending} deliveries not final yet")
        await asyncio.sleep(1.0)


async def analyze(
    report: Report,
    database_url: str,
    record: ClientRecord,
    journal: list[dict[str, Any]],
    kills: list[KillEvent],
    exits: list[tuple[float, str, int]],
    tenants: int,
) -> None:
    """Fill ``report`` from PostgreSQL, the providers' journal and the client's record."""
    conn = await asyncpg.connect(database_url, timeout=10)
    try:
        rows = await conn.fetch(
            """SELECT d.id, n.request_id, d.channel, d.status, d.attempts
                 FROM deliveries d JOIN notifications n ON n.id = d.notification_id
                WHERE d.notification_id = ANY($1::uuid[])""",
            [uuid.UUID(a.notification_id) for a in record.accepted.values()],
        )
        committed = await conn.fetch(
            "SELECT request_id, tenant_id, count(*) AS n FROM notifications GROUP BY 1, 2"
        )
        unfinished = {
            r["delivery_id"]: int(r["n"])
            for r in await conn.fetch(
                """SELECT delivery_id, count(*) AS n FROM delivery_attempts
                    WHERE finished_at IS NULL GROUP BY delivery_id"""
            )
        }
        report.attempts_total = int(await conn.fetchval("SELECT count(*) FROM delivery_attempts"))
        report.republished_rows = int(
            await conn.fetchval(
                """SELECT (SELECT count(*) FROM outbox WHERE delivery_id IS NOT NULL)
                        - (SELECT count(*) FROM deliveries)"""
            )
        )
    finally:
        await conn.close()

    report.accepted_notifications = len(record.accepted)
    report.accepted_after_retry = record.accepted_after_retry
    report.not_accepted = dict(Counter(record.not_accepted.values()))
    report.rpcs, report.retries = record.rpcs, record.retries
    report.single_calls, report.batch_calls = record.single_calls, record.batch_calls
    report.failed_attempts = dict(record.failed_attempts)
    report.accepted_deliveries = sum(len(a.deliveries) for a in record.accepted.values())
    statuses = Counter(r["status"] for r in rows)
    report.delivered, report.failed = statuses["delivered"], statuses["failed"]
    report.final = report.delivered + report.failed
    report.not_final = report.accepted_deliveries - report.final
    report.idempotency_violations = sum(1 for r in committed if r["n"] > 1)
    commits = unaccepted_commits([r["request_id"] for r in committed], record)
    kinds = Counter(commits.values())
    report.committed_but_not_accepted = len(commits)
    report.committed_after_giving_up = kinds[GAVE_UP]
    report.committed_after_refusal = kinds[REFUSED]
    report.committed_never_sent = kinds[NEVER_SENT]
    report.committed_not_accepted_examples = [
        f"{request_id}: {kind} ({record.not_accepted.get(request_id, '-')})"
        for request_id, kind in list(commits.items())[:20]
    ]

    received: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for entry in journal:
        received[(entry["marker"], entry["channel"])].append(entry)
    report.received_messages = len(journal)
    by_delivery = {(r["request_id"], r["channel"]): r for r in rows}
    for request_id, accepted in record.accepted.items():
        for channel, delivery_id in accepted.deliveries.items():
            got = received.get((request_id, channel), [])
            row = by_delivery.get((request_id, channel))
            if not got:
                report.lost += 1
                if len(report.lost_examples) < 20:
                    status = row["status"] if row else "missing"
                    report.lost_examples.append(f"{delivery_id} ({channel}, {accepted.tenant}): {status}")
                continue
            report.received_deliveries += 1
            report.wrong_tenant += sum(1 for e in got if e["tenant"] != accepted.tenant)
            if channel == "email":
                report.wrong_delivery_id += sum(1 for e in got if e.get("delivery_id") != delivery_id)
            if len(got) == 1:
                continue
            times = sorted(e["t"] for e in got)
            duplicate = Duplicate(
                request_id=request_id,
                channel=channel,
                delivery_id=delivery_id,
                received=len(got),
                attempts=int(row["attempts"]) if row else 0,
                unfinished_attempts=unfinished.get(uuid.UUID(delivery_id), 0),
                cause=classify_duplicate(channel, times[0], times[-1], kills, exits),
            )
            report.duplicates += len(got) - 1
            report.duplicate_deliveries += 1
            report.duplicate_causes[duplicate.cause] = report.duplicate_causes.get(duplicate.cause, 0) + (
                len(got) - 1
            )
            if len(report.duplicate_examples) < 20:
                report.duplicate_examples.append(asdict(duplicate))
    unaccepted = [(m, c) for (m, c) in received if m not in record.accepted]
    report.unaccepted_delivered = len(unaccepted)
    for marker, channel in unaccepted[:20]:
        why = record.not_accepted.get(marker, "never sent by this client")
        report.unaccepted_delivered_examples.append(f"{marker} ({channel}): {why}")
    for kill in kills:
        report.kills[kill.component] = report.kills.get(kill.component, 0) + 1
    report.kill_events = [asdict(k) for k in kills]
    for _, component, code in exits:
        report.exits_on_their_own.setdefault(component, []).append(code)
    report.duplicate_bound = duplicate_bound(report.kills, report.exits_on_their_own, tenants)


def plan_as_json(plan: list[PlannedKill]) -> list[dict[str, Any]]:
    """The kill plan as the driver's ``chaos`` command takes it."""
    return [asdict(step) for step in plan]
