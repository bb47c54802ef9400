"""Crash-and-fault suite: SIGKILL every part of the pipeline while traffic flows.

PostgreSQL, the Tansu broker (memory storage: a restart loses topics, offsets
and unconsumed messages), the gateway, the relay and the three channel
workers run as separate OS processes, started and killed by a driver process
(tests/chaos_harness.py). Each tenant has its own SMTP server, Twilio account
and Firebase project on loopback fakes that journal every message they
accept. The test (tests/chaos_client.py) creates the tenants through the admin
API, sends 5,000 notifications (single calls and batches, every channel mix,
about 1% invalid ones) and retries UNAVAILABLE / DEADLINE_EXCEEDED with the
same request_id, while the driver's seeded monkey SIGKILLs and restarts every
component at least once.

Once everything accepted is final (bounded wait), the providers' journal is
compared with what the client was told:

- every valid request got ACCEPTED, every ACCEPTED notification is final, and
  every one of its deliveries reached its tenant's own provider at least once
  (lost = 0);
- nothing that never got ACCEPTED (the invalid requests) was delivered, and
  nothing was committed for a request the client got a definitive refusal for
  or never sent. A commit the client never saw ACCEPTED for is legitimate only
  when the client was left not knowing (its last answer UNAVAILABLE or
  DEADLINE_EXCEEDED, then it gave up; chaos_client.unaccepted_commits); this
  client retries until ACCEPTED, so in a passing run that count is 0 too;
- no request_id was processed twice;
- duplicate sends are counted with their likely cause and stay within the
  documented window: a worker (or PostgreSQL) dying between the provider's
  acceptance and the recording of DELIVERED, at most one send per lane
  (tenant) per worker per such death.

``CHAOS_SEED`` replays a run's kill schedule and traffic (``CHAOS_NOTIFICATIONS``
and ``CHAOS_SWEEP_AFTER_S`` change the volume and the sweeper deadline for
experiments). The figures appear in pytest's terminal summary of every run
(tests/figures.py; the progress log with ``-s``) and in ``chaos-report.json``
in the test's tmp dir, next to the processes' logs.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest

from tests.chaos_client import (
    Driver,
    Report,
    TrafficClient,
    analyze,
    create_tenants,
    plan_as_json,
    plan_traffic,
    wait_until_final,
)
from tests.chaos_harness import (
    STACK_SETTINGS,
    make_fakes_spec,
    plan_kills,
    processes_in_sessions,
    read_journal,
)

pytestmark = [pytest.mark.chaos, pytest.mark.slow]

NOTIFICATIONS = int(os.environ.get("CHAOS_NOTIFICATIONS", "5000"))
TENANTS = 4
#: The client spreads its sends over this long; the kills happen meanwhile.
SEND_S = 60.0
TOTAL_KILLS = 12
#: How long everything accepted may take to become final after the last send and kill.
DRAIN_TIMEOUT_S = 120.0
STARTUP_TIMEOUT_S = 120.0


def log(message: str) -> None:
    print(f"[chaos {time.strftime('%H:%M:%S')}] {message}", flush=True)


def log_event(event: dict[str, Any]) -> None:
    if event["event"] == "kill":
        log(f"SIGKILL {event['component']}, down {event['downtime_s']:.1f} s")
    elif event["event"] == "exited":
        log(f"{event['component']} exited on its own (code {event['code']}); the supervisor restarted it")


@pytest.mark.timeout(600)
async def test_nothing_accepted_is_lost_when_every_component_is_killed(
    tmp_path: Path, report_figures: Callable[[str, str], None]
) -> None:
    seed = int(os.environ.get("CHAOS_SEED") or random.SystemRandom().randrange(2**32))
    log(f"CHAOS_SEED={seed} (set it to replay this run)")
    rng = random.Random(seed)
    kill_rng, traffic_rng, client_rng = (random.Random(rng.getrandbits(64)) for _ in range(3))
    report = Report(seed=seed, sweep_after_s=float(STACK_SETTINGS["SWITCHBOARD_RELAY_SWEEP_AFTER_S"]))
    tenant_names = [f"tenant-{i}" for i in range(TENANTS)]
    spec = make_fakes_spec(tenant_names)
    spec_path = tmp_path / "fakes-spec.json"
    spec.write(spec_path)
    units = plan_traffic(traffic_rng, NOTIFICATIONS, TENANTS)
    plan = plan_kills(kill_rng, TOTAL_KILLS)
    report.planned_notifications = sum(len(u) for u in units)
    driver = Driver(tmp_path / "stack", spec_path, on_event=log_event)
    started = time.monotonic()
    stopped = None
    try:
        ready = await driver.start(STARTUP_TIMEOUT_S)
        report.log_dir = ready["log_dir"]
        tenants = await create_tenants(ready["grpc_addr"], spec)
        report.startup_s = time.monotonic() - started
        log(f"stack up in {report.startup_s:.1f} s; logs in {ready['log_dir']}")
        log("kill plan: " + ", ".join(f"{k.component} (down {k.downtime_s:.1f}s)" for k in plan))

        client = TrafficClient(ready["grpc_addr"], tenants, units, send_s=SEND_S, rng=client_rng)
        await driver.send(cmd="chaos", plan=plan_as_json(plan))
        sending = time.monotonic()
        record = await client.run()
        report.send_s = time.monotonic() - sending
        log(f"client done: {len(record.accepted)} ACCEPTED, {len(record.not_accepted)} not")
        await driver.wait_for("plan_done", DRAIN_TIMEOUT_S)
        draining = time.monotonic()
        ids = [a.notification_id for a in record.accepted.values()]
        await wait_until_final(ready["database_url"], ids, DRAIN_TIMEOUT_S, log)
        report.drain_s = time.monotonic() - draining
        await asyncio.sleep(1.0)  # margin only: a send is journalled before it is recorded
        await analyze(
            report,
            ready["database_url"],
            record,
            read_journal(Path(ready["journal"])),
            driver.kill_events(),
            driver.exits(),
            TENANTS,
        )
    finally:
        stopped = await driver.stop()
    report.elapsed_s = time.monotonic() - started
    assert stopped is not None, f"the driver did not stop cleanly; see {driver.log_path}"
    sessions = {*stopped["sessions"], driver.pid}
    report.leftover_processes = stopped["leftovers"] + [
        f"{p.pid}: {' '.join(p.cmdline())}" for p in processes_in_sessions(sessions)
    ]
    report_path = tmp_path / "chaos-report.json"
    report_path.write_text(json.dumps(asdict(report), indent=2), encoding="utf-8")
    log("figures:\n" + report.summary())
    log(f"full report: {report_path}")
    report_figures("chaos", f"{report.summary()}\nfull report: {report_path}")

    valid_not_accepted = {
        r: why for r, why in record.not_accepted.items() if r not in record.expected_invalid
    }
    crashes = {name: [c for c in codes if c < 0] for name, codes in report.exits_on_their_own.items()}
    assert report.leftover_processes == []
    # Exits with a code (a service started while PostgreSQL was down) are restarted by the
    # supervisor; a process dying of a signal nobody sent is a crash.
    assert not any(crashes.values()), crashes
    assert valid_not_accepted == {}, list(valid_not_accepted.items())[:10]
    assert record.expected_invalid <= set(record.not_accepted)
    assert report.not_final == 0, f"{report.not_final} deliveries not final after {DRAIN_TIMEOUT_S} s"
    assert report.lost == 0, report.lost_examples
    assert report.unaccepted_delivered == 0, report.unaccepted_delivered_examples
    assert report.committed_after_refusal == 0, report.committed_not_accepted_examples
    assert report.committed_never_sent == 0, report.committed_not_accepted_examples
    # The client never gave up (asserted above), so it saw ACCEPTED for everything committed.
    assert report.committed_but_not_accepted == 0, report.committed_not_accepted_examples
    assert report.idempotency_violations == 0
    assert report.wrong_tenant == 0
    assert report.wrong_delivery_id == 0
    assert report.duplicates <= report.duplicate_bound, report.duplicate_examples
