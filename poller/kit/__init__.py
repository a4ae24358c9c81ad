"""The local kit: what runs the poller on a laptop or in the tests, never in production.

- ``localsqs``: starts a local SQS on 127.0.0.1 (LocalStack in Docker or on the host, or moto);
- ``localkafka``: starts the tansu Kafka broker on 127.0.0.1;
- ``process``: what both start with: a child process stopped by pid, waited on until ready;
- ``installcache``: installs LocalStack's Python 3.13 venv and tansu once, into ``~/.cache``;
- ``demo``: ``poller demo``, the whole flow on embedded defaults;
- ``cehttp``: the small CloudEvents HTTP server both local sinks are built on;
- ``inmemory``: ``poller channel``, a Knative-style in-memory channel (fan-out to subscribers);
- ``dumper``: ``poller dump``, a sink that prints every event it receives.

The runtime path (``poller.worker``, ``poller.sqs``, ``channels``) imports nothing from here.
"""
