"""The gRPC front door: server, auth, validation, idempotency, write path, relay, status."""
