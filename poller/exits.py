"""The poller's exit codes, defined once: the CLI, the supervisor and the workers use these."""

from __future__ import annotations

__all__ = ["EXIT_BOOT", "EXIT_FAILED", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_USAGE"]

EXIT_OK = 0
EXIT_FAILED = 1  # a worker's channel or task broke: the supervisor replaces the process
EXIT_USAGE = 2  # bad flags or config (click's own code for usage errors)
# The poller (or one worker) cannot start: SQS or the channel is unusable. A worker exiting with
# it while the poller starts stops the supervisor instead of a restart loop (gunicorn's
# WORKER_BOOT_ERROR).
EXIT_BOOT = 3
EXIT_INTERRUPTED = 130  # Ctrl-C: 128 + SIGINT, as shells report it
