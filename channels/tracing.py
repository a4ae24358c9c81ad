"""Trace context for events: the CloudEvents distributed-tracing extension (``traceparent``,
``tracestate``, as W3C Trace Context writes them) from what SQS carries.

A message's own ``traceparent`` message attribute wins when it is valid (with its ``tracestate``,
if that is valid too); else SQS's ``AWSTraceHeader`` system attribute (X-Ray's header, set by
``SendMessage``'s ``MessageSystemAttributes`` or by AWS services with active tracing) becomes one:

    Root=1-5759e988-bd862e3fe1be46a994272793;Parent=53995c3f42cd8ad8;Sampled=1
    -> 00-5759e988bd862e3fe1be46a994272793-53995c3f42cd8ad8-01

(the X-Ray trace id without its version and dash is the W3C trace id; ``Sampled=1`` is the sampled
flag; ``0``, ``?`` or none leave it unset). An X-Ray header without a ``Parent`` has no span to
continue and gives nothing. An invalid ``traceparent`` attribute is dropped, never forwarded.
"""

from __future__ import annotations

import re

__all__ = ["traceparent_from_xray", "valid_traceparent", "valid_tracestate"]

_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-[\x21-\x7e]*)?")
_HEX = re.compile(r"[0-9a-f]+")
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16
# W3C Trace Context 3.3.1: list members key=value, at most 32, keys simple or tenant@system.
_MEMBER = re.compile(r"(?:[a-z][_0-9a-z*/-]{0,255}|[a-z0-9][_0-9a-z*/-]{0,240}@[a-z][_0-9a-z*/-]{0,13})"
                     r"=[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]")
_MAX_TRACESTATE = 512  # the length W3C asks vendors to propagate at least


def valid_traceparent(value: str) -> bool:
    """W3C Trace Context 3.2: version 00 exactly; a later version may append fields; ff is invalid."""
    match = _TRACEPARENT.fullmatch(value)
    if match is None:
        return False
    version, trace_id, span_id, _flags, rest = match.groups()
    if version == "ff" or (version == "00" and rest is not None):
        return False
    return trace_id != _ZERO_TRACE and span_id != _ZERO_SPAN


def valid_tracestate(value: str) -> bool:
    if len(value) > _MAX_TRACESTATE:
        return False
    members = [member.strip(" \t") for member in value.split(",")]
    present = [member for member in members if member]
    return 0 < len(present) <= 32 and all(_MEMBER.fullmatch(member) for member in present)


def traceparent_from_xray(header: str) -> str | None:
    """The ``traceparent`` of an X-Ray trace header, or None if it has no valid root and parent."""
    fields: dict[str, str] = {}
    for part in header.split(";"):
        key, _, value = part.partition("=")
        fields[key.strip()] = value.strip()
    root, parent = fields.get("Root", "").lower(), fields.get("Parent", "").lower()
    # Root=1-<8 hex: epoch seconds>-<24 hex>
    if len(root) != 35 or not root.startswith("1-") or root[10] != "-":
        return None
    trace_id = root[2:10] + root[11:]
    if not _HEX.fullmatch(trace_id) or trace_id == _ZERO_TRACE:
        return None
    if len(parent) != 16 or not _HEX.fullmatch(parent) or parent == _ZERO_SPAN:
        return None
    flags = "01" if fields.get("Sampled") == "1" else "00"
    return f"00-{trace_id}-{parent}-{flags}"
