"""The operator CLI (`switchboard tenants|keys|providers`) against a running gateway."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import secrets
import subprocess
import sys
import uuid
from pathlib import Path

import asyncpg

from gateway.server import Gateway
from switchboard.notify.v1 import notify_pb2_grpc
from tests.conftest import ADMIN_TOKEN
from tests.helpers import send_request

PASSWORD = "cli-secret-password-41c7"
#: A provider configuration file (the protobuf JSON form of ProviderConfig).
SMTP_CONFIG = {
    "smtp": {
        "host": "smtp.example.com",
        "port": 587,
        "tlsMode": "SMTP_TLS_MODE_STARTTLS",
        "username": "acme",
        "password": PASSWORD,
        "fromAddress": "Acme <a@acme.example>",
    }
}


async def cli(
    gateway: Gateway,
    *args: str,
    stdin: str = "",
    token: str = ADMIN_TOKEN,
    extra_env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``switchboard <args>`` as a subprocess against ``gateway``; ``extra_env`` adds
    settings (e.g. ``SWITCHBOARD_DATABASE_URL`` for the DB-direct commands)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SWITCHBOARD_")}
    env.update(
        SWITCHBOARD_GRPC_ADDR=f"127.0.0.1:{gateway.port}", SWITCHBOARD_ADMIN_TOKEN=token, COLUMNS="250"
    )
    env.update(extra_env or {})
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "switchboard.cli", *args],
        input=stdin,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_operator_manages_tenants_keys_and_providers_from_the_cli(
    gateway: Gateway, pool: asyncpg.Pool
) -> None:
    created = await cli(gateway, "tenants", "create", "cli-tenant", "--display-name", "CLI Tenant")
    assert created.returncode == 0, created.stderr
    tenant_id = re.search(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", created.stdout)
    key = re.search(r"sb_([a-z0-9]{12})_\S+", created.stdout)
    assert tenant_id
    assert key
    tid = tenant_id.group(0)

    listed = await cli(gateway, "tenants", "list")
    assert "cli-tenant" in listed.stdout
    assert "CLI Tenant" in listed.stdout

    keys = await cli(gateway, "keys", "list", tid)
    assert key.group(1) in keys.stdout
    assert key.group(0) not in keys.stdout  # the secret is never listed

    set_result = await cli(
        gateway, "providers", "set", tid, "email", "--config", "-", stdin=json.dumps(SMTP_CONFIG)
    )
    assert set_result.returncode == 0, set_result.stderr
    got = await cli(gateway, "providers", "get", tid, "email")
    assert "smtp.example.com" in got.stdout
    assert "password" in got.stdout  # which secret fields are set
    for output in (set_result, got):
        assert PASSWORD not in output.stdout + output.stderr

    revoked = await cli(gateway, "keys", "revoke", tid, key.group(1))
    assert revoked.returncode == 0, revoked.stderr
    disabled = await cli(gateway, "tenants", "disable", tid)
    assert "yes" in disabled.stdout
    enabled = await cli(gateway, "tenants", "enable", tid)
    assert "no" in enabled.stdout
    deleted = await cli(gateway, "providers", "delete", tid, "email")
    assert deleted.returncode == 0, deleted.stderr

    # Every mutating call carried its own fresh UUID4 request_id (AIP-155): CreateTenant and
    # CreateApiKey (tenants create), SetProviderConfig, RevokeApiKey, DisableTenant, EnableTenant,
    # DeleteProviderConfig.
    request_ids = [r["request_id"] for r in await pool.fetch("SELECT request_id FROM admin_idempotency_keys")]
    assert len(request_ids) == 7
    assert len(set(request_ids)) == 7
    assert all(uuid.UUID(r).version == 4 for r in request_ids)


async def test_cli_reports_errors_and_a_wrong_token(gateway: Gateway) -> None:
    wrong = await cli(gateway, "tenants", "list", token="not-the-token")
    assert wrong.returncode == 1
    assert "UNAUTHENTICATED" in wrong.stdout
    missing = await cli(gateway, "keys", "list", "00000000-0000-4000-8000-000000000000")
    assert missing.returncode == 1
    assert "NOT_FOUND" in missing.stdout
    bad_json = await cli(
        gateway,
        "providers",
        "set",
        "00000000-0000-4000-8000-000000000000",
        "email",
        "--config",
        "-",
        stdin='{"smtp": {"password": "x", "bogus": 1}}',
    )
    assert bad_json.returncode != 0
    assert '"x"' not in bad_json.stdout + bad_json.stderr


TENANT_ID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


async def cli_tenant(gateway: Gateway, name: str) -> str:
    """Create tenant ``name`` (without a key) with the CLI; its id."""
    created = await cli(gateway, "tenants", "create", name, "--no-with-key")
    assert created.returncode == 0, created.stderr
    assert "API key" not in created.stdout
    found = TENANT_ID_RE.search(created.stdout)
    assert found
    return found.group(0)


async def test_keys_create_prints_a_working_key_once(
    gateway: Gateway, stub: notify_pb2_grpc.NotificationServiceAsyncStub, pool: asyncpg.Pool
) -> None:
    tenant_id = await cli_tenant(gateway, "cli-keys")

    created = await cli(gateway, "keys", "create", tenant_id)

    assert created.returncode == 0, created.stderr
    assert "API key (shown once):" in created.stdout
    found = re.search(r"\bsb_([a-z0-9]{12})_(\S+)", created.stdout)
    assert found
    token, key_id, secret = found.group(0), found.group(1), found.group(2)
    stored = await pool.fetchrow("SELECT tenant_id, secret_sha256 FROM api_keys WHERE id = $1", key_id)
    assert stored is not None
    assert str(stored["tenant_id"]) == tenant_id
    assert stored["secret_sha256"] == hashlib.sha256(secret.encode()).digest()
    accepted = await stub.SendNotification(send_request(), metadata=(("authorization", f"Bearer {token}"),))
    assert accepted.notification_id  # the printed key is the tenant's working key

    listed = await cli(gateway, "keys", "list", tenant_id)
    assert key_id in listed.stdout
    assert secret not in listed.stdout
    missing = await cli(gateway, "keys", "create", "00000000-0000-4000-8000-000000000000")
    assert missing.returncode == 1
    assert "NOT_FOUND" in missing.stdout


async def test_providers_set_from_a_config_file_and_list(gateway: Gateway, tmp_path: Path) -> None:
    tenant_id = await cli_tenant(gateway, "cli-providers")
    auth_token = f"twilio-token-{secrets.token_hex(8)}"
    sms_file = tmp_path / "twilio.json"
    sms_file.write_text(
        json.dumps(
            {
                "twilio": {
                    "accountSid": "AC" + "0123456789abcdef" * 2,
                    "authToken": auth_token,
                    "fromNumber": "+14155550100",
                }
            }
        ),
        encoding="utf-8",
    )
    email_file = tmp_path / "smtp.json"
    email_file.write_text(json.dumps(SMTP_CONFIG), encoding="utf-8")

    set_sms = await cli(gateway, "providers", "set", tenant_id, "sms", "--config", str(sms_file))
    set_email = await cli(gateway, "providers", "set", tenant_id, "email", "--config", str(email_file))
    listed = await cli(gateway, "providers", "list", tenant_id)

    for result in (set_sms, set_email, listed):
        assert result.returncode == 0, result.stderr
        assert auth_token not in result.stdout + result.stderr
        assert PASSWORD not in result.stdout + result.stderr
    rows = {line.split("│")[1].strip(): line for line in listed.stdout.splitlines() if line.count("│") > 2}
    assert {"email", "sms"} <= set(rows)
    assert "twilio" in rows["sms"]
    assert "auth_token" in rows["sms"]  # which secret is set, not its value
    assert "from_number=+14155550100" in rows["sms"]
    assert "smtp" in rows["email"]
    assert "host=smtp.example.com" in rows["email"]
    assert "password" in rows["email"]

    nowhere = str(tmp_path / "none.json")
    missing = await cli(gateway, "providers", "set", tenant_id, "sms", "--config", nowhere)
    assert missing.returncode == 2
    assert "cannot read" in missing.stdout + missing.stderr
    assert "Traceback" not in missing.stdout + missing.stderr
    not_a_config = tmp_path / "bad.json"
    not_a_config.write_text(json.dumps({"twilio": {"authToken": auth_token, "bogus": 1}}), encoding="utf-8")
    refused = await cli(gateway, "providers", "set", tenant_id, "sms", "--config", str(not_a_config))
    assert refused.returncode == 2
    assert auth_token not in refused.stdout + refused.stderr
