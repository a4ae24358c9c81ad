"""One command-line option, declared once: flag, environment variable, default, range, help.

The poller's own options and every channel's are declared with this type, so a channel (a
built-in one or one from another distribution) declares its flags next to its code. The poller
turns the declarations into click options, range checks and the README's table
(``poller.options``); nothing here depends on click or on the poller.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["Option"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Option:
    flag: str
    help: str
    kind: type = str  # str, int, float or bool (a flag)
    default: Any = None
    default_text: str = ""  # for --help and the README when the default is not a plain value
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] = ()
    ignore_case: bool = False  # of the choices
    envvars: tuple[str, ...] = ()  # read too, after POLLER_<FLAG>
    multiple: bool = False
    required: bool = False
    channel: str | None = None  # only with this --channel (the registry sets it for a channel's options)
    dest: str = ""  # the parameter's name, if not the flag's
    lines: bool = False  # env var: one value per line (a value may contain spaces)
    metavar: str = ""  # the value's name in --help, if not the kind's
    # The poller's own options: the section of --help they are listed in; a channel's options are
    # listed under the channel, whatever this says.
    group: str = ""
    # Used by `poller run` only: `poller check` takes it (a run's flags can be checked as they
    # are) but does not list it in its --help.
    run_only: bool = False

    @property
    def name(self) -> str:
        return self.dest or self.flag[2:].replace("-", "_")

    @property
    def env(self) -> str:
        return "POLLER_" + self.flag[2:].upper().replace("-", "_")

    def check(self, value: Any) -> None:
        """ValueError in one line unless ``value`` is within this option's range."""
        if value is None or self.kind not in (int, float):
            return
        if value != value:  # NaN: every comparison below is False, so it would pass them all
            raise ValueError(f"{self.flag} must be a number, not {value}")
        if (self.low is not None and value < self.low) or (self.high is not None and value > self.high):
            if self.high is None:
                raise ValueError(f"{self.flag} must be at least {number_text(self.low)}, not {value}")
            raise ValueError(f"{self.flag} must be between {number_text(self.low)} and "
                             f"{number_text(self.high)}, not {value}")

    def shown_default(self) -> str:
        if self.default_text:
            return self.default_text
        if self.required:
            return "(required)"
        if self.kind is bool:
            return "off"
        if self.default is None:
            return ""
        return f"`{number_text(self.default)}`" if not isinstance(self.default, str) else f"`{self.default}`"


def number_text(value: Any) -> str:
    """A bound or default as people write it: 300, not 300.0."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)
