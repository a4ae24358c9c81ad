"""When to add a worker and when to retire one (``--processes auto``): a small policy the
supervisor asks once per turn, with what the workers published. No clock, no processes: the
supervisor passes the time and the numbers, and does what the answer says.

Like Celery's autoscaler (``--autoscale=max,min``, a keepalive before scaling down) with the
signal changed: Celery counts reserved tasks; a worker here is one event loop, so what says
"another worker would help" is its CPU: a worker near a whole core while a backlog waits.

- **Up** (+1, at most ``maximum``): for ``sustain`` seconds, the workers used on average at least
  ``busy`` of a core each over the last ``window`` seconds and a backlog waited (receives came
  back full, or a worker held ``--max-in-flight``), and the machine has ``spare`` CPU for one
  more (a worker on a core that is already taken only adds contention: measured here, a second
  worker on 2 cores shared with LocalStack cost 1.5x the CPU per message for a lower rate).
- **Trial**: ``trial`` seconds after an up, if a backlog still waits, the poller's acknowledged
  rate must be ``gain`` times the rate before it, else the new worker is retired and no up is
  tried for ``retry_after`` seconds (doubled per failed trial, up to ``retry_max``): whatever the
  CPU numbers say, a worker that does not add throughput only adds cost. With the backlog gone by
  then (a burst cleared), the trial has nothing to judge: the down rule decides.
- **Down** (-1, never below ``minimum``): for ``keepalive`` seconds, and at least ``keepalive``
  after the last up, the workers' CPU in all fitted in one fewer worker at ``fits`` of a core
  each. ``fits`` well below ``busy`` is the hysteresis: the load that made an up leaves too much
  for n - 1 workers to ask for the down that would undo it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Autoscaler", "Decision", "Load", "Policy", "WorkerLoad"]


@dataclass(frozen=True, slots=True)
class Policy:
    busy: float = 0.85          # of a core: a worker this busy is saturated (Python runs one core a process)
    fits: float = 0.6           # of a core per worker: the load of n workers fits in n - 1 below this
    window: float = 5.0         # seconds the CPU shares and the backlog are measured over
    sustain: float = 5.0        # seconds the workers must stay saturated before an up
    keepalive: float = 30.0     # seconds the load must fit in fewer workers before a down (Celery's)
    spare: float = 0.5          # CPUs idle on the machine (and under the quota) that an up needs
    trial: float = 20.0         # seconds after an up at which its gain is judged
    gain: float = 1.1           # the rate an up must bring, times the rate before it
    retry_after: float = 60.0   # seconds without ups after a trial failed (doubled each time)
    retry_max: float = 900.0


@dataclass(frozen=True, slots=True)
class WorkerLoad:
    """One running worker's published numbers at one moment (running totals since it started)."""

    key: tuple[int, int]  # (slot, pid): a restarted worker starts its totals again
    cpu: float            # seconds of CPU the worker process used
    receives: int         # ReceiveMessage calls that returned
    received: int         # messages they brought
    in_flight: int        # held now


@dataclass(frozen=True, slots=True)
class Load:
    """What the supervisor saw on one turn."""

    now: float
    active: int                     # workers wanted (running, starting or being respawned)
    workers: Sequence[WorkerLoad]   # the running ones that have started their channel
    acked: int                      # the poller's acknowledged messages, in all
    idle_cpu: float | None = None   # seconds the machine's CPUs were idle, in all (None: unknown)
    used_cpu: float | None = None   # seconds of CPU the container used, in all (None: unknown)


@dataclass(frozen=True, slots=True)
class Decision:
    change: int  # +1: add a worker; -1: retire the newest; 0: nothing
    reason: str  # for the log; "" when there is nothing to say


_NOTHING = Decision(0, "")


class Autoscaler:
    """Decides from the history of ``Load`` it is given; one instance per supervisor."""

    def __init__(self, minimum: int, maximum: int, *, batch_size: int, max_in_flight: int,
                 quota: float | None = None, policy: Policy = Policy()) -> None:
        if not 1 <= minimum <= maximum:
            raise ValueError(f"autoscale bounds must be 1 <= min <= max, not {minimum}, {maximum}")
        self.minimum, self.maximum = minimum, maximum
        self.policy = policy
        self._full = max(1, int(batch_size * 0.8))  # a receive this full: more messages waited
        self._held_full = max_in_flight - batch_size  # a worker holding this much stops receiving
        self._quota = quota
        self._history: dict[tuple[int, int], deque[tuple[float, WorkerLoad]]] = {}
        self._machine: deque[tuple[float, float | None, float | None, int]] = deque()
        self._hot_since: float | None = None
        self._fits_since: float | None = None
        self._held_logged = False
        self._last_change: float | None = None
        self._trial: tuple[float | None, float] | None = None  # (judged at, once the new worker runs; rate before)
        self._no_up_until = 0.0
        self._retry_after = policy.retry_after

    def turn(self, load: Load) -> Decision:
        """Record this turn's numbers and say what to do now."""
        self._record(load)
        now, policy = load.now, self.policy
        shares = [s for s in (self._share(k) for k in self._history) if s is not None]
        starting = len(shares) < load.active  # a worker is starting (or restarting): its share is not known yet
        if self._trial is not None and self._trial[0] is None and not starting:
            self._trial = (now + policy.trial, self._trial[1])  # the trial counts from the new worker's first window
        if self._trial is not None and self._trial[0] is not None and now >= self._trial[0]:
            _, before = self._trial
            self._trial = None
            after = self._rate(now, policy.window * 2)
            # Judged only while a backlog still waits: a burst the added worker helped clear is a
            # lower rate now, not a worker that did not help (the load-fits rule retires it later).
            if after is not None and after < before * policy.gain and load.active > self.minimum and self._backlog():
                self._no_up_until = now + self._retry_after
                waited, self._retry_after = self._retry_after, min(policy.retry_max, self._retry_after * 2)
                return self._down(now, f"the worker added did not raise the rate ({before:,.0f} -> {after:,.0f} "
                                       f"msg/s); no new one for {waited:.0f}s")
            self._retry_after = policy.retry_after
        if not shares or starting:
            self._hot_since = self._fits_since = None
            return _NOTHING
        total = sum(shares)
        mean = total / len(shares)
        backlog = self._backlog()
        if mean >= policy.busy and backlog:
            self._fits_since = None
            self._hot_since = now if self._hot_since is None else self._hot_since
            if now - self._hot_since < policy.sustain or load.active >= self.maximum or self._trial is not None:
                return _NOTHING
            why = f"workers at {mean:.2f} of a core each for {now - self._hot_since:.0f}s and {backlog}"
            if now < self._no_up_until:
                return self._hold(f"not adding a worker ({why}): a recent one did not raise the rate")
            spare = self._spare()
            if spare is not None and spare < policy.spare:
                return self._hold(f"not adding a worker ({why}): only {spare:.2f} CPU spare on the machine")
            rate = self._rate(now, policy.window * 2) or 0.0
            self._hot_since = None
            self._last_change = now
            self._trial = (None, rate)
            self._held_logged = False
            spare_text = "" if spare is None else f"; {spare:.2f} CPU spare"
            return Decision(1, why + spare_text)
        self._hot_since = None
        self._held_logged = False
        if load.active > self.minimum and total <= policy.fits * (load.active - 1):
            self._fits_since = now if self._fits_since is None else self._fits_since
            settled = self._last_change is None or now - self._last_change >= policy.keepalive
            if now - self._fits_since >= policy.keepalive and settled and self._trial is None:
                return self._down(now, f"the load fits in {load.active - 1} worker(s): {total:.2f} of a core "
                                       f"in all for {now - self._fits_since:.0f}s")
        else:
            self._fits_since = None
        return _NOTHING

    # -- history ---------------------------------------------------------------------------

    def _record(self, load: Load) -> None:
        keep = load.now - self.policy.window * 2 - 1.0  # what _window and _rate look at
        seen = set()
        for worker in load.workers:
            seen.add(worker.key)
            history = self._history.setdefault(worker.key, deque())
            history.append((load.now, worker))
            while len(history) > 2 and history[0][0] < keep:
                history.popleft()
        for key in [k for k in self._history if k not in seen]:  # gone: exited, retired or restarted
            del self._history[key]
        self._machine.append((load.now, load.idle_cpu, load.used_cpu, load.acked))
        while len(self._machine) > 2 and self._machine[0][0] < keep:
            self._machine.popleft()

    def _window(self, history: deque[tuple[float, WorkerLoad]]) -> tuple[WorkerLoad, WorkerLoad, float] | None:
        """The newest sample at least a window old (else the oldest), the newest, and the seconds
        between them."""
        if len(history) < 2:
            return None
        end_time, end = history[-1]
        start_time, start = history[0]
        for t, sample in history:
            if end_time - t < self.policy.window:
                break
            start_time, start = t, sample
        span = end_time - start_time
        return (start, end, span) if span >= self.policy.window * 0.6 else None

    def _share(self, key: tuple[int, int]) -> float | None:
        measured = self._window(self._history[key])
        if measured is None:
            return None
        start, end, span = measured
        return (end.cpu - start.cpu) / span

    def _backlog(self) -> str:
        """Why a backlog waits, or "": a worker's receives came back full or it held its most."""
        for history in self._history.values():
            measured = self._window(history)
            if measured is None:
                continue
            start, end, _ = measured
            receives = end.receives - start.receives
            if receives and (end.received - start.received) >= receives * self._full:
                return "receives come back full"
            if end.in_flight >= self._held_full:
                return "a worker holds --max-in-flight"
        return ""

    def _rate(self, now: float, seconds: float) -> float | None:
        """The acknowledged rate over the last ``seconds`` (None: too little history)."""
        start = next(((t, a) for t, _, _, a in self._machine if now - t <= seconds), None)
        if start is None or now - start[0] < seconds * 0.6:
            return None
        return (self._machine[-1][3] - start[1]) / (now - start[0])

    def _spare(self) -> float | None:
        """CPUs idle over the window: on the machine, and under the container's quota."""
        now = self._machine[-1][0]
        start = next(((t, i, u) for t, i, u, _ in self._machine if now - t <= self.policy.window), None)
        if start is None or now - start[0] <= 0:
            return None
        span = now - start[0]
        _, idle, used, _ = self._machine[-1]
        spare = []
        if idle is not None and start[1] is not None:
            spare.append((idle - start[1]) / span)
        if self._quota is not None and used is not None and start[2] is not None:
            spare.append(self._quota - (used - start[2]) / span)
        return min(spare) if spare else None

    # -- decisions -------------------------------------------------------------------------

    def _down(self, now: float, reason: str) -> Decision:
        self._fits_since = self._hot_since = None
        self._trial = None
        self._last_change = now  # a down waits a keepalive too before the next down
        return Decision(-1, reason)

    def _hold(self, reason: str) -> Decision:
        """Say why an up waits once per stretch of saturation, not every turn."""
        if self._held_logged:
            return _NOTHING
        self._held_logged = True
        return Decision(0, reason)
