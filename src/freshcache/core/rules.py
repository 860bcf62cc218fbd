"""The dependency map: which cached data a change invalidates, compiled against a KeySpace.

Rules are written in the specification's YAML form, plus an ``events`` section saying
which triggers each event type fires::

    product_update_triggers:
      - cache_keys:
        - "product:{tenantId}:{productId}"
        - "products:{tenantId}:*"
    events:
      product.updated: [product_update_triggers]

A pattern is ``:``-separated segments: a literal (written as the KeySpace escapes it), a
``{field}`` placeholder bound from the event at plan time, or ``*``. A ``*`` segment
matches any one segment; a trailing ``*`` matches one or more trailing segments.

Every pattern is compiled when the rules are loaded, against the declared key templates,
into the cheapest mechanism that covers every key it could match: an exact key delete
(the pattern fixes every field of a template), a tag purge or a namespace bump (a tag or
namespace of the template whose fields the pattern fixes; the one fixing most fields
wins, so that as few other keys as possible go with it). Nothing is ever found by scanning
the keyspace: a pattern that matches no template, or a matched template that no tag or
namespace covers, is a :class:`RuleError` at load time. Covering more keys than the
pattern names is allowed; covering fewer never is.
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from importlib import resources
from typing import Any, Literal, NamedTuple
from urllib.parse import unquote

import yaml

from freshcache.core.events import Event, InvalidEvent, is_event_type
from freshcache.core.keys import InvalidKeyPart, KeySpace, KeyTemplate, Pattern, escape_part
from freshcache.core.plan import InvalidationPlan

__all__ = [
    "MARKETPLACE_RULES",
    "CompiledPattern",
    "Constant",
    "Mechanism",
    "Placeholder",
    "RuleDescription",
    "RuleError",
    "RuleSet",
    "Target",
    "Trigger",
    "compile_pattern",
]

MARKETPLACE_RULES = resources.files("freshcache") / "rules" / "marketplace.yaml"
"""The shipped rules of the marketplace (the specification's two maps and ours), for
``RuleSet.from_yaml(MARKETPLACE_RULES.read_text(), commerce_keyspace())``."""

_PLACEHOLDER = re.compile(r"^\{([A-Za-z_][A-Za-z0-9_]*)\}$")
_EVENTS_SECTION = "events"


class RuleError(ValueError):
    """A rules file or pattern that cannot be compiled; the message names the pattern."""


class Mechanism(StrEnum):
    """How a target is invalidated."""

    DELETE_KEY = "delete key"
    PURGE_TAG = "purge tag"
    BUMP_NAMESPACE = "bump namespace"


@dataclass(frozen=True, slots=True)
class Placeholder:
    """A template field filled, at plan time, from the event field ``name``."""

    name: str


@dataclass(frozen=True, slots=True)
class Constant:
    """A template field fixed by the pattern to ``value`` (unescaped)."""

    value: str


Source = Placeholder | Constant


@dataclass(frozen=True, slots=True)
class _Segment:
    kind: Literal["literal", "placeholder", "wildcard"]
    text: str  # the escaped literal, the placeholder's field name, or "*"


@dataclass(frozen=True, slots=True)
class Target:
    """One invalidation a compiled pattern performs: a key, tag or namespace template
    with each of its fields filled from a placeholder or a constant."""

    mechanism: Mechanism
    template: Pattern
    sources: tuple[tuple[str, Source], ...]

    def describe(self, keyspace: KeySpace) -> str:
        """E.g. ``bump namespace products:{tenantId}``."""
        sources = dict(self.sources)
        rendered = []
        for is_field, name in self.template.segments:
            source = sources[name] if is_field else None
            if isinstance(source, Placeholder):
                rendered.append(f"{{{source.name}}}")
            elif isinstance(source, Constant):
                rendered.append(escape_part(name, source.value, keyspace.max_part_length))
            else:
                rendered.append(name)
        return f"{self.mechanism} {':'.join(rendered)}"

    def resolve(
        self, keyspace: KeySpace, values: Mapping[str, object], tenant: str | None
    ) -> InvalidationPlan:
        """The plan for these event values; ``tenant``, if given, is the only one allowed."""
        parts: dict[str, str | int] = {}
        for name, source in self.sources:
            if isinstance(source, Constant):
                parts[name] = source.value
                continue
            value = values[source.name]
            if isinstance(value, bool) or not isinstance(value, str | int):
                raise InvalidEvent(source.name, f"must be a string or an integer, got {value!r}")
            try:
                escape_part(source.name, value, keyspace.max_part_length)
            except InvalidKeyPart as error:
                raise InvalidEvent(source.name, str(error)) from None
            parts[name] = value
        scoped_to = parts.get(keyspace.tenant_field)
        if tenant is not None and scoped_to is not None and str(scoped_to) != tenant:
            raise InvalidEvent(
                "affectedCaches",
                f"{self.describe(keyspace)!r} addresses tenant {scoped_to!r}, "
                f"not the event's tenant {tenant!r}",
            )
        if self.mechanism is Mechanism.DELETE_KEY:
            return InvalidationPlan(keys=(keyspace[self.template.text](**parts),))
        if self.mechanism is Mechanism.PURGE_TAG:
            return InvalidationPlan(tags=(keyspace.tag(self.template.text, **parts),))
        return InvalidationPlan(namespaces=(keyspace.namespace(self.template.text, **parts),))


@dataclass(frozen=True, slots=True)
class CompiledPattern:
    """A pattern and the targets it compiled to."""

    text: str
    placeholders: tuple[str, ...]
    targets: tuple[Target, ...]
    keyspace: KeySpace = field(repr=False, compare=False)

    def describe(self) -> tuple[str, ...]:
        """One line per target, e.g. ``delete key product:{tenantId}:{productId}``."""
        return tuple(target.describe(self.keyspace) for target in self.targets)

    def plan(self, values: Mapping[str, object], *, tenant: str | None = None) -> InvalidationPlan:
        """The plan with placeholders bound from ``values`` (an event's bindings).

        A placeholder missing from ``values`` is an :class:`InvalidEvent`, never a
        wildcard. With ``tenant``, targets scoped to another tenant are refused too.
        """
        for name in self.placeholders:
            if name not in values:
                raise InvalidEvent(name, f"is missing; pattern {self.text!r} needs it")
        return InvalidationPlan.merge(
            *(target.resolve(self.keyspace, values, tenant) for target in self.targets)
        )


def compile_pattern(text: str, keyspace: KeySpace) -> CompiledPattern:
    """Compile one pattern against ``keyspace``; :class:`RuleError` if it cannot be covered.

    The pattern is matched against every declared key template; if it matches none and
    has no wildcard, it may name a declared tag template directly (``categories``).
    """
    segments = _parse(text, keyspace)
    targets: list[Target] = []
    for template in keyspace.templates:
        binding = _match(segments, template.pattern)
        if binding is not None:
            targets.append(_cover(text, template, binding))
    if not targets and all(segment.kind != "wildcard" for segment in segments):
        for tag in _declared_tags(keyspace):
            binding = _match(segments, tag)
            if binding is not None:
                targets.append(_target(Mechanism.PURGE_TAG, tag, binding))
    if not targets:
        raise RuleError(f"pattern {text!r} matches no declared key template or tag")
    placeholders = (s.text for s in segments if s.kind == "placeholder")
    return CompiledPattern(
        text=text,
        placeholders=tuple(dict.fromkeys(placeholders)),
        targets=tuple(dict.fromkeys(targets)),
        keyspace=keyspace,
    )


def _parse(text: str, keyspace: KeySpace) -> tuple[_Segment, ...]:
    segments: list[_Segment] = []
    for raw in text.split(":"):
        placeholder = _PLACEHOLDER.match(raw)
        if raw == "*":
            segments.append(_Segment("wildcard", raw))
        elif placeholder:
            segments.append(_Segment("placeholder", placeholder.group(1)))
        elif not raw:
            raise RuleError(f"pattern {text!r} has an empty segment")
        elif any(char in raw for char in "*{}"):
            raise RuleError(
                f"pattern {text!r}: segment {raw!r} mixes text with * or {{field}}; "
                "each must be a whole segment"
            )
        else:
            try:
                canonical = escape_part("segment", unquote(raw), keyspace.max_part_length)
            except InvalidKeyPart as error:
                raise RuleError(f"pattern {text!r}: {error}") from None
            if canonical != raw:
                raise RuleError(
                    f"pattern {text!r}: segment {raw!r} must be written as the KeySpace "
                    f"escapes it ({canonical!r})"
                )
            segments.append(_Segment("literal", raw))
    if segments[0].kind != "literal":
        raise RuleError(f"pattern {text!r} must start with a literal segment")
    return tuple(segments)


def _match(segments: tuple[_Segment, ...], template: Pattern) -> dict[str, Source] | None:
    """The template fields the pattern fixes, or None if no key of it can match."""
    head = segments
    if segments[-1].kind == "wildcard":
        head = segments[:-1]
        if len(template.segments) <= len(head):
            return None
    elif len(template.segments) != len(segments):
        return None
    binding: dict[str, Source] = {}
    for segment, (is_field, name) in zip(head, template.segments[: len(head)], strict=True):
        if segment.kind == "literal":
            if is_field:
                binding[name] = Constant(unquote(segment.text))
            elif name != segment.text:
                return None
        elif segment.kind == "placeholder" and is_field:
            binding[name] = Placeholder(segment.text)
        # A placeholder over a literal segment matches only when the event's value equals
        # that literal; treating it as a match regardless over-invalidates, never under.
    return binding


def _cover(text: str, template: KeyTemplate, binding: dict[str, Source]) -> Target:
    if set(template.pattern.fields) <= binding.keys():
        return _target(Mechanism.DELETE_KEY, template.pattern, binding)
    candidates = [(Mechanism.PURGE_TAG, tag) for tag in template.tag_patterns]
    if template.namespace_pattern is not None:
        candidates.append((Mechanism.BUMP_NAMESPACE, template.namespace_pattern))
    usable = [(mechanism, p) for mechanism, p in candidates if set(p.fields) <= binding.keys()]
    if not usable:
        needs = "; ".join(
            f"{mechanism} {p.text} needs {', '.join(p.fields)}" for mechanism, p in candidates
        )
        fixed = f"only {', '.join(binding)}" if binding else "none of its fields"
        raise RuleError(
            f"pattern {text!r} matches key template {template.name!r} but fixes {fixed}, "
            f"which renders none of its tags or namespace ({needs or 'it declares none'})"
        )
    # The most fields fixed is the narrowest purge; on a tie a bump is O(1).
    mechanism, chosen = max(
        usable, key=lambda item: (len(item[1].fields), item[0] is Mechanism.BUMP_NAMESPACE)
    )
    return _target(mechanism, chosen, binding)


def _target(mechanism: Mechanism, template: Pattern, binding: Mapping[str, Source]) -> Target:
    return Target(mechanism, template, tuple((name, binding[name]) for name in template.fields))


def _declared_tags(keyspace: KeySpace) -> tuple[Pattern, ...]:
    tags = {tag.text: tag for template in keyspace.templates for tag in template.tag_patterns}
    return tuple(tags.values())


class RuleDescription(NamedTuple):
    """One row of :meth:`RuleSet.describe`."""

    trigger: str
    pattern: str
    compiled_to: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Trigger:
    """A named group of patterns (``product_update_triggers``)."""

    name: str
    patterns: tuple[CompiledPattern, ...]


@dataclass(frozen=True, eq=False)
class RuleSet:
    """Compiled rules: triggers, and the triggers each event type fires.

    Build it with :meth:`from_yaml` or :meth:`from_mapping`; both compile every pattern
    and raise :class:`RuleError` on the first one that cannot be covered.
    """

    keyspace: KeySpace
    triggers: Mapping[str, Trigger]
    events: Mapping[str, tuple[str, ...]]

    @classmethod
    def from_yaml(cls, text: str, keyspace: KeySpace) -> RuleSet:
        """Load rules from YAML text (the caller reads the file)."""
        try:
            document = yaml.load(text, Loader=_UniqueKeyLoader)
        except yaml.YAMLError as error:
            raise RuleError(f"rules are not valid YAML: {error}") from None
        return cls.from_mapping(document, keyspace)

    @classmethod
    def from_mapping(cls, document: object, keyspace: KeySpace) -> RuleSet:
        """Load rules from an already decoded document."""
        if not isinstance(document, Mapping):
            raise RuleError("rules must be a mapping of trigger names (and 'events')")
        triggers: dict[str, Trigger] = {}
        events: dict[str, tuple[str, ...]] = {}
        for name, body in document.items():
            if not isinstance(name, str):
                raise RuleError(f"trigger names must be strings, got {name!r}")
            if name == _EVENTS_SECTION:
                events = _parse_events(body)
            else:
                triggers[name] = _parse_trigger(name, body, keyspace)
        for event_type, names in events.items():
            for name in names:
                if name not in triggers:
                    raise RuleError(f"events: {event_type} fires {name!r}, which is not defined")
        return cls(keyspace=keyspace, triggers=triggers, events=events)

    @property
    def unused_triggers(self) -> tuple[str, ...]:
        """Triggers that no event type fires."""
        fired = {name for names in self.events.values() for name in names}
        return tuple(name for name in self.triggers if name not in fired)

    def plan(self, event: Event) -> InvalidationPlan:
        """What ``event`` invalidates: its type's triggers plus its ``affectedCaches``.

        Raises :class:`InvalidEvent` when the event cannot be planned (its type has no
        rules, a placeholder's field is missing or unusable, an ``affectedCaches`` entry
        does not compile or addresses another tenant); the caller dead-letters it.
        """
        names = self.events.get(event.event_type)
        if names is None:
            raise InvalidEvent(
                "eventType",
                f"{event.event_type!r} has no entry in the rules' events section "
                "(map it to [] to apply only its affectedCaches)",
            )
        values = event.bindings
        plans: list[InvalidationPlan] = []
        for name in names:
            for pattern in self.triggers[name].patterns:
                try:
                    plans.append(pattern.plan(values))
                except InvalidEvent as error:
                    raise InvalidEvent(error.field, f"{error.problem} (in {name})") from None
        for entry in event.affected_caches:
            try:
                compiled = compile_pattern(entry, self.keyspace)
                plans.append(compiled.plan(values, tenant=event.tenant_id))
            except RuleError as error:
                raise InvalidEvent("affectedCaches", str(error)) from None
            except InvalidEvent as error:
                problem = f"{error.problem} (in affectedCaches entry {entry!r})"
                raise InvalidEvent(error.field, problem) from None
        return InvalidationPlan.merge(*plans)

    def describe(self) -> tuple[RuleDescription, ...]:
        """Each pattern of each trigger and what it compiled to."""
        return tuple(
            RuleDescription(trigger.name, pattern.text, pattern.describe())
            for trigger in self.triggers.values()
            for pattern in trigger.patterns
        )


def _parse_trigger(name: str, body: object, keyspace: KeySpace) -> Trigger:
    if not isinstance(body, list):
        raise RuleError(f"{name}: must be a list of '- cache_keys: [...]' entries")
    patterns: list[CompiledPattern] = []
    for index, entry in enumerate(body):
        where = f"{name}[{index}]"
        if not isinstance(entry, Mapping) or "cache_keys" not in entry:
            raise RuleError(f"{where}: must be a mapping with a 'cache_keys' list")
        unknown = sorted(str(key) for key in entry if key != "cache_keys")
        if unknown:
            raise RuleError(f"{where}: unknown entries {unknown}")
        cache_keys = entry["cache_keys"]
        if not isinstance(cache_keys, list):
            raise RuleError(f"{where}.cache_keys: must be a list of patterns")
        for text in cache_keys:
            if not isinstance(text, str):
                raise RuleError(f"{where}.cache_keys: patterns must be strings, got {text!r}")
            try:
                patterns.append(compile_pattern(text, keyspace))
            except RuleError as error:
                raise RuleError(f"{name}: {error}") from None
    return Trigger(name, tuple(patterns))


def _parse_events(body: object) -> dict[str, tuple[str, ...]]:
    if not isinstance(body, Mapping):
        raise RuleError("events: must map event types to lists of trigger names")
    events: dict[str, tuple[str, ...]] = {}
    for event_type, names in body.items():
        if not is_event_type(event_type):
            raise RuleError(f"events: {event_type!r} is not an event type like 'product.updated'")
        if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
            raise RuleError(f"events: {event_type} must list trigger names ([] for none)")
        events[event_type] = tuple(names)
    return events


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that refuses duplicate keys, which YAML would silently collapse
    (dropping, say, the first of two ``product_update_triggers`` blocks)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        seen: set[Hashable] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):
                continue  # the base class reports unhashable keys
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)
