"""gRPC errors with rich details, per Google AIP-193.

Each helper returns a ``google.rpc.Status`` with the canonical code and the
detail messages AIP-193 asks for (``BadRequest`` for bad fields, ``ErrorInfo``
with a machine-readable reason and the domain ``switchboard.dev``,
``RetryInfo`` where waiting helps). :class:`RpcError` carries one to the
servicer edge, which aborts the call with it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

ERROR_DOMAIN = "switchboard.dev"


class RpcError(Exception):
    """An error destined for the client as ``status`` (a ``google.rpc.Status``)."""

    def __init__(self, status: status_pb2.Status) -> None:
        super().__init__(status.message)
        self.status = status


def _pack(*details: object) -> list[any_pb2.Any]:
    packed = []
    for detail in details:
        wrapper = any_pb2.Any()
        wrapper.Pack(detail)  # type: ignore[arg-type]
        packed.append(wrapper)
    return packed


def error_info(reason: str, metadata: Mapping[str, str] | None = None) -> error_details_pb2.ErrorInfo:
    """An ``ErrorInfo`` in our domain; ``reason`` is UPPER_SNAKE_CASE (AIP-193)."""
    return error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN, metadata=dict(metadata or {}))


def invalid_argument(violations: Iterable[error_details_pb2.BadRequest.FieldViolation]) -> status_pb2.Status:
    """INVALID_ARGUMENT naming every bad field (``BadRequest``) plus ``ErrorInfo``."""
    items = list(violations)
    fields = ", ".join(v.field for v in items)
    return status_pb2.Status(
        code=code_pb2.INVALID_ARGUMENT,
        message=f"invalid request: {fields}",
        details=_pack(error_details_pb2.BadRequest(field_violations=items), error_info("INVALID_FIELDS")),
    )


def unauthenticated(message: str) -> status_pb2.Status:
    """UNAUTHENTICATED: no, malformed, unknown or revoked credentials."""
    return status_pb2.Status(
        code=code_pb2.UNAUTHENTICATED, message=message, details=_pack(error_info("INVALID_API_KEY"))
    )


def permission_denied(message: str, reason: str) -> status_pb2.Status:
    """PERMISSION_DENIED: known caller, not allowed (e.g. a disabled tenant)."""
    return status_pb2.Status(
        code=code_pb2.PERMISSION_DENIED, message=message, details=_pack(error_info(reason))
    )


def not_found(resource: str, name: str) -> status_pb2.Status:
    """NOT_FOUND for ``resource`` ``name``; also what another tenant's object looks like."""
    return status_pb2.Status(
        code=code_pb2.NOT_FOUND,
        message=f"{resource} {name!r} not found",
        details=_pack(error_details_pb2.ResourceInfo(resource_type=resource, resource_name=name)),
    )


def idempotency_key_reused(request_id: str) -> status_pb2.Status:
    """FAILED_PRECONDITION: the request_id was already used for a different request."""
    return status_pb2.Status(
        code=code_pb2.FAILED_PRECONDITION,
        message=(
            f"request_id {request_id!r} was already used for a different request; "
            "use a new request_id for a new request"
        ),
        details=_pack(
            error_info("IDEMPOTENCY_KEY_REUSED", {"request_id": request_id}),
            error_details_pb2.PreconditionFailure(
                violations=[
                    error_details_pb2.PreconditionFailure.Violation(
                        type="IDEMPOTENCY_KEY",
                        subject=f"request_id:{request_id}",
                        description="the parameters differ from the first request with this key",
                    )
                ]
            ),
        ),
    )


def _retry_later(
    code: int, message: str, retry_after_ms: int, reason: str, metadata: Mapping[str, str] | None = None
) -> status_pb2.Status:
    """A status whose retry may succeed: ``RetryInfo`` with the delay, and ``ErrorInfo``."""
    delay = duration_pb2.Duration()
    delay.FromMilliseconds(retry_after_ms)
    return status_pb2.Status(
        code=code,
        message=message,
        details=_pack(error_details_pb2.RetryInfo(retry_delay=delay), error_info(reason, metadata)),
    )


def key_in_flux(request_id: str, retry_after_ms: int = 100) -> status_pb2.Status:
    """ABORTED with ``RetryInfo``: the request_id is held by a concurrent request past the
    lock timeout, or changed hands while we read it (it expired and was reaped between our
    write and our read); nothing was written, retrying with the same request_id is safe."""
    return _retry_later(
        code_pb2.ABORTED,
        f"request_id {request_id!r} was being reused concurrently; retry with the same request_id",
        retry_after_ms,
        "IDEMPOTENCY_KEY_IN_FLUX",
        {"request_id": request_id},
    )


def concurrent_change(message: str, retry_after_ms: int = 200) -> status_pb2.Status:
    """ABORTED with ``RetryInfo``: a row the request needs stayed locked by another
    change longer than the lock timeout (or a deadlock was broken). Nothing was
    written, so retrying with the same request_id is safe (AIP-193 maps
    concurrency conflicts to ABORTED)."""
    return _retry_later(code_pb2.ABORTED, message, retry_after_ms, "CONCURRENT_CHANGE")


def unavailable(message: str, retry_after_ms: int) -> status_pb2.Status:
    """UNAVAILABLE with ``RetryInfo`` (a dependency is down; retry with the same request_id)."""
    return _retry_later(code_pb2.UNAVAILABLE, message, retry_after_ms, "DEPENDENCY_UNAVAILABLE")


def already_exists(resource: str, name: str, message: str) -> status_pb2.Status:
    """ALREADY_EXISTS for ``resource`` ``name`` (e.g. a taken tenant name)."""
    return status_pb2.Status(
        code=code_pb2.ALREADY_EXISTS,
        message=message,
        details=_pack(error_details_pb2.ResourceInfo(resource_type=resource, resource_name=name)),
    )


def failed_precondition(reason: str, message: str) -> status_pb2.Status:
    """FAILED_PRECONDITION: the system is not in a state to do this (AIP-193 ``reason``)."""
    return status_pb2.Status(
        code=code_pb2.FAILED_PRECONDITION, message=message, details=_pack(error_info(reason))
    )


def rate_limited(retry_after_s: float, limit_per_s: int) -> status_pb2.Status:
    """RESOURCE_EXHAUSTED for a tenant over its rate limit, with ``RetryInfo`` and ``QuotaFailure``."""
    delay = duration_pb2.Duration()
    delay.FromMilliseconds(max(1, int(retry_after_s * 1000)) if retry_after_s != float("inf") else 3_600_000)
    return status_pb2.Status(
        code=code_pb2.RESOURCE_EXHAUSTED,
        message=f"rate limit of {limit_per_s} notifications per second exceeded; retry after the delay",
        details=_pack(
            error_details_pb2.RetryInfo(retry_delay=delay),
            error_details_pb2.QuotaFailure(
                violations=[
                    error_details_pb2.QuotaFailure.Violation(
                        subject="tenant", description=f"{limit_per_s} notifications per second"
                    )
                ]
            ),
            error_info("RATE_LIMITED", {"limit_per_second": str(limit_per_s)}),
        ),
    )
