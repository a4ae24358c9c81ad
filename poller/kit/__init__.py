"""The local kit: what runs the poller on a laptop or in the tests, never in production.

- ``services``: starts LocalStack (or moto) SQS and a tansu Kafka broker on 127.0.0.1, no Docker;
- ``demo``: ``poller demo``, the whole flow on embedded defaults;
- ``cehttp``: the small CloudEvents HTTP server both local sinks are built on;
- ``inmemory``: ``poller channel``, a Knative-style in-memory channel (fan-out to subscribers);
- ``dumper``: ``poller dump``, a sink that prints every event it receives.

The runtime path (``poller.worker``, ``poller.sqs``, ``channels``) imports nothing from here.
"""
