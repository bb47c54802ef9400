"""Idempotency keys (AIP-155 ``request_id``) with Stripe's semantics: what makes two calls
"the same request", and how an answer is stored so that a retry replays it, error included.

Shared by the payment mutations (payments/store.py) and the admin API
(gateway/admin_idempotency.py). Notifications keep their own fingerprint
(:func:`gateway.write_path.request_fingerprint`, no method prefix): changing it would make
keys stored before an upgrade mismatch their retries.
"""

from __future__ import annotations

import hashlib
from typing import TypeVar

from google.protobuf import any_pb2
from google.protobuf.message import Message
from google.rpc import code_pb2, status_pb2

M = TypeVar("M", bound=Message)


def request_fingerprint(method: str, request: Message) -> bytes:
    """SHA-256 over the method name and the deterministic protobuf encoding of ``request``.

    Two calls are "the same request" for idempotency when this is equal: same
    method, same field values (field order and map order do not matter).
    """
    digest = hashlib.sha256(method.encode("ascii") + b"\n")
    digest.update(request.SerializeToString(deterministic=True))
    return digest.digest()


def encode_outcome(outcome: Message) -> bytes:
    """The stored form of an answer: a ``google.rpc.Status``; OK with the response packed
    as its only detail, or the error itself."""
    if isinstance(outcome, status_pb2.Status):
        return outcome.SerializeToString()
    packed = any_pb2.Any()
    packed.Pack(outcome)
    return status_pb2.Status(code=code_pb2.OK, details=[packed]).SerializeToString()


def decode_outcome(data: bytes, response_type: type[M]) -> M | status_pb2.Status:
    """Inverse of :func:`encode_outcome`: the response (``response_type``) or the error.

    Raises ``ValueError`` when the record holds another method's response.
    """
    status = status_pb2.Status.FromString(data)
    if status.code != code_pb2.OK:
        return status
    response = response_type()
    if len(status.details) != 1 or not status.details[0].Unpack(response):
        raise ValueError(f"stored answer is not a {response_type.DESCRIPTOR.full_name}")
    return response
