"""The fake providers of the dev stack: `switchboard fakes`.

Runs the fake Twilio (SMS), the fake FCM with its OAuth2 token endpoint
(push) and the fake Stripe (payments) on fixed loopback ports, with the dev
credentials the dev stack generated, so the demo tenant's SMS, push and
payments go through the real Twilio, FCM and Stripe connector code. Every
accepted request is appended to ``<data dir>/fakes/<provider>.jsonl``.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from pathlib import Path

from switchboard.fakes.fcm import FakeFcm
from switchboard.fakes.stripe import FakeStripe
from switchboard.fakes.twilio import FakeTwilio
from switchboard.signals import wait_for_shutdown_signal

DEV_TWILIO_ACCOUNT_SID = "AC" + "0" * 31 + "1"
DEV_FCM_PROJECT = "switchboard-dev"


@dataclass(frozen=True)
class DevFakes:
    """Where the dev fakes listen and the credentials they accept."""

    twilio_port: int
    fcm_port: int
    twilio_auth_token: str
    service_account_path: Path
    journal_dir: Path
    stripe_port: int = 0
    stripe_secret_key: str = field(default="", repr=False)

    @property
    def twilio_base_url(self) -> str:
        """Base URL for the demo tenant's Twilio configuration."""
        return f"http://127.0.0.1:{self.twilio_port}"

    @property
    def stripe_base_url(self) -> str:
        """Base URL for the demo tenant's Stripe configuration."""
        return f"http://127.0.0.1:{self.stripe_port}"

    @property
    def fcm_base_url(self) -> str:
        """FCM endpoint base (and OAuth2 token host) for the demo tenant."""
        return f"http://127.0.0.1:{self.fcm_port}"


async def serve_dev_fakes(fakes: DevFakes) -> None:
    """Serve both fakes until SIGTERM/SIGINT."""
    fakes.journal_dir.mkdir(parents=True, exist_ok=True)
    twilio = FakeTwilio(DEV_TWILIO_ACCOUNT_SID, fakes.twilio_auth_token, port=fakes.twilio_port)
    twilio.journal = fakes.journal_dir / "twilio.jsonl"
    fcm = FakeFcm(port=fakes.fcm_port)
    fcm.journal = fakes.journal_dir / "fcm.jsonl"
    fcm.register_service_account(json.loads(fakes.service_account_path.read_text(encoding="utf-8")))
    stripe = FakeStripe(fakes.stripe_secret_key, port=fakes.stripe_port) if fakes.stripe_port else None
    if stripe is not None:
        stripe.journal = fakes.journal_dir / "stripe.jsonl"
        await stripe.start()
    await twilio.start()
    await fcm.start()
    try:
        await wait_for_shutdown_signal()
    finally:
        await fcm.stop()
        await twilio.stop()
        if stripe is not None:
            await stripe.stop()


def run_dev_fakes(fakes: DevFakes) -> None:
    """Blocking entry point for the `switchboard fakes` command."""
    asyncio.run(serve_dev_fakes(fakes))
