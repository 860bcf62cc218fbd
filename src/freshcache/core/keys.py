"""Declared key templates, tenant scoping and the escaping that keeps tenants apart.

Every cached value has a logical key rendered from a declared template such as
``product:{tenantId}:{productId}``. A template declares its TTL tier, the tags its keys
carry (for purges by tag) and optionally a namespace (a segment prefix of the template
whose generation can be bumped in O(1), the specification's "cache versioning").

Parts are validated and percent-escaped, so no input can contain a ``:`` or a brace and
shift into another segment, another template or another tenant. Templates are checked
against each other when declared: two templates that could render the same string are
refused, so a logical key identifies its template and parts exactly.

Physical keys carry a Redis Cluster hash tag (``{...}``): the namespace when the template
has one (so an entry, its lease and its namespace generation share one slot), otherwise the
whole logical key.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from urllib.parse import quote

from freshcache.core.policy import Tier, tier

__all__ = [
    "CacheKey",
    "InvalidKeyPart",
    "KeySpace",
    "KeyTemplate",
    "Namespace",
    "Pattern",
    "Tag",
    "TemplateError",
    "commerce_keyspace",
    "lease_key",
]

_FIELD = re.compile(r"^\{([A-Za-z_][A-Za-z0-9_]*)\}$")
_LITERAL = re.compile(r"^[A-Za-z0-9_.\-]+$")
_PREFIX = re.compile(r"^[A-Za-z0-9_.\-:]*$")
# Unreserved characters stay as they are; everything else is percent-encoded, ``%``
# included, so escaping is injective and never yields ``:``, ``*``, braces or spaces.
_SAFE = "-_.~"
_ALREADY_SAFE = re.compile(r"[A-Za-z0-9_.~\-]+")


class InvalidKeyPart(ValueError):
    """A value given for a key part cannot be used (empty, too long, control character...)."""


class TemplateError(ValueError):
    """A key, tag or namespace template is malformed or clashes with a declared one."""


def escape_part(name: str, value: object, max_length: int) -> str:
    """Validate one part's value and escape it for use inside a key segment."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise InvalidKeyPart(f"{name}: expected str or int, got {type(value).__name__}")
    text = str(value)
    if not text:
        raise InvalidKeyPart(f"{name}: must not be empty")
    if len(text) > max_length:
        raise InvalidKeyPart(f"{name}: longer than {max_length} characters ({len(text)})")
    if _ALREADY_SAFE.fullmatch(text):
        return text  # the usual id (digits, uuid, slug): nothing to check or escape
    for char in text:
        if unicodedata.category(char) in ("Cc", "Cs"):
            raise InvalidKeyPart(f"{name}: contains control character {char!r}")
    return quote(text, safe=_SAFE)


@dataclass(frozen=True, slots=True)
class Pattern:
    """A parsed ``literal:{field}:...`` template; each segment is a literal or one field."""

    text: str
    segments: tuple[tuple[bool, str], ...]  # (is_field, literal text or field name)

    @classmethod
    def parse(cls, text: str) -> Pattern:
        if not isinstance(text, str) or not text:
            raise TemplateError("a template must be a non-empty string")
        segments: list[tuple[bool, str]] = []
        for segment in text.split(":"):
            match = _FIELD.match(segment)
            if match:
                segments.append((True, match.group(1)))
            elif _LITERAL.match(segment):
                segments.append((False, segment))
            else:
                raise TemplateError(
                    f"template {text!r}: segment {segment!r} must be a literal "
                    "([A-Za-z0-9_.-]) or a single {field}"
                )
        if segments[0][0]:
            raise TemplateError(f"template {text!r} must start with a literal segment")
        fields = [name for is_field, name in segments if is_field]
        if len(set(fields)) != len(fields):
            raise TemplateError(f"template {text!r} names a field twice")
        return cls(text, tuple(segments))

    @property
    def fields(self) -> tuple[str, ...]:
        return tuple(name for is_field, name in self.segments if is_field)

    def render(self, escaped: Mapping[str, str]) -> str:
        """Render with already-escaped part values."""
        return ":".join(escaped[name] if is_field else name for is_field, name in self.segments)

    def overlaps(self, other: Pattern) -> bool:
        """Whether some parts could make both patterns render the same string."""
        if len(self.segments) != len(other.segments):
            return False
        return all(
            mine[0] or theirs[0] or mine[1] == theirs[1]
            for mine, theirs in zip(self.segments, other.segments, strict=True)
        )

    def is_prefix_of(self, other: Pattern) -> bool:
        return other.segments[: len(self.segments)] == self.segments


def lease_key(physical: str) -> str:
    """The key of the fill lease of the entry at ``physical`` (same Cluster slot)."""
    return physical + "|lease"


@dataclass(frozen=True, slots=True)
class Tag:
    """A rendered tag: purging it removes every entry that carries it."""

    name: str
    physical: str


@dataclass(frozen=True, slots=True)
class Namespace:
    """A rendered namespace; bumping its generation invalidates every key in it."""

    name: str
    generation_key: str


@dataclass(frozen=True, slots=True)
class CacheKey:
    """A fully resolved key: what the cache and the stores need to address one entry."""

    template: KeyTemplate
    name: str
    physical: str
    parts: Mapping[str, str]
    namespace: Namespace | None
    tags: tuple[Tag, ...]

    @property
    def lease_key(self) -> str:
        return lease_key(self.physical)

    @property
    def generation_key(self) -> str:
        """The namespace generation's key, or an unused key in the same slot."""
        if self.namespace is not None:
            return self.namespace.generation_key
        return self.physical + "|gen"

    @property
    def tier(self) -> Tier:
        return self.template.tier

    @property
    def surrogate_keys(self) -> tuple[str, ...]:
        """The CDN surrogate keys of a response built from this entry: its name, its tags'
        and its namespace's. Purging any of them (as the invalidation workers do for a
        plan's keys, tags and namespaces) removes the response from the CDN too."""
        names = [self.name, *(tag.name for tag in self.tags)]
        if self.namespace is not None:
            names.append(self.namespace.name)
        return tuple(names)

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True, slots=True, eq=False)
class KeyTemplate:
    """A declared key template; call it with the parts to get a :class:`CacheKey`."""

    keyspace: KeySpace
    pattern: Pattern
    tier: Tier
    tag_patterns: tuple[Pattern, ...]
    namespace_pattern: Pattern | None
    tenant_scoped: bool

    @property
    def name(self) -> str:
        return self.pattern.text

    def __call__(self, **parts: str | int) -> CacheKey:
        expected = self.pattern.fields
        if set(parts) != set(expected):
            missing = sorted(set(expected) - set(parts))
            extra = sorted(set(parts) - set(expected))
            raise InvalidKeyPart(
                f"{self.name}: missing parts {missing}, unexpected parts {extra}"
                if missing and extra
                else f"{self.name}: missing parts {missing}"
                if missing
                else f"{self.name}: unexpected parts {extra}"
            )
        limit = self.keyspace.max_part_length
        escaped = {name: escape_part(name, value, limit) for name, value in parts.items()}
        logical = self.pattern.render(escaped)
        prefix = self.keyspace.prefix
        namespace = None
        if self.namespace_pattern is not None:
            namespace = self.keyspace.render_namespace(self.namespace_pattern, escaped)
            remainder = logical[len(namespace.name) :]
            physical = f"{prefix}{{{namespace.name}}}{remainder}"
        else:
            physical = f"{prefix}{{{logical}}}"
        tags = tuple(self.keyspace.render_tag(pattern, escaped) for pattern in self.tag_patterns)
        return CacheKey(
            template=self,
            name=logical,
            physical=physical,
            parts={name: str(value) for name, value in parts.items()},
            namespace=namespace,
            tags=tags,
        )

    def __repr__(self) -> str:
        return f"KeyTemplate({self.name!r}, tier={self.tier.name!r})"


@dataclass(eq=False)
class KeySpace:
    """The declared key templates of one application.

    ``prefix`` starts every physical key (so several applications can share a Redis);
    ``tenant_field`` is the part that names the tenant: a template containing it is
    tenant-scoped, and its namespace and tags must contain it too, so that purging or
    bumping one tenant's data can never reach another's.
    """

    prefix: str = "fc:"
    tenant_field: str = "tenantId"
    max_part_length: int = 256
    _templates: dict[str, KeyTemplate] = field(default_factory=dict, init=False, repr=False)
    _namespaces: dict[str, Pattern] = field(default_factory=dict, init=False, repr=False)
    _tags: dict[str, Pattern] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if not _PREFIX.match(self.prefix):
            raise TemplateError(f"prefix {self.prefix!r} may only use [A-Za-z0-9_.-:]")
        if self.max_part_length < 1:
            raise TemplateError("max_part_length must be >= 1")

    def declare(
        self,
        template: str,
        *,
        tier: Tier | str = "medium",
        tags: Iterable[str] = (),
        namespace: str | None = None,
    ) -> KeyTemplate:
        """Declare a key template and return it.

        ``tier`` is a :class:`Tier` or a tier name. ``tags`` are templates over the key's
        fields (``product:{tenantId}:{productId}``). ``namespace`` is a segment prefix of
        the template (``products:{tenantId}``) whose generation can be bumped.
        """
        pattern = Pattern.parse(template)
        if template in self._templates:
            raise TemplateError(f"template {template!r} is already declared")
        resolved_tier = _resolve_tier(tier)
        tenant_scoped = self.tenant_field in pattern.fields
        tag_patterns = tuple(
            self._check_child(pattern, Pattern.parse(text), "tag", tenant_scoped) for text in tags
        )
        namespace_pattern = None
        if namespace is not None:
            namespace_pattern = self._check_child(
                pattern, Pattern.parse(namespace), "namespace", tenant_scoped
            )
            if not namespace_pattern.is_prefix_of(pattern) or namespace_pattern == pattern:
                raise TemplateError(
                    f"namespace {namespace!r} must be a proper segment prefix of {template!r}"
                )
        # Keys and namespaces share the physical "{...}" space; tags have their own.
        claimed = [other.pattern for other in self._templates.values()]
        claimed += list(self._namespaces.values())
        for other in claimed:
            if other.overlaps(pattern):
                raise TemplateError(f"template {template!r} overlaps {other.text!r}")
        self._check_shared(self._namespaces, namespace_pattern, claimed_keys=[*claimed, pattern])
        for tag_pattern in tag_patterns:
            self._check_shared(self._tags, tag_pattern)

        declared = KeyTemplate(
            keyspace=self,
            pattern=pattern,
            tier=resolved_tier,
            tag_patterns=tag_patterns,
            namespace_pattern=namespace_pattern,
            tenant_scoped=tenant_scoped,
        )
        self._templates[template] = declared
        if namespace_pattern is not None:
            self._namespaces[namespace_pattern.text] = namespace_pattern
        for tag_pattern in tag_patterns:
            self._tags[tag_pattern.text] = tag_pattern
        return declared

    def _check_child(
        self, parent: Pattern, child: Pattern, kind: str, tenant_scoped: bool
    ) -> Pattern:
        unknown = set(child.fields) - set(parent.fields)
        if unknown:
            raise TemplateError(
                f"{kind} {child.text!r} uses fields {sorted(unknown)} that {parent.text!r} lacks"
            )
        if tenant_scoped and self.tenant_field not in child.fields:
            raise TemplateError(
                f"{kind} {child.text!r} of tenant-scoped {parent.text!r} must contain "
                f"{{{self.tenant_field}}}"
            )
        return child

    def _check_shared(
        self,
        registry: dict[str, Pattern],
        pattern: Pattern | None,
        claimed_keys: list[Pattern] | None = None,
    ) -> None:
        if pattern is None or pattern.text in registry:
            return
        for other in list(registry.values()) + (claimed_keys or []):
            if other.overlaps(pattern):
                raise TemplateError(f"{pattern.text!r} overlaps {other.text!r}")

    def __getitem__(self, template: str) -> KeyTemplate:
        try:
            return self._templates[template]
        except KeyError:
            raise TemplateError(f"no declared template {template!r}") from None

    @property
    def templates(self) -> tuple[KeyTemplate, ...]:
        return tuple(self._templates.values())

    def _escape_all(self, pattern: Pattern, parts: Mapping[str, object]) -> dict[str, str]:
        if set(parts) != set(pattern.fields):
            raise InvalidKeyPart(
                f"{pattern.text}: expected parts {sorted(pattern.fields)}, got {sorted(parts)}"
            )
        return {
            name: escape_part(name, value, self.max_part_length) for name, value in parts.items()
        }

    def tag(self, template: str, **parts: str | int) -> Tag:
        """The tag rendered from a declared tag template."""
        try:
            pattern = self._tags[template]
        except KeyError:
            raise TemplateError(f"no declared tag {template!r}") from None
        return self.render_tag(pattern, self._escape_all(pattern, parts))

    def namespace(self, template: str, **parts: str | int) -> Namespace:
        """The namespace rendered from a declared namespace template."""
        try:
            pattern = self._namespaces[template]
        except KeyError:
            raise TemplateError(f"no declared namespace {template!r}") from None
        return self.render_namespace(pattern, self._escape_all(pattern, parts))

    def render_tag(self, pattern: Pattern, escaped: Mapping[str, str]) -> Tag:
        name = pattern.render(escaped)
        return Tag(name=name, physical=f"{self.prefix}tag:{{{name}}}")

    def render_namespace(self, pattern: Pattern, escaped: Mapping[str, str]) -> Namespace:
        name = pattern.render(escaped)
        return Namespace(name=name, generation_key=f"{self.prefix}{{{name}}}|gen")


def _resolve_tier(value: Tier | str) -> Tier:
    return value if isinstance(value, Tier) else tier(value)


def commerce_keyspace(prefix: str = "fc:") -> KeySpace:
    """A KeySpace with the specification's key patterns declared.

    Tenant data: products, product listing pages, user profiles, daily reports, and the
    keys the dependency rules name (tenant search results, product-popularity reports,
    category views). Marketplace (cross-tenant, public) data: product search, nearby
    shops, the category hierarchy and category pages.
    """
    keyspace = KeySpace(prefix=prefix)
    keyspace.declare(
        "product:{tenantId}:{productId}",
        tier="medium",
        tags=["product:{tenantId}:{productId}"],
    )
    keyspace.declare(
        "products:{tenantId}:category:{categoryId}:page:{page}",
        tier="medium",
        namespace="products:{tenantId}",
        tags=["category:{tenantId}:{categoryId}"],
    )
    keyspace.declare(
        "user:{tenantId}:{userId}:profile",
        tier="medium",
        tags=["user:{tenantId}:{userId}"],
    )
    keyspace.declare("reports:{tenantId}:daily:{date}", tier="long", namespace="reports:{tenantId}")
    keyspace.declare(
        "marketplace:products:search:{query}:{location}",
        tier="short",
        namespace="marketplace:products:search",
    )
    keyspace.declare(
        "marketplace:shops:nearby:{lat}:{lng}:{radius}",
        tier="short",
        namespace="marketplace:shops:nearby",
    )
    keyspace.declare("public:categories:hierarchy", tier="long", tags=["categories"])
    # Keys that the shipped dependency rules (rules/marketplace.yaml) invalidate: a
    # tenant's search results, its product-popularity reports (a namespace of their own,
    # so that product updates leave the daily reports alone), a category's cached views
    # (tagged like the listing pages of the category) and the marketplace's public category
    # pages.
    keyspace.declare(
        "search:{tenantId}:{query}:page:{page}", tier="medium", namespace="search:{tenantId}"
    )
    keyspace.declare(
        "reports:{tenantId}:product-popularity:{period}",
        tier="medium",
        namespace="reports:{tenantId}:product-popularity",
    )
    keyspace.declare(
        "category:{tenantId}:{categoryId}:{view}",
        tier="medium",
        tags=["category:{tenantId}:{categoryId}"],
    )
    keyspace.declare(
        "marketplace:categories:{categoryId}:page:{page}",
        tier="medium",
        namespace="marketplace:categories",
    )
    return keyspace
