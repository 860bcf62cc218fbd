"""Dependency rules: patterns compiled to key deletes, tag purges and namespace bumps."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from freshcache.core.events import InvalidEvent, new_event
from freshcache.core.keys import CacheKey, KeySpace, commerce_keyspace, escape_part
from freshcache.core.plan import InvalidationPlan
from freshcache.core.rules import MARKETPLACE_RULES as SHIPPED_RULES
from freshcache.core.rules import Mechanism, RuleError, RuleSet, compile_pattern

MARKETPLACE_RULES = Path(str(SHIPPED_RULES))

SEED_RULES = """\
product_update_triggers:
  - cache_keys:
    - "product:{productId}"
    - "products:{tenantId}:*"
    - "search:*:{productId}"
    - "marketplace:search:*"
    - "reports:{tenantId}:product-popularity:*"

category_update_triggers:
  - cache_keys:
    - "category:{categoryId}:*"
    - "products:{tenantId}:category:{categoryId}:*"
    - "marketplace:categories:*"
"""


@pytest.fixture
def keyspace() -> KeySpace:
    return commerce_keyspace()


@pytest.fixture
def marketplace_rules(keyspace: KeySpace) -> RuleSet:
    return RuleSet.from_yaml(MARKETPLACE_RULES.read_text(), keyspace)


def compiled_to(pattern: str, keyspace: KeySpace) -> tuple[str, ...]:
    return compile_pattern(pattern, keyspace).describe()


# -- plans ------------------------------------------------------------------------------


def test_plans_merge_each_target_once_in_first_seen_order(keyspace: KeySpace) -> None:
    product = keyspace["product:{tenantId}:{productId}"]
    category = keyspace.tag("category:{tenantId}:{categoryId}", tenantId="t1", categoryId="c1")
    listings = keyspace.namespace("products:{tenantId}", tenantId="t1")
    first = InvalidationPlan(keys=(product(tenantId="t1", productId="p1"),), tags=(category,))
    second = InvalidationPlan(
        keys=(product(tenantId="t1", productId="p2"), product(tenantId="t1", productId="p1")),
        tags=(category,),
        namespaces=(listings, listings),
    )

    merged = first | second

    assert merged == InvalidationPlan.merge(first, second)
    assert merged.describe() == (
        "delete key product:t1:p1",
        "delete key product:t1:p2",
        "purge tag category:t1:c1",
        "bump namespace products:t1",
    )
    assert second.namespaces == (listings,)
    assert not merged.is_empty
    assert InvalidationPlan().is_empty
    assert InvalidationPlan.merge().is_empty


# -- each mechanism ---------------------------------------------------------------------


def test_a_pattern_fixing_every_field_deletes_the_key(keyspace: KeySpace) -> None:
    compiled = compile_pattern("product:{tenantId}:{productId}", keyspace)

    assert [target.mechanism for target in compiled.targets] == [Mechanism.DELETE_KEY]
    assert compiled.describe() == ("delete key product:{tenantId}:{productId}",)
    plan = compiled.plan({"tenantId": "t1", "productId": "p1"})
    assert plan == InvalidationPlan(
        keys=(keyspace["product:{tenantId}:{productId}"](tenantId="t1", productId="p1"),)
    )


def test_a_wildcard_over_fields_a_tag_does_not_use_purges_the_tag(keyspace: KeySpace) -> None:
    compiled = compile_pattern("products:{tenantId}:category:{categoryId}:*", keyspace)

    # The namespace products:{tenantId} would also cover these pages, but the tag fixes
    # more fields and so takes fewer other keys with it.
    assert compiled.describe() == ("purge tag category:{tenantId}:{categoryId}",)
    plan = compiled.plan({"tenantId": "t1", "categoryId": "c1"})
    assert plan.tags == (
        keyspace.tag("category:{tenantId}:{categoryId}", tenantId="t1", categoryId="c1"),
    )
    assert plan.keys == ()
    assert plan.namespaces == ()


def test_a_wildcard_over_the_rest_of_a_namespace_bumps_it(keyspace: KeySpace) -> None:
    compiled = compile_pattern("products:{tenantId}:*", keyspace)

    assert compiled.describe() == ("bump namespace products:{tenantId}",)
    assert compiled.plan({"tenantId": "t1"}).namespaces == (
        keyspace.namespace("products:{tenantId}", tenantId="t1"),
    )


def test_a_namespace_without_fields_is_bumped_by_namespace_star(keyspace: KeySpace) -> None:
    assert compiled_to("marketplace:shops:nearby:*", keyspace) == (
        "bump namespace marketplace:shops:nearby",
    )
    assert compiled_to("marketplace:shops:nearby:*:*:*", keyspace) == (
        "bump namespace marketplace:shops:nearby",
    )


def test_a_trailing_wildcard_covers_every_template_under_it(keyspace: KeySpace) -> None:
    assert set(compiled_to("marketplace:*", keyspace)) == {
        "bump namespace marketplace:products:search",
        "bump namespace marketplace:shops:nearby",
        "bump namespace marketplace:categories",
    }
    assert set(compiled_to("reports:{tenantId}:*", keyspace)) == {
        "bump namespace reports:{tenantId}",
        "bump namespace reports:{tenantId}:product-popularity",
    }


def test_a_middle_wildcard_matches_one_segment(keyspace: KeySpace) -> None:
    assert compiled_to("products:{tenantId}:category:*:page:*", keyspace) == (
        "bump namespace products:{tenantId}",
    )
    # One segment short of the listing template: it matches nothing.
    with pytest.raises(RuleError, match=re.escape("products:{tenantId}:category:*:page'")):
        compile_pattern("products:{tenantId}:category:*:page", keyspace)


def test_a_trailing_wildcard_over_literals_only_deletes_the_key(keyspace: KeySpace) -> None:
    assert compiled_to("user:{tenantId}:{userId}:*", keyspace) == (
        "delete key user:{tenantId}:{userId}:profile",
    )
    assert compiled_to("public:*", keyspace) == ("delete key public:categories:hierarchy",)


def test_a_pattern_naming_a_tag_template_purges_it(keyspace: KeySpace) -> None:
    assert compiled_to("categories", keyspace) == ("purge tag categories",)
    assert compiled_to("category:{tenantId}:{categoryId}", keyspace) == (
        "purge tag category:{tenantId}:{categoryId}",
    )
    assert compile_pattern("categories", keyspace).plan({}).tags == (keyspace.tag("categories"),)


def test_a_key_template_wins_over_a_tag_of_the_same_name(keyspace: KeySpace) -> None:
    # product:{tenantId}:{productId} is both a key template and its tag: the pattern
    # addresses the key, the cheapest thing that covers it.
    assert compiled_to("product:{tenantId}:{productId}", keyspace) == (
        "delete key product:{tenantId}:{productId}",
    )


def test_literals_bind_fields_as_the_keyspace_escapes_them(keyspace: KeySpace) -> None:
    compiled = compile_pattern("product:a%20b:{productId}", keyspace)

    assert compiled.describe() == ("delete key product:a%20b:{productId}",)
    (key,) = compiled.plan({"productId": "p1"}).keys
    assert key == keyspace["product:{tenantId}:{productId}"](tenantId="a b", productId="p1")


@pytest.mark.parametrize(
    ("pattern", "reason"),
    [
        ("product:a b:p1", "escapes it ('a%20b')"),
        ("product:a%2fb:p1", "escapes it ('a%2Fb')"),
        ("product:t1%:p1", "escapes it ('t1%25')"),
        ("product::p1", "empty segment"),
        ("product:{tenantId}x:*", "must be a whole segment"),
        ("product:t*:*", "must be a whole segment"),
        ("*:t1:p1", "must start with a literal"),
        ("{tenantId}:*", "must start with a literal"),
        ("", "empty segment"),
    ],
)
def test_malformed_patterns_are_refused(keyspace: KeySpace, pattern: str, reason: str) -> None:
    with pytest.raises(RuleError) as raised:
        compile_pattern(pattern, keyspace)
    assert repr(pattern) in str(raised.value)
    assert reason in str(raised.value)


# -- patterns that cannot be covered ----------------------------------------------------


@pytest.mark.parametrize(
    "pattern",
    ["nothing:{tenantId}:*", "product:{tenantId}", "product:{tenantId}:{productId}:extra"],
)
def test_a_pattern_matching_no_template_is_a_rule_error(keyspace: KeySpace, pattern: str) -> None:
    with pytest.raises(RuleError, match=f"pattern {re.escape(repr(pattern))} matches no declared"):
        compile_pattern(pattern, keyspace)


@pytest.mark.parametrize(
    ("pattern", "needs"),
    [
        # Across tenants: every tag and namespace of tenant data names the tenant.
        ("products:*:category:{categoryId}:*", "bump namespace products:{tenantId} needs tenantId"),
        ("products:*", "fixes none of its fields"),
        # The user profile has a tag, but it needs the user.
        ("user:{tenantId}:*:profile", "purge tag user:{tenantId}:{userId} needs tenantId, userId"),
        ("category:{tenantId}:*", "fixes only tenantId"),
    ],
)
def test_a_matched_template_nothing_covers_is_a_rule_error(
    keyspace: KeySpace, pattern: str, needs: str
) -> None:
    with pytest.raises(RuleError) as raised:
        compile_pattern(pattern, keyspace)
    assert f"pattern {pattern!r} matches key template" in str(raised.value)
    assert needs in str(raised.value)


# -- binding at plan time ---------------------------------------------------------------


def test_a_missing_field_is_an_error_never_a_wildcard(keyspace: KeySpace) -> None:
    compiled = compile_pattern("product:{tenantId}:{productId}", keyspace)

    with pytest.raises(InvalidEvent) as raised:
        compiled.plan({"tenantId": "t1"})
    assert raised.value.field == "productId"
    assert "product:{tenantId}:{productId}" in str(raised.value)


def test_a_placeholder_over_a_literal_is_still_required(keyspace: KeySpace) -> None:
    compiled = compile_pattern("products:{tenantId}:{section}:*", keyspace)

    assert compiled.describe() == ("bump namespace products:{tenantId}",)
    with pytest.raises(InvalidEvent) as raised:
        compiled.plan({"tenantId": "t1"})
    assert raised.value.field == "section"


@pytest.mark.parametrize("value", [None, 1.5, True, ["p1"], "", "x" * 300, "p\x00"])
def test_an_unusable_value_names_its_field(keyspace: KeySpace, value: object) -> None:
    compiled = compile_pattern("product:{tenantId}:{productId}", keyspace)

    with pytest.raises(InvalidEvent) as raised:
        compiled.plan({"tenantId": "t1", "productId": value})
    assert raised.value.field == "productId"


# -- rule sets --------------------------------------------------------------------------


def test_the_shipped_marketplace_rules_compile(marketplace_rules: RuleSet) -> None:
    assert marketplace_rules.unused_triggers == ()
    assert {
        "product.updated",
        "price.changed",
        "stock.changed",
        "category.updated",
        "user.updated",
        "order.created",
        "order.updated",
    } <= set(marketplace_rules.events)
    described = {row.pattern: row.compiled_to for row in marketplace_rules.describe()}
    assert described["product:{tenantId}:{productId}"] == (
        "delete key product:{tenantId}:{productId}",
    )
    assert described["products:{tenantId}:category:{categoryId}:*"] == (
        "purge tag category:{tenantId}:{categoryId}",
    )
    assert described["marketplace:categories:*"] == ("bump namespace marketplace:categories",)


def test_a_product_update_plans_its_triggers_and_affected_caches(
    marketplace_rules: RuleSet,
) -> None:
    event = new_event(
        "product.updated",
        "t1",
        productId="p1",
        affected_caches=["marketplace:shops:nearby:*", "product:t1:p2"],
    )

    assert set(marketplace_rules.plan(event).describe()) == {
        "delete key product:t1:p1",
        "delete key product:t1:p2",
        "bump namespace products:t1",
        "bump namespace search:t1",
        "bump namespace marketplace:products:search",
        "bump namespace reports:t1:product-popularity",
        "bump namespace marketplace:shops:nearby",
    }


def test_targets_shared_by_patterns_are_planned_once(marketplace_rules: RuleSet) -> None:
    plan = marketplace_rules.plan(new_event("category.updated", "t1", categoryId="c1"))

    assert plan.describe() == (
        "delete key public:categories:hierarchy",
        "purge tag category:t1:c1",
        "bump namespace marketplace:categories",
    )


def test_an_event_type_without_triggers_applies_its_affected_caches(
    marketplace_rules: RuleSet,
) -> None:
    quiet = new_event("stock.changed", "t1", productId="p1")
    assert marketplace_rules.plan(quiet).is_empty

    listed = new_event("stock.changed", "t1", productId="p1", affected_caches=["products:t1:*"])
    assert marketplace_rules.plan(listed).describe() == ("bump namespace products:t1",)


def test_affected_caches_may_use_the_events_fields(marketplace_rules: RuleSet) -> None:
    event = new_event(
        "stock.changed", "t1", categoryId="c1", affected_caches=["category:{tenantId}:{categoryId}"]
    )

    assert marketplace_rules.plan(event).describe() == ("purge tag category:t1:c1",)


def test_an_event_missing_a_rules_field_is_refused(marketplace_rules: RuleSet) -> None:
    with pytest.raises(InvalidEvent) as raised:
        marketplace_rules.plan(new_event("product.updated", "t1"))

    assert raised.value.field == "productId"
    assert "product_update_triggers" in str(raised.value)


def test_an_unknown_event_type_is_refused(marketplace_rules: RuleSet) -> None:
    event = new_event("shop.renamed", "t1", affected_caches=["products:t1:*"])

    with pytest.raises(InvalidEvent) as raised:
        marketplace_rules.plan(event)
    assert raised.value.field == "eventType"


@pytest.mark.parametrize(
    ("entry", "reason"),
    [
        ("marketplace:nearby:*", "matches no declared"),
        ("products:*", "fixes none of its fields"),
        ("*", "must start with a literal"),
        ("product:t2:p1", "addresses tenant 't2'"),
        ("products:t2:*", "addresses tenant 't2'"),
        ("product:{tenantId}:{productId}", "productId: is missing"),
    ],
)
def test_an_unusable_affected_caches_entry_is_refused(
    marketplace_rules: RuleSet, entry: str, reason: str
) -> None:
    event = new_event("stock.changed", "t1", affected_caches=["products:t1:*", entry])

    with pytest.raises(InvalidEvent) as raised:
        marketplace_rules.plan(event)
    assert reason in str(raised.value)
    assert repr(entry) in str(raised.value)
    assert raised.value.field == ("productId" if "missing" in reason else "affectedCaches")


def test_the_seed_map_as_written_names_the_key_our_keyspace_scopes(keyspace: KeySpace) -> None:
    expected = "product_update_triggers: pattern 'product:{productId}'"
    with pytest.raises(RuleError, match=re.escape(expected)):
        RuleSet.from_yaml(SEED_RULES, keyspace)


def test_the_seed_map_as_written_loads_against_keys_spelled_its_way() -> None:
    seed_keys = KeySpace()
    seed_keys.declare("product:{productId}", tags=["product:{productId}"])
    seed_keys.declare(
        "products:{tenantId}:category:{categoryId}:page:{page}",
        namespace="products:{tenantId}",
        tags=["category:{tenantId}:{categoryId}"],
    )
    seed_keys.declare("search:{query}:{productId}", tags=["search-product:{productId}"])
    seed_keys.declare("marketplace:search:{query}", namespace="marketplace:search")
    seed_keys.declare(
        "reports:{tenantId}:product-popularity:{period}", namespace="reports:{tenantId}"
    )
    seed_keys.declare("category:{categoryId}:{view}", tags=["category:{categoryId}"])
    seed_keys.declare("marketplace:categories:{categoryId}", namespace="marketplace:categories")

    rules = RuleSet.from_yaml(SEED_RULES, seed_keys)

    assert rules.events == {}
    assert rules.unused_triggers == ("product_update_triggers", "category_update_triggers")
    assert {row.pattern: row.compiled_to for row in rules.describe()} == {
        "product:{productId}": ("delete key product:{productId}",),
        "products:{tenantId}:*": ("bump namespace products:{tenantId}",),
        "search:*:{productId}": ("purge tag search-product:{productId}",),
        "marketplace:search:*": ("bump namespace marketplace:search",),
        "reports:{tenantId}:product-popularity:*": ("bump namespace reports:{tenantId}",),
        "category:{categoryId}:*": ("purge tag category:{categoryId}",),
        "products:{tenantId}:category:{categoryId}:*": (
            "purge tag category:{tenantId}:{categoryId}",
        ),
        "marketplace:categories:*": ("bump namespace marketplace:categories",),
    }


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a: [\n", "not valid YAML"),
        ("- a\n- b\n", "must be a mapping"),
        ("a:\n  - cache_keys: ['products:{tenantId}:*']\na:\n  - cache_keys: []\n", "duplicate"),
        ("a: products:{tenantId}:*\n", "a: must be a list"),
        ("a:\n  - products:{tenantId}:*\n", "a[0]: must be a mapping"),
        ("a:\n  - cache_keys: []\n    delay: 5\n", "unknown entries ['delay']"),
        ("a:\n  - cache_keys: products:{tenantId}:*\n", "a[0].cache_keys: must be a list"),
        ("a:\n  - cache_keys: [7]\n", "patterns must be strings"),
        ("a:\n  - cache_keys: ['products:*']\n", "a: pattern 'products:*'"),
        ("events:\n  product.updated: [missing]\n", "fires 'missing', which is not defined"),
        ("events:\n  updated: []\n", "'updated' is not an event type"),
        ("events:\n  product.updated:\n", "product.updated must list trigger names"),
        ("events: [product.updated]\n", "events: must map"),
        ("7: []\n", "trigger names must be strings"),
    ],
)
def test_malformed_rules_are_refused(keyspace: KeySpace, text: str, message: str) -> None:
    with pytest.raises(RuleError) as raised:
        RuleSet.from_yaml(text, keyspace)
    assert message in str(raised.value)


# -- no under-invalidation, no cross-tenant invalidation (properties) -------------------

# Small alphabets, so that random keys and random events often agree.
VALUES: list[str | int] = ["t1", "t2", "a b", "category", 7]
EXTRA_PATTERNS = [
    "product:a%20b:{productId}",
    "products:{tenantId}:category:*:page:*",
    "products:{tenantId}:category:{categoryId}:page:{page}",
    "products:{tenantId}:{section}:*",
    "marketplace:*",
    "marketplace:shops:nearby:*:*:*",
    "reports:{tenantId}:*",
    "public:*",
]


def shipped_patterns() -> list[str]:
    rules = RuleSet.from_yaml(MARKETPLACE_RULES.read_text(), commerce_keyspace())
    return sorted({row.pattern for row in rules.describe()})


def pattern_regex(pattern: str, values: Mapping[str, object]) -> re.Pattern[str]:
    """An independent reading of a pattern: the logical key names it matches."""
    segments = pattern.split(":")
    pieces = []
    for index, segment in enumerate(segments):
        if segment == "*":
            pieces.append("[^:]+(?::[^:]+)*" if index == len(segments) - 1 else "[^:]+")
        elif segment.startswith("{"):
            pieces.append(re.escape(escape_part("part", values[segment[1:-1]], 256)))
        else:
            pieces.append(re.escape(segment))
    return re.compile(":".join(pieces))


def covers(plan: InvalidationPlan, key: CacheKey) -> bool:
    tags = {tag.physical for tag in plan.tags}
    namespaces = {namespace.generation_key for namespace in plan.namespaces}
    return (
        key.physical in {planned.physical for planned in plan.keys}
        or any(tag.physical in tags for tag in key.tags)
        or (key.namespace is not None and key.namespace.generation_key in namespaces)
    )


@st.composite
def keys(
    draw: st.DrawFn,
    keyspace: KeySpace,
    like: str = "",
    values: Mapping[str, object] | None = None,
) -> CacheKey:
    """A key of any template; templates starting like ``like`` and parts equal to
    ``values`` are drawn more often, so that many keys match the pattern under test."""
    templates = keyspace.templates
    related = [t for t in templates if t.name.split(":")[0] == like.split(":")[0]] or templates
    template = draw(st.sampled_from(related) | st.sampled_from(templates))
    given_values = values or {}
    parts: dict[str, str | int] = {}
    for name in template.pattern.fields:
        choices = st.sampled_from(VALUES)
        given_value = given_values.get(name)
        if isinstance(given_value, str | int):
            choices = st.just(given_value) | choices
        parts[name] = draw(choices)
    return template(**parts)


def test_the_reference_reading_of_patterns_matches_keys(keyspace: KeySpace) -> None:
    listing = keyspace["products:{tenantId}:category:{categoryId}:page:{page}"]
    key = listing(tenantId="a b", categoryId="c1", page=2)

    assert pattern_regex("products:{tenantId}:*", {"tenantId": "a b"}).fullmatch(key.name)
    assert not pattern_regex("products:{tenantId}:*", {"tenantId": "t1"}).fullmatch(key.name)
    assert not pattern_regex("products:*:page", {}).fullmatch(key.name)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    pattern=st.sampled_from(shipped_patterns() + EXTRA_PATTERNS),
    values=st.fixed_dictionaries(
        {name: st.sampled_from(VALUES) for name in ("tenantId", "productId", "categoryId")},
        optional={name: st.sampled_from(VALUES) for name in ("userId", "page", "section")},
    ),
    data=st.data(),
)
def test_every_key_a_pattern_matches_is_covered_by_its_plan(
    pattern: str, values: dict[str, object], data: st.DataObject
) -> None:
    keyspace = commerce_keyspace()
    compiled = compile_pattern(pattern, keyspace)
    if not set(compiled.placeholders) <= values.keys():
        with pytest.raises(InvalidEvent):
            compiled.plan(values)
        return
    plan = compiled.plan(values)
    key = data.draw(keys(keyspace, like=pattern, values=values))

    matched = pattern_regex(pattern, values).fullmatch(key.name) is not None
    event("the key matches the pattern" if matched else "the key does not match")
    if matched:
        assert covers(plan, key), f"{pattern} with {values} misses {key.name}"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    event_type=st.sampled_from(
        ["product.updated", "price.changed", "category.updated", "user.updated", "order.created"]
    ),
    tenant=st.sampled_from(["t1", "t2"]),
    data=st.data(),
)
def test_a_tenants_event_never_invalidates_another_tenants_keys(
    event_type: str, tenant: str, data: st.DataObject
) -> None:
    keyspace = commerce_keyspace()
    rules = RuleSet.from_yaml(MARKETPLACE_RULES.read_text(), keyspace)
    change = new_event(event_type, tenant, productId="p1", categoryId="c1", userId="u1")
    plan = rules.plan(change)
    key = data.draw(keys(keyspace, values=change.bindings))

    foreign = key.template.tenant_scoped and key.parts["tenantId"] != tenant
    event("another tenant's key" if foreign else "own or public key")
    if foreign:
        assert not covers(plan, key)
