"""The installed channels: every ``ChannelPlugin`` registered under the entry-point group
``sqs_poller.channels``, checked once.

A plugin that cannot be used is not a traceback: it is left out, with one line saying why
(``Registry.problems``), which the poller shows as an error if that channel is chosen and as a
warning otherwise. Unusable: it does not import, is not a ``ChannelPlugin``, its name is not its
entry point's, or it clashes with what is there already: a channel of the same name from another
distribution (both are left out, unless one is the poller's own: that one stays), or a flag,
parameter or environment variable that the poller or another channel has.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from importlib.metadata import EntryPoint, entry_points

from channels.options import Option
from channels.plugin import ChannelPlugin

__all__ = ["BUILTIN", "DISTRIBUTION", "GROUP", "Registry", "load_channels"]

GROUP = "sqs_poller.channels"
DISTRIBUTION = "sqs-cloudevents-poller"
# The poller's own channels, as its pyproject.toml registers them (a test holds the two equal).
# Used when its own distribution's entry points are not there: a source tree on PYTHONPATH, an
# editable install made before the entry points existed.
BUILTIN = {"http": "channels.http:CHANNEL", "kafka": "channels.kafka.plugin:CHANNEL"}
_NAME = re.compile(r"[a-z][a-z0-9_-]{0,31}")


@dataclass(frozen=True, slots=True)
class Registry:
    channels: Mapping[str, ChannelPlugin]  # usable, the poller's own first, then by name
    problems: Mapping[str, str]  # a channel that cannot be used -> why, in one line
    builtin: frozenset[str] = frozenset()  # names of the poller's own channels
    ignored: tuple[str, ...] = ()  # another distribution's channel named as one of the poller's own

    def warnings(self) -> tuple[str, ...]:
        """One line per channel that is installed but cannot be used."""
        return (*self.ignored, *self.problems.values())

    def names(self) -> tuple[str, ...]:
        """Every name ``--channel`` takes: a broken channel too, so choosing it says why."""
        return (*self.channels, *(n for n in sorted(self.problems) if n not in self.channels))

    def options(self) -> tuple[Option, ...]:
        return tuple(o for plugin in self.channels.values() for o in plugin.options)

    def get(self, name: str) -> ChannelPlugin:
        """The channel called ``name``; LookupError (one line) if it cannot be used."""
        if name in self.channels:
            return self.channels[name]
        if name in self.problems:
            raise LookupError(self.problems[name])
        raise LookupError(f"no channel {name!r} is installed (installed: {', '.join(self.channels) or 'none'})")

    def own(self) -> Registry:
        """Only the poller's own channels (the README's table does not depend on what is installed)."""
        return Registry({n: p for n, p in self.channels.items() if n in self.builtin}, {}, self.builtin, ())


def load_channels(reserved: Sequence[Option] = (), found: Iterable[EntryPoint] | None = None) -> Registry:
    """Every channel registered under ``GROUP``; ``reserved``: the poller's own options, whose
    flags, parameter names and environment variables no channel may take."""
    points = list(entry_points(group=GROUP) if found is None else found)
    own = [p for p in points if _distribution(p) == DISTRIBUTION]
    if not own:
        own = [EntryPoint(name, value, GROUP) for name, value in BUILTIN.items()]
    others = sorted((p for p in points if _distribution(p) != DISTRIBUTION), key=lambda p: (p.name, p.value))
    problems: dict[str, str] = {}
    ignored: list[str] = []
    builtin = frozenset(p.name for p in own)
    by_name: dict[str, list[EntryPoint]] = {}
    for point in others:
        by_name.setdefault(point.name, []).append(point)
    for name, same in by_name.items():
        if name in builtin:
            ignored.extend(f"channel {name!r} of {_origin(p)} is ignored: {name} is the poller's own channel"
                           for p in same)
        elif len(same) > 1:
            problems[name] = (f"channel {name!r} is registered by {' and '.join(_origin(p) for p in same)}: "
                              "uninstall one of them")
    taken = _Taken(reserved)
    channels: dict[str, ChannelPlugin] = {}
    for point in (*own, *(same[0] for name, same in by_name.items() if len(same) == 1 and name not in builtin)):
        try:
            plugin = _load(point)
            plugin = replace(plugin, options=tuple(replace(o, channel=plugin.name) for o in plugin.options))
            taken.claim(plugin)
        except _Unusable as exc:
            problems[point.name] = f"channel {point.name!r} of {_origin(point)} cannot be used: {exc}"
            continue
        channels[plugin.name] = plugin
    return Registry(channels, problems, builtin & frozenset(channels), tuple(ignored))


class _Unusable(Exception):
    pass


def _load(point: EntryPoint) -> ChannelPlugin:
    if not _NAME.fullmatch(point.name):
        raise _Unusable("a channel's name is lower-case letters, digits, '-' and '_', starting with a letter")
    try:
        plugin = point.load()
    except Exception as exc:  # noqa: BLE001 - anything a third party's import may raise: one line, not a traceback
        raise _Unusable(f"cannot import {point.value}: {type(exc).__name__}: {_first_line(exc)}") from None
    if not isinstance(plugin, ChannelPlugin):
        raise _Unusable(f"{point.value} is a {type(plugin).__name__}, not a channels.plugin.ChannelPlugin")
    if plugin.name != point.name:
        raise _Unusable(f"{point.value} is named {plugin.name!r}, not {point.name!r} as its entry point")
    for o in plugin.options:
        if not isinstance(o, Option) or not o.flag.startswith("--"):
            raise _Unusable(f"its option {o!r} is not a channels.options.Option with a --flag")
    return plugin


class _Taken:
    """The flags, parameter names and environment variables in use so far, and by whom."""

    def __init__(self, reserved: Sequence[Option]) -> None:
        self._owner: dict[str, str] = {}
        for o in reserved:
            for key in _keys(o):
                self._owner[key] = "the poller"

    def claim(self, plugin: ChannelPlugin) -> None:
        mine: set[str] = set()
        for o in plugin.options:
            for key in _keys(o):
                if key in self._owner or key in mine:
                    owner = self._owner.get(key, "another of its options")
                    raise _Unusable(f"its {o.flag} takes {key}, which {owner} has already")
                mine.add(key)
        for key in mine:
            self._owner[key] = f"the {plugin.name} channel"


def _keys(o: Option) -> tuple[str, ...]:
    return (o.flag, f"parameter {o.name}", o.env, *o.envvars)


def _distribution(point: EntryPoint) -> str | None:
    if point.dist is None:
        return None
    return re.sub(r"[-_.]+", "-", point.dist.name).lower()  # PEP 503: sqs_cloudevents_poller is us too


def _origin(point: EntryPoint) -> str:
    return f"{point.dist.name} {point.dist.version}" if point.dist is not None else point.value


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "(no message)"
