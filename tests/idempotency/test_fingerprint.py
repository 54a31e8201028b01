import pytest

from proxy.idempotency.fingerprint import canonical_body, canonical_query, fingerprint, media_type

JSON = "application/json"


def test_same_request_same_fingerprint() -> None:
    assert fingerprint("POST", "/a", "", JSON, b"{}") == fingerprint("POST", "/a", "", JSON, b"{}")


@pytest.mark.parametrize(
    "other",
    [
        ("PATCH", "/a", "x=1", JSON, b'{"n":1}'),
        ("POST", "/b", "x=1", JSON, b'{"n":1}'),
        ("POST", "/a", "x=2", JSON, b'{"n":1}'),
        ("POST", "/a", "x=1", "text/plain", b'{"n":1}'),
        ("POST", "/a", "x=1", JSON, b'{"n":2}'),
    ],
)
def test_each_part_changes_the_fingerprint(other: tuple[str, str, str, str, bytes]) -> None:
    assert fingerprint("POST", "/a", "x=1", JSON, b'{"n":1}') != fingerprint(*other)


def test_json_is_canonical_but_other_bodies_are_raw() -> None:
    a = fingerprint("POST", "/a", "", JSON, b'{"a": 1, "b": {"d": [1, 2], "c": null}}')
    b = fingerprint("POST", "/a", "", "application/json; charset=utf-8",
                    b'{"b":{"c":null,"d":[1,2]},\n "a":1}')
    assert a == b
    assert canonical_body("text/plain", b'{"b":1, "a":2}') == b'{"b":1, "a":2}'
    assert canonical_body("application/problem+json", b'{"b":1, "a":2}') == b'{"a":2,"b":1}'
    # Array order is meaning, not formatting.
    assert canonical_body(JSON, b"[2, 1]") != canonical_body(JSON, b"[1, 2]")


def test_invalid_json_falls_back_to_the_raw_bytes() -> None:
    assert canonical_body(JSON, b"{not json") == b"{not json"


def test_query_order_by_name_keeps_repeated_values_in_order() -> None:
    assert canonical_query("b=2&a=1") == "a=1&b=2"
    assert canonical_query("a=2&b=0&a=1") == "a=2&a=1&b=0"
    assert canonical_query("a=1&a=2") != canonical_query("a=2&a=1")
    assert canonical_query("") == ""


def test_media_type() -> None:
    assert media_type("Application/JSON ; charset=UTF-8") == "application/json"
    assert media_type(None) == ""
