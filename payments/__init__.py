"""Payments: intents, connectors, ledger, webhooks, reconciliation (later issues)."""
