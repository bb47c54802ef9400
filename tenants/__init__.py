"""Tenants: keys, provider configuration, encryption at rest, provider cache."""
