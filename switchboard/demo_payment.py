"""`switchboard demo`, payments part: one card payment to SUCCEEDED, its journals and its receipt.

Through the admin API the demo tenant gets the dev stack's fake Stripe as its
processor (sealed like any tenant's credentials; the real Stripe connector
talks to it over HTTP), and a notification rule ``payment.succeeded`` -> email
receipt to the customer. Then over gRPC: ``CreatePayment`` (25.00 EUR, Stripe's
test card token ``pm_card_visa``, automatic capture), ``GetPayment`` until the
payment is final, the receipt looked up in the Maildir, and the tenant's
ledger checked: every journal's postings sum to zero per currency, and the
hash chain verifies (what ``switchboard ledger verify`` does).
"""

from __future__ import annotations

import asyncio
import mailbox
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import grpc
from rich.console import Console
from rich.table import Table

from payments.ledger import account_balances
from payments.ledger_verify import verify_chain
from payments.notification_rules import RuleSpec, RuleTemplates, set_rule
from switchboard.dev import DevStack
from switchboard.payments.v1 import payments_pb2, payments_pb2_grpc
from switchboard.tenants.v1 import tenants_pb2, tenants_pb2_grpc

DEMO_AMOUNT_MINOR = 2500
DEMO_CURRENCY = "EUR"
DEMO_CUSTOMER_EMAIL = "ada@example.com"
RECEIPT_RULE = "demo-receipt"
FINAL = {
    payments_pb2.PAYMENT_STATUS_SUCCEEDED,
    payments_pb2.PAYMENT_STATUS_FAILED,
    payments_pb2.PAYMENT_STATUS_CANCELED,
}


@dataclass
class PaymentDemoResult:
    """What the payment demo saw. ``balanced``: every currency's postings sum to zero."""

    payment: payments_pb2.Payment
    receipt: str = ""
    journals: int = 0
    chain_ok: bool = False
    balanced: bool = False
    balances: list[tuple[str, str, int]] = field(default_factory=list)
    elapsed_s: float = 0.0

    @property
    def ok(self) -> bool:
        """SUCCEEDED, receipt delivered, ledger balanced and its chain verified."""
        return (
            self.payment.status == payments_pb2.PAYMENT_STATUS_SUCCEEDED
            and bool(self.receipt)
            and self.journals > 0
            and self.chain_ok
            and self.balanced
        )


async def configure_payments(stack: DevStack, tenant_id: str) -> None:
    """The demo tenant's processor (fake Stripe) and its receipt rule."""
    fakes = stack.fakes
    assert fakes is not None
    metadata = (("authorization", f"Bearer {stack.admin_token}"),)
    async with grpc.aio.insecure_channel(stack.grpc_addr) as channel:
        admin = tenants_pb2_grpc.TenantAdminServiceStub(channel)
        await admin.SetProcessorConfig(
            tenants_pb2.SetProcessorConfigRequest(
                request_id=str(uuid.uuid4()),
                tenant_id=tenant_id,
                config=tenants_pb2.ProcessorConfig(
                    priority=1,
                    stripe=tenants_pb2.StripeConfig(
                        secret_key=fakes.stripe_secret_key, base_url=fakes.stripe_base_url
                    ),
                ),
            ),
            metadata=metadata,
            timeout=10,
        )
    conn = await asyncpg.connect(stack.database_url)
    try:
        await set_rule(
            conn,
            uuid.UUID(tenant_id),
            RuleSpec(
                name=RECEIPT_RULE,
                event_type="payment.succeeded",
                channels=("email",),
                templates=RuleTemplates(
                    email_subject="Your receipt: $amount $currency ($payment_id)",
                    email_text="We received $amount $currency for $description. Payment $payment_id.",
                ),
            ),
        )
    finally:
        await conn.close()


def find_receipt(maildir: Path, payment_id: str) -> str:
    """The Maildir file of the receipt for ``payment_id`` (its subject names it), or ''."""
    if not maildir.exists():
        return ""
    box = mailbox.Maildir(maildir, create=False)
    for key, message in box.items():
        if payment_id in str(message.get("Subject", "")):
            sub = "new" if (maildir / "new" / key).exists() else "cur"
            return str(maildir / sub / key)
    return ""


async def take_payment(stack: DevStack, api_key: str, tenant_id: str, timeout_s: float) -> PaymentDemoResult:
    """Create the demo payment, wait until it is final and its receipt landed; check the ledger."""
    started = time.monotonic()
    deadline = started + timeout_s
    metadata = (("authorization", f"Bearer {api_key}"),)
    async with grpc.aio.insecure_channel(stack.grpc_addr) as channel:
        stub = payments_pb2_grpc.PaymentServiceStub(channel)
        created = await stub.CreatePayment(
            payments_pb2.CreatePaymentRequest(
                request_id=str(uuid.uuid4()),
                amount_minor=DEMO_AMOUNT_MINOR,
                currency=DEMO_CURRENCY,
                customer_reference="demo-customer-1",
                customer=payments_pb2.CustomerContact(email=DEMO_CUSTOMER_EMAIL),
                payment_method="pm_card_visa",
                capture_method=payments_pb2.CAPTURE_METHOD_AUTOMATIC,
                description="Demo order #1",
                metadata={"source": "switchboard-demo"},
            ),
            metadata=metadata,
            timeout=10,
        )
        payment_id = created.payment.payment_id
        while True:
            got = await stub.GetPayment(
                payments_pb2.GetPaymentRequest(payment_id=payment_id), metadata=metadata, timeout=10
            )
            if got.payment.status in FINAL or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
    result = PaymentDemoResult(payment=got.payment)
    while not result.receipt and time.monotonic() < deadline:
        result.receipt = find_receipt(stack.maildir, payment_id)
        if not result.receipt:
            await asyncio.sleep(0.2)
    conn = await asyncpg.connect(stack.database_url)
    try:
        tenant = uuid.UUID(tenant_id)
        result.journals = int(
            await conn.fetchval("SELECT count(*) FROM ledger_journals WHERE tenant_id = $1", tenant)
        )
        result.chain_ok = (await verify_chain(conn, tenant)).ok
        balances = await account_balances(conn, tenant)
        result.balances = [(b.account, b.currency, b.balance_minor) for b in balances]
        totals: dict[str, int] = {}
        for _, currency, amount in result.balances:
            totals[currency] = totals.get(currency, 0) + amount
        result.balanced = all(total == 0 for total in totals.values())
    finally:
        await conn.close()
    result.elapsed_s = time.monotonic() - started
    return result


def print_payment(console: Console, result: PaymentDemoResult) -> None:
    """The payment table and the tenant's balances."""
    p = result.payment
    table = Table(title=f"Payment {p.payment_id}", show_header=False)
    table.add_column("what")
    table.add_column("value", overflow="fold")
    table.add_row("status", payments_pb2.PaymentStatus.Name(p.status).removeprefix("PAYMENT_STATUS_"))
    table.add_row("amount", f"{p.amount_minor} minor units {p.currency} (captured {p.amount_captured_minor})")
    table.add_row("processor", f"{p.processor} {p.processor_reference}")
    table.add_row("receipt email", result.receipt or "-")
    table.add_row("journals (this tenant)", str(result.journals))
    table.add_row("postings balance per currency", "yes" if result.balanced else "NO")
    table.add_row("ledger verify (hash chain)", "OK" if result.chain_ok else "BROKEN")
    console.print(table)
    balances = Table(title="Ledger balances (minor units; + debit, - credit)")
    for column in ("account", "currency", "balance"):
        balances.add_column(column)
    for account, currency, amount in result.balances:
        balances.add_row(account, currency, str(amount))
    console.print(balances)
