"""The operator CLI (`switchboard tenants|keys|providers`) against a running gateway."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import uuid

import asyncpg

from gateway.server import Gateway
from tests.conftest import ADMIN_TOKEN

PASSWORD = "cli-secret-password-41c7"


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

    config = {
        "smtp": {
            "host": "smtp.example.com",
            "port": 587,
            "tlsMode": "SMTP_TLS_MODE_STARTTLS",
            "username": "acme",
            "password": PASSWORD,
            "fromAddress": "Acme <a@acme.example>",
        }
    }
    set_result = await cli(
        gateway, "providers", "set", tid, "email", "--config", "-", stdin=json.dumps(config)
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
