"""KeySpace: templates, escaping, hash tags and tenant isolation."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from redis.crc import key_slot

from freshcache.core.keys import (
    CacheKey,
    InvalidKeyPart,
    KeySpace,
    KeyTemplate,
    TemplateError,
    commerce_keyspace,
)

KEYSPACE = commerce_keyspace()
TEMPLATES = KEYSPACE.templates
NASTY = [":", "*", "?", "[", "]", "{", "}", " ", "a b", "t1:*", "{t2}", "%3A", "é", "ü:*", "\u2028"]
part_values = st.one_of(st.text(min_size=1, max_size=40), st.sampled_from(NASTY))


def build(template: KeyTemplate, values: dict[str, str]) -> CacheKey | None:
    try:
        return template(**{name: values[name] for name in template.pattern.fields})
    except InvalidKeyPart:
        return None


def fields_strategy(template: KeyTemplate) -> st.SearchStrategy[dict[str, str]]:
    return st.fixed_dictionaries({name: part_values for name in template.pattern.fields})


keys_and_parts = st.sampled_from(TEMPLATES).flatmap(
    lambda template: st.tuples(st.just(template), fields_strategy(template))
)


def test_seed_patterns_render_as_written() -> None:
    product = KEYSPACE["product:{tenantId}:{productId}"](tenantId="t1", productId="p1")
    assert product.name == "product:t1:p1"
    assert product.physical == "fc:{product:t1:p1}"
    page = KEYSPACE["products:{tenantId}:category:{categoryId}:page:{page}"](
        tenantId="t1", categoryId="c1", page=2
    )
    assert page.name == "products:t1:category:c1:page:2"
    assert page.physical == "fc:{products:t1}:category:c1:page:2"
    assert page.namespace is not None and page.namespace.name == "products:t1"
    assert [tag.name for tag in page.tags] == ["category:t1:c1"]
    hierarchy = KEYSPACE["public:categories:hierarchy"]()
    assert hierarchy.name == "public:categories:hierarchy"
    assert not hierarchy.template.tenant_scoped


@pytest.mark.parametrize("value", NASTY)
def test_reserved_characters_are_escaped(value: str) -> None:
    key = KEYSPACE["product:{tenantId}:{productId}"](tenantId=value, productId="p")
    tenant_segment = key.name.split(":")[1]
    assert not set(tenant_segment) & set(":*?[]{} \u2028")
    assert key.name.count(":") == 2


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("", "must not be empty"),
        ("a" * 1024, "longer than 256"),
        ("t\x00", "control character"),
        ("t\n1", "control character"),
        ("\ud800", "control character"),
        (None, "expected str or int"),
        (True, "expected str or int"),
        (1.5, "expected str or int"),
    ],
)
def test_invalid_parts_raise_value_errors(value: object, message: str) -> None:
    template = KEYSPACE["product:{tenantId}:{productId}"]
    with pytest.raises(InvalidKeyPart, match=message) as raised:
        template(tenantId=value, productId="p")  # type: ignore[arg-type]
    assert isinstance(raised.value, ValueError)
    assert "tenantId" in str(raised.value)


def test_missing_and_unexpected_parts() -> None:
    template = KEYSPACE["product:{tenantId}:{productId}"]
    with pytest.raises(InvalidKeyPart, match=r"missing parts \['productId'\]"):
        template(tenantId="t")
    with pytest.raises(InvalidKeyPart, match=r"unexpected parts \['page'\]"):
        template(tenantId="t", productId="p", page=1)


@given(keys_and_parts, keys_and_parts)
def test_distinct_templates_or_parts_never_collide(
    first: tuple[KeyTemplate, dict[str, str]], second: tuple[KeyTemplate, dict[str, str]]
) -> None:
    key_a, key_b = build(*first), build(*second)
    if key_a is None or key_b is None:
        return
    same_input = key_a.template is key_b.template and dict(key_a.parts) == dict(key_b.parts)
    assert (key_a.physical == key_b.physical) == same_input
    assert (key_a.name == key_b.name) == same_input
    helpers_a = {key_a.lease_key, key_a.generation_key}
    assert key_b.physical not in helpers_a
    assert key_a.lease_key != key_b.generation_key


@given(keys_and_parts, part_values, part_values)
def test_no_key_falls_in_another_tenants_namespace_or_tag(
    template_and_parts: tuple[KeyTemplate, dict[str, str]], tenant_a: str, tenant_b: str
) -> None:
    template, parts = template_and_parts
    if not template.tenant_scoped or tenant_a == tenant_b:
        return
    key_a = build(template, {**parts, "tenantId": tenant_a})
    if key_a is None:
        return
    for other in TEMPLATES:
        if not other.tenant_scoped:
            continue
        other_parts = {**{name: parts.get(name, "x") for name in other.pattern.fields}}
        key_b = build(other, {**other_parts, "tenantId": tenant_b})
        if key_b is None:
            continue
        assert {tag.physical for tag in key_a.tags}.isdisjoint(tag.physical for tag in key_b.tags)
        if key_a.namespace and key_b.namespace:
            assert key_a.namespace.generation_key != key_b.namespace.generation_key


@given(keys_and_parts)
def test_entry_lease_and_generation_share_a_cluster_slot(
    template_and_parts: tuple[KeyTemplate, dict[str, str]],
) -> None:
    key = build(*template_and_parts)
    if key is None:
        return
    slot = key_slot(key.physical.encode())
    assert key_slot(key.lease_key.encode()) == slot
    assert key_slot(key.generation_key.encode()) == slot


def test_tags_and_namespaces_by_template() -> None:
    tag = KEYSPACE.tag("product:{tenantId}:{productId}", tenantId="t:1", productId="p")
    assert tag.name == "product:t%3A1:p"
    namespace = KEYSPACE.namespace("products:{tenantId}", tenantId="t1")
    key = KEYSPACE["products:{tenantId}:category:{categoryId}:page:{page}"](
        tenantId="t1", categoryId="c", page=1
    )
    assert key.namespace == namespace
    with pytest.raises(TemplateError, match="no declared tag"):
        KEYSPACE.tag("nope:{x}", x="1")
    with pytest.raises(TemplateError, match="no declared namespace"):
        KEYSPACE.namespace("nope:{x}", x="1")
    with pytest.raises(InvalidKeyPart, match="expected parts"):
        KEYSPACE.namespace("products:{tenantId}")


@pytest.mark.parametrize(
    ("declaration", "message"),
    [
        ({"template": "product:{tenantId}:{other}"}, "overlaps"),
        ({"template": "product:{a}:x"}, "overlaps"),
        ({"template": "{tenantId}:x"}, "must start with a literal"),
        ({"template": "a b:{x}"}, "must be a literal"),
        ({"template": "a:{x}:{x}"}, "names a field twice"),
        ({"template": "x:{tenantId}:{a}", "tags": ["tag:{a}"]}, "must contain {tenantId}"),
        ({"template": "x:{tenantId}:{a}", "tags": ["tag:{tenantId}:{b}"]}, "lacks"),
        ({"template": "x:{tenantId}:{a}", "namespace": "y:{tenantId}"}, "segment prefix"),
        ({"template": "x:{tenantId}:{a}", "namespace": "x:{tenantId}:{a}"}, "segment prefix"),
        ({"template": "products:{tenantId}"}, "overlaps"),
        ({"template": "x:{tenantId}", "tier": "eternal"}, "unknown tier"),
    ],
)
def test_bad_declarations_are_refused(declaration: dict[str, object], message: str) -> None:
    keyspace = commerce_keyspace()
    template = declaration.pop("template")
    with pytest.raises(ValueError, match=message):
        keyspace.declare(template, **declaration)  # type: ignore[arg-type]


def test_user_declared_templates_and_prefix() -> None:
    keyspace = KeySpace(prefix="shop1:")
    orders = keyspace.declare(
        "orders:{tenantId}:{orderId}", tier="short", tags=["order:{tenantId}:{orderId}"]
    )
    key = orders(tenantId="t", orderId=42)
    assert key.physical == "shop1:{orders:t:42}"
    assert key.tier.name == "short"
    with pytest.raises(TemplateError, match="prefix"):
        KeySpace(prefix="a{b}")
    with pytest.raises(TemplateError, match="already declared"):
        keyspace.declare("orders:{tenantId}:{orderId}")


def test_surrogate_keys_name_the_entry_its_tags_and_namespace() -> None:
    page = KEYSPACE["products:{tenantId}:category:{categoryId}:page:{page}"](
        tenantId="t 1", categoryId="c", page=1
    )
    assert page.surrogate_keys == (
        "products:t%201:category:c:page:1",
        "category:t%201:c",
        "products:t%201",
    )
