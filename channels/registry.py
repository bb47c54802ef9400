"""Which provider handles a tenant's channel.

For now every tenant uses the process-wide defaults from settings (SMTP for
email, the sandbox for SMS and push); per-tenant provider configuration and
its cache belong to tenants/ (the tenants issue).
"""

from __future__ import annotations

import uuid

from channels.provider import Provider
from channels.sandbox import SandboxProvider
from channels.smtp import SmtpProvider
from switchboard.settings import Settings


class DefaultProviders:
    """Providers built once from settings and shared by every tenant."""

    def __init__(self, settings: Settings) -> None:
        sandbox = settings.resolved_sandbox_dir()
        self._providers: dict[str, Provider] = {
            "email": SmtpProvider(
                settings.smtp_host,
                settings.smtp_port,
                settings.smtp_from,
                timeout_s=settings.worker_provider_timeout_s,
            ),
            "sms": SandboxProvider(sandbox, "sms"),
            "push": SandboxProvider(sandbox, "push"),
        }

    async def provider_for(self, tenant_id: uuid.UUID, channel: str) -> Provider:
        """The provider for ``channel`` (same for every tenant here)."""
        return self._providers[channel]

    async def close(self) -> None:
        """Close every provider."""
        for provider in self._providers.values():
            await provider.close()
