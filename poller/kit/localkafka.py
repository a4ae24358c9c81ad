"""A local Kafka-protocol broker for the tests and the benchmarks: tansu, via :func:`start_tansu`.

The binary comes from the install cache. Its memory engine forgets everything on restart; durable
Kafka for restart tests is tansu's ``s3://`` engine against LocalStack's S3::

    with start_sqs(services="sqs,s3") as ls:
        create_bucket(ls.endpoint, "tansu")
        with start_tansu(storage="s3://tansu/", env=tansu_s3_env(ls.endpoint)) as broker:
            ...  # broker.stop(); start_tansu(port=<same port>, storage=..., env=...) sees the old records
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping
from pathlib import Path

from poller.kit.installcache import tansu_binary
from poller.kit.process import (
    HOST,
    Launch,
    Service,
    ServiceError,
    clean_env,
    free_port,
    log_file,
    port_open,
    start_process,
)

__all__ = ["create_bucket", "start_tansu", "tansu_s3_env"]

log = logging.getLogger(__name__)

TANSU_START_TIMEOUT_S = 30.0


def start_tansu(
    *,
    port: int | None = None,
    storage: str = "memory://tansu/",
    env: Mapping[str, str] | None = None,
    cache_dir: Path | None = None,
    log_dir: Path | None = None,
    advertised: str | None = None,
) -> Service:
    """The tansu Kafka broker on 127.0.0.1; ``endpoint`` is the bootstrap ``"127.0.0.1:PORT"``.

    Calling again with the same ``port`` and ``storage`` after ``stop()`` restarts it; only the
    ``s3://`` engine keeps records across that (see :func:`tansu_s3_env`).

    ``advertised`` (``"host:port"``, default: the listener) is the address the broker tells
    clients to use; Kafka clients reconnect there, so a proxy in front of the broker needs it.
    """
    binary = tansu_binary(cache_dir)
    port = port or free_port()
    bootstrap = f"{HOST}:{port}"
    log.info("starting tansu on %s (storage %s%s)", bootstrap, storage,
             f", advertising {advertised}" if advertised else "")
    url = f"tcp://{bootstrap}"
    argv = (str(binary), "broker", "--listener-url", url,
            "--advertised-listener-url", f"tcp://{advertised}" if advertised else url,
            "--storage-engine", storage)
    environment = {**clean_env({"RUST_LOG": "warn", "NO_COLOR": "1"}), **(env or {})}

    def start_once() -> Service:
        cleanup: list[Callable[[], object]] = []
        launch = Launch("tansu", argv, bootstrap, log_file(log_dir, "tansu", port, cleanup), environment)
        return start_process(launch, lambda: port_open(HOST, port) and _kafka_metadata_ok(bootstrap),
                             TANSU_START_TIMEOUT_S, cleanup)

    # Twice at most: once in CI, tansu restarted after a SIGKILL on s3:// storage logged "ready"
    # and listened, yet answered no metadata request for 30 s. A second start is cheap.
    try:
        return start_once()
    except ServiceError as exc:
        log.warning("%s; starting tansu once more", exc)
    return start_once()


def _kafka_metadata_ok(bootstrap: str) -> bool:
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({
        "bootstrap.servers": bootstrap,
        "socket.timeout.ms": 2000,
        # confluent-kafka's type hints leave out its documented "logger" setting.
        "logger": logging.getLogger(f"{__name__}.librdkafka"),  # type: ignore[dict-item]
    })
    admin.list_topics(timeout=2)
    return True


def tansu_s3_env(
    s3_endpoint: str, *, region: str = "us-east-1", access_key: str = "test", secret_key: str = "test"
) -> dict[str, str]:
    """Environment for ``start_tansu(storage="s3://BUCKET/", env=...)`` against LocalStack/moto S3."""
    return {
        "AWS_ACCESS_KEY_ID": access_key,
        "AWS_SECRET_ACCESS_KEY": secret_key,
        "AWS_DEFAULT_REGION": region,
        "AWS_REGION": region,
        "AWS_ENDPOINT": s3_endpoint.rstrip("/"),
        "AWS_ALLOW_HTTP": "true",
    }


def create_bucket(s3_endpoint: str, bucket: str, *, region: str = "us-east-1") -> None:
    """Create the S3 bucket tansu's ``s3://`` engine stores in (test credentials); an existing one of ours is fine."""
    import boto3

    s3 = boto3.client(
        "s3", endpoint_url=s3_endpoint, region_name=region,
        aws_access_key_id="test", aws_secret_access_key="test",
    )
    with contextlib.suppress(s3.exceptions.BucketAlreadyOwnedByYou):
        s3.create_bucket(Bucket=bucket)
