"""`switchboard demo` and `switchboard dev` as a newcomer runs them (subprocesses)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import psutil
import pytest

from switchboard.embedded import free_port, wait_for_port
from switchboard.protogen import REPO_ROOT
from switchboard.settings import Settings
from tests.test_protos import buf  # noqa: F401  (fixture)

pytestmark = pytest.mark.slow


def stack_env(data_dir: Path) -> dict[str, str]:
    """Environment for a dev stack on free ports with its own data folder."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SWITCHBOARD_")}
    env.update(
        SWITCHBOARD_DATA_DIR=str(data_dir),
        SWITCHBOARD_GRPC_ADDR=f"127.0.0.1:{free_port()}",
        SWITCHBOARD_DEV_POSTGRES_PORT=str(free_port()),
        SWITCHBOARD_DEV_KAFKA_PORT=str(free_port()),
        SWITCHBOARD_SMTP_PORT=str(free_port()),
        SWITCHBOARD_DEV_TWILIO_PORT=str(free_port()),
        SWITCHBOARD_DEV_FCM_PORT=str(free_port()),
        SWITCHBOARD_DEV_STRIPE_PORT=str(free_port()),
        SWITCHBOARD_WEBHOOK_ADDR=f"127.0.0.1:{free_port()}",
    )
    return env


def leftover_processes(data_dir: Path, env: dict[str, str]) -> list[str]:
    """Processes still running that belong to the stack in ``data_dir``."""
    markers = [str(data_dir.resolve()), env["SWITCHBOARD_DEV_KAFKA_PORT"]]
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "environ"]):
        try:
            cmdline = " ".join(proc.info["cmdline"] or [])
            environ = proc.info["environ"] or {}
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if proc.pid == os.getpid():
            continue
        if any(m in cmdline for m in markers) or environ.get("SWITCHBOARD_DATA_DIR") == str(data_dir):
            found.append(f"{proc.pid}: {cmdline}")
    return found


def switchboard(*args: str) -> list[str]:
    return [sys.executable, "-m", "switchboard.cli", *args]


def run_demo(env: dict[str, str], cwd: Path, timeout: str = "60") -> subprocess.CompletedProcess[str]:
    """``switchboard demo --timeout <timeout>`` to completion (at most 4 minutes)."""
    return subprocess.run(
        switchboard("demo", "--timeout", timeout),
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        cwd=cwd,
    )


def test_demo_delivers_every_channel_and_leaves_nothing_running(tmp_path: Path) -> None:
    data_dir = tmp_path / "demo"
    env = stack_env(data_dir)
    result = run_demo(env, tmp_path, "60")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("DELIVERED") >= 3
    assert "every delivery DELIVERED" in result.stdout
    assert "payment SUCCEEDED, receipt sent, ledger balanced and verified" in result.stdout
    mails = sorted(path.read_text() for path in (data_dir / "maildir" / "new").iterdir())
    assert len(mails) == 2  # the notification's email and the payment's receipt
    assert sum("Subject: Hello from Switchboard" in mail for mail in mails) == 1
    assert sum("Subject: Your receipt: 25.00 EUR" in mail for mail in mails) == 1
    # The payment went through the real Stripe connector to the fake Stripe, with the attempt's key.
    stripe = [json.loads(line) for line in (data_dir / "fakes" / "stripe.jsonl").read_text().splitlines()]
    charges = [r for r in stripe if r["method"] == "POST" and r["path"] == "/v1/payment_intents"]
    assert len(charges) == 1
    assert charges[0]["body"]["amount"] == "2500"
    assert charges[0]["body"]["currency"] == "eur"
    # SMS and push went through the real Twilio and FCM provider code to the dev fakes.
    twilio = [json.loads(line) for line in (data_dir / "fakes" / "twilio.jsonl").read_text().splitlines()]
    fcm = [json.loads(line) for line in (data_dir / "fakes" / "fcm.jsonl").read_text().splitlines()]
    assert [r["body"]["To"] for r in twilio] == ["+14155550123"]
    assert [r["body"]["message"]["notification"]["title"] for r in fcm] == ["Hello"]
    assert leftover_processes(data_dir, env) == []


@pytest.fixture
def dev_stack(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], dict[str, str], Path]]:
    data_dir = tmp_path / "dev"
    env = stack_env(data_dir)
    process = subprocess.Popen(
        switchboard("dev"), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path
    )
    try:
        assert process.stdout is not None
        banner = []
        for line in process.stdout:  # bounded: the process exits or prints the banner
            banner.append(line)
            if "Ctrl-C stops everything" in line:
                break
        assert process.poll() is None, "".join(banner)
        host, _, port = env["SWITCHBOARD_GRPC_ADDR"].rpartition(":")
        wait_for_port(host, int(port), 10)
        yield process, env, data_dir
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_buf_curl_calls_send_notification_through_reflection(
    dev_stack: tuple[subprocess.Popen[str], dict[str, str], Path],
    buf: str,  # noqa: F811
) -> None:
    _process, env, data_dir = dev_stack
    admin_token = (data_dir / "admin-token").read_text().strip()
    created = subprocess.run(
        switchboard("tenants", "create", "curl-tenant"),
        env={**env, "SWITCHBOARD_ADMIN_TOKEN": admin_token, "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert created.returncode == 0, created.stdout + created.stderr
    api_key = re.search(r"(sb_[a-z0-9]{12}_[A-Za-z0-9_\-]+)", created.stdout)
    assert api_key, created.stdout
    body = {
        "requestId": str(uuid.uuid4()),
        "channels": ["CHANNEL_SMS"],
        "recipient": {"phoneNumber": "+14155550123"},
        "sms": {"text": "hello from buf curl"},
    }
    result = subprocess.run(
        [
            buf,
            "curl",
            "--protocol",
            "grpc",
            "--http2-prior-knowledge",
            "-H",
            f"authorization: Bearer {api_key.group(1)}",
            "-d",
            json.dumps(body),
            f"http://{env['SWITCHBOARD_GRPC_ADDR']}/switchboard.notify.v1.NotificationService/SendNotification",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    answer = json.loads(result.stdout)
    assert answer["status"] == "NOTIFICATION_STATUS_ACCEPTED"
    assert [d["channel"] for d in answer["deliveries"]] == ["CHANNEL_SMS"]


def test_dev_stops_everything_on_sigterm(
    dev_stack: tuple[subprocess.Popen[str], dict[str, str], Path],
) -> None:
    process, env, data_dir = dev_stack
    assert leftover_processes(data_dir, env), "the stack should be running"
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 0, output
    assert leftover_processes(data_dir, env) == []


def _start_dev(env: dict[str, str], cwd: Path) -> tuple[subprocess.Popen[str], str]:
    """Start ``switchboard dev``; return the process and its banner once it is ready."""
    process = subprocess.Popen(
        switchboard("dev"), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd
    )
    assert process.stdout is not None
    banner = []
    for line in process.stdout:  # bounded: the process exits or prints the banner
        banner.append(line)
        if "Ctrl-C stops everything" in line:
            break
    assert process.poll() is None, "".join(banner)
    return process, "".join(banner)


def test_dev_prints_every_address_stops_on_ctrl_c_and_keeps_its_data(tmp_path: Path) -> None:
    data_dir = tmp_path / "dev"
    env = stack_env(data_dir) | {"COLUMNS": "250"}
    process, banner = _start_dev(env, tmp_path)
    try:
        for address in (
            env["SWITCHBOARD_GRPC_ADDR"],
            f"127.0.0.1:{env['SWITCHBOARD_DEV_POSTGRES_PORT']}",
            f"127.0.0.1:{env['SWITCHBOARD_DEV_KAFKA_PORT']}",
            f"127.0.0.1:{env['SWITCHBOARD_SMTP_PORT']}",
            str((data_dir / "maildir").resolve()),
            str((data_dir / "logs").resolve()),
        ):
            assert address in banner, f"{address} missing from the banner:\n{banner}"
        admin_env = env | {"SWITCHBOARD_ADMIN_TOKEN": (data_dir / "admin-token").read_text().strip()}
        created = subprocess.run(
            switchboard("tenants", "create", "kept-tenant"),
            env=admin_env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert created.returncode == 0, created.stdout + created.stderr
        process.send_signal(signal.SIGINT)  # Ctrl-C
        output, _ = process.communicate(timeout=60)
        assert process.returncode == 0, output
        assert leftover_processes(data_dir, env) == []

        process, _ = _start_dev(env, tmp_path)  # the same data folder: PostgreSQL keeps its data
        listed = subprocess.run(
            switchboard("tenants", "list"), env=admin_env, capture_output=True, text=True, timeout=60
        )
        assert listed.returncode == 0, listed.stdout + listed.stderr
        assert "kept-tenant" in listed.stdout
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
        assert process.returncode == 0, output
        assert leftover_processes(data_dir, env) == []
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_demo_uses_the_servers_named_in_the_environment(tmp_path: Path, settings: Settings) -> None:
    """With SWITCHBOARD_DATABASE_URL / SWITCHBOARD_KAFKA_BOOTSTRAP set, the demo starts
    neither PostgreSQL nor a broker of its own and runs on the given servers."""
    data_dir = tmp_path / "external"
    database_url = settings.require_database_url()
    env = stack_env(data_dir) | {
        "SWITCHBOARD_DATABASE_URL": database_url,
        "SWITCHBOARD_KAFKA_BOOTSTRAP": settings.require_kafka_bootstrap(),
        "SWITCHBOARD_KAFKA_TOPIC_PREFIX": settings.kafka_topic_prefix,
        "SWITCHBOARD_KAFKA_IDEMPOTENCE": "false",  # the test broker is Tansu
    }
    result = run_demo(env, tmp_path, "60")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "every delivery DELIVERED" in result.stdout
    assert not (data_dir / "postgres").exists()  # no embedded PostgreSQL ...
    assert not (data_dir / "logs" / "kafka.log").exists()  # ... and no embedded broker
    assert leftover_processes(data_dir, env) == []

    async def count_demo_notifications() -> int:
        conn = await asyncpg.connect(database_url)
        try:
            return int(await conn.fetchval("SELECT count(*) FROM notifications"))
        finally:
            await conn.close()

    assert asyncio.run(count_demo_notifications()) >= 1  # the demo wrote to the given database


def test_demo_exits_non_zero_with_the_reason_when_deliveries_are_not_final_in_time(tmp_path: Path) -> None:
    data_dir = tmp_path / "late"
    env = stack_env(data_dir) | {"COLUMNS": "250"}
    # 50 ms is far less than a consumer group takes to form: nothing can be final by then.
    result = run_demo(env, tmp_path, "0.05")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "not every delivery was DELIVERED" in result.stdout
    assert "not final before the timeout" in result.stdout
    assert "every delivery DELIVERED in" not in result.stdout
    assert leftover_processes(data_dir, env) == []
