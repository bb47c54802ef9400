"""Fake provider servers over real HTTP/SMTP on loopback, for tests and the dev stack."""
