"""MSK IAM authentication: the ``oauth_cb`` that signs a token with the AWS credentials."""

from __future__ import annotations

import logging
from typing import Any

from channels.base import ChannelError

__all__ = ["msk_oauth_callback"]

log = logging.getLogger("channels.kafka")


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split())
    text = text if len(text) <= limit else text[:limit] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class _MskToken:
    """confluent-kafka ``oauth_cb``: an MSK IAM token signed with the default AWS credentials.

    librdkafka swallows an exception raised here (it learns only that the refresh failed, and a
    client's constructor then says "OAuth token not set"), so the cause is logged here in one line
    (the traceback at DEBUG; the message of a credentials error holds no secret) and kept in
    ``last_error`` for start()'s error; then it is raised again, so librdkafka fails the refresh.
    """

    def __init__(self, region: str, provider: Any, profile: str | None = None) -> None:
        self.region = region
        self._provider = provider
        self._profile = profile
        self.last_error: str | None = None

    def __call__(self, _config: str) -> tuple[str, float]:
        try:
            if self._profile:
                token, expiry_ms = self._provider.generate_auth_token_from_profile(self.region, self._profile)
            else:
                token, expiry_ms = self._provider.generate_auth_token(self.region)
        except Exception as exc:
            cause = _one_line(exc)
            repeated = cause == self.last_error  # librdkafka retries the refresh every few seconds
            self.last_error = cause
            log.log(logging.DEBUG if repeated else logging.ERROR, "MSK IAM token for %s failed: %s", self.region, cause)
            log.debug("MSK IAM token failure", exc_info=True)
            raise
        self.last_error = None
        return token, expiry_ms / 1000.0  # librdkafka wants seconds since the epoch


def msk_oauth_callback(region: str, profile: str | None = None) -> _MskToken:
    """confluent-kafka ``oauth_cb`` that signs an MSK IAM token with the AWS credentials of
    ``profile``, else the default chain."""
    try:
        from aws_msk_iam_sasl_signer import MSKAuthTokenProvider
    except ImportError:
        raise ChannelError(
            "--kafka-auth iam needs the aws-msk-iam-sasl-signer-python package: install the msk extra "
            "(pip install '.[msk]' in a checkout)"
        ) from None
    return _MskToken(region, MSKAuthTokenProvider, profile)
