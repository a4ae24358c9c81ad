"""The poller's exit codes, for every process of it (the CLI, the supervisor, a worker)."""

from __future__ import annotations

__all__ = ["EXIT_BOOT", "EXIT_FAILED", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_USAGE"]

EXIT_OK = 0
# A worker: the channel or a task broke, and a new process fixes it (the supervisor replaces it).
EXIT_FAILED = 1
EXIT_USAGE = 2  # a bad flag, config value or URL: one line says which
# Cannot start: a start check failed (credentials, the queue, the channel's sink or broker). From
# a worker: its channel did not start; the supervisor stops the poller with it while starting.
EXIT_BOOT = 3
EXIT_INTERRUPTED = 130  # SIGINT before the poller was running (128 + SIGINT, the shell's convention)
