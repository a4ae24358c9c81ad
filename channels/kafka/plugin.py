"""The Kafka channel as the poller finds it (entry point "kafka" of ``sqs_poller.channels``): its
options, its config from them, its check.

Imported for every ``poller run`` and ``--help``, so it imports no confluent-kafka: the config
and the channel are imported when the Kafka channel is chosen.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from channels.options import Option
from channels.plugin import BuildContext, ChannelPlugin, start_and_close

if TYPE_CHECKING:
    from channels.kafka.config import KafkaConfig

__all__ = ["CHANNEL", "OPTIONS"]

OPTIONS = (
    Option(flag="--kafka-bootstrap-servers", help="Kafka channel: host:port[,host:port...]."),
    Option(flag="--kafka-topic", help="Kafka channel: the topic."),
    Option(flag="--kafka-config", multiple=True, lines=True,
           help="Kafka channel: a librdkafka setting KEY=VALUE, repeatable (env: one per line)."),
    Option(flag="--kafka-format", run_only=True, choices=("binary", "structured", "raw"), default="binary",
           help="Kafka channel: CloudEvents binary or structured mode, or the raw body."),
    Option(flag="--kafka-key", run_only=True, default="group",
           help="Kafka channel: record key: group (FIFO MessageGroupId), attribute:NAME, or none."),
    Option(flag="--kafka-timestamp", run_only=True, choices=("now", "sent"), default="now",
           help="Kafka channel: record timestamp: the produce time, or SentTimestamp (a backlog older "
                "than the topic's retention.ms may be deleted by the broker at once)."),
    Option(flag="--kafka-auth", choices=("none", "tls", "scram-sha-512", "iam"), default="none",
           help="Kafka channel: authentication (iam needs the msk extra)."),
    Option(flag="--kafka-region", default_text="the queue's region",
           help="Kafka channel: the MSK cluster's region, for --kafka-auth iam."),
    Option(flag="--kafka-create-topic", kind=bool, help="Kafka channel: create the topic if it is missing."),
    Option(flag="--kafka-partitions", kind=int, low=1, high=100_000, default=3,
           help="Kafka channel: partitions of a created topic."),
    Option(flag="--kafka-replication", kind=int, low=1, high=100,
           default_text="the broker's default.replication.factor",
           help="Kafka channel: replication factor of a created topic."),
)


def _build(context: BuildContext) -> KafkaConfig:
    from channels.kafka.config import KafkaConfig, parse_kafka_config, parse_kafka_config_env

    values = context.values
    for name in ("kafka_bootstrap_servers", "kafka_topic"):
        if not values[name]:
            raise ValueError(f"the kafka channel needs --{name.replace('_', '-')}")
    items = values["kafka_config"]
    # From POLLER_KAFKA_CONFIG, one setting per line, and an error names the line, never the value.
    if "kafka_config" in context.from_environment:
        extra = parse_kafka_config_env("\n".join(items))
    else:
        extra = parse_kafka_config(items)
    return KafkaConfig(
        bootstrap_servers=values["kafka_bootstrap_servers"], topic=values["kafka_topic"],
        format=values["kafka_format"], data_mode=context.data_mode, key=values["kafka_key"],
        auth=values["kafka_auth"], timestamp=values["kafka_timestamp"], extra=extra,
        overrides=tuple(context.overrides.items()), shape=context.shape, create_topic=values["kafka_create_topic"],
        partitions=values["kafka_partitions"],
        # -1: the broker's own default (KIP-464); MSK's is 3 in three Availability Zones, 2 in two
        replication=-1 if values["kafka_replication"] is None else values["kafka_replication"],
        region=values["kafka_region"] or context.region, profile=context.profile,
    )


def _describe(config: KafkaConfig) -> str:
    return f"{config.bootstrap_servers} topic {config.topic}"


def _probe(config: KafkaConfig, source: str) -> tuple[str, str]:
    """The broker answers and the topic exists (or was created): the channel's own start."""
    start_and_close(config, source)
    return "kafka", f"{config.bootstrap_servers} answered; topic {config.topic!r} exists"


CHANNEL = ChannelPlugin(
    name="kafka", options=OPTIONS, build=_build,
    deadline="twice message.timeout.ms: a record may wait that long for room, then for the broker",
    describe=_describe, probe=_probe,
    # Each message is held linger.ms (config.DEFAULTS) and a replicated write longer than an HTTP
    # request: at one rate, more messages are held. At 200, held messages plus the room reserved
    # for 8 receives of 10 already reached the cap at ~1,600 msg/s with linger.ms 20 (the
    # in-flight gauge sampled every 0.1 s: median 120 held), so receives waited for room.
    # Interleaved drains into tansu, 2026-12-07, 20,000 messages each: 400 alone gave 2,554 vs
    # 2,346 msg/s at 59 vs 64 us/msg (medians of four); 400 with linger.ms 50 against 200 with
    # 20, four pairs: 58-71.5 vs 63-96 us/msg, less in three (the fourth: 64.5 vs 63).
    max_in_flight=400,
)
