import pytest

from proxy.idempotency.fingerprint import canonical_query, fingerprint, media_type
from proxy.idempotency.jcs import JsonTooDeep

JSON = "application/json"


DEPTH = 128


def fp(method: str, path: str, query: str, content_type: str, body: bytes) -> str:
    return fingerprint(method, path, query, content_type, body, DEPTH)


def test_same_request_same_fingerprint() -> None:
    assert fp("POST", "/a", "", JSON, b"{}") == fp("POST", "/a", "", JSON, b"{}")


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
    assert fp("POST", "/a", "x=1", JSON, b'{"n":1}') != fp(*other)


def test_json_is_canonical_but_other_bodies_are_raw() -> None:
    a = fp("POST", "/a", "", JSON, b'{"a": 1, "b": {"d": [1, 2], "c": null}}')
    b = fp("POST", "/a", "", "application/json; charset=utf-8",
           b'{"b":{"c":null,"d":[1,2]},\n "a":1}')
    assert a == b
    assert fp("POST", "/a", "", "text/plain", b'{"b":1, "a":2}') != fp(
        "POST", "/a", "", "text/plain", b'{"a":2,"b":1}')
    assert fp("POST", "/a", "", "application/problem+json", b'{"b":1, "a":2}') == fp(
        "POST", "/a", "", "application/problem+json", b'{"a":2,"b":1}')
    # Array order is meaning, not formatting.
    assert fp("POST", "/a", "", JSON, b"[2, 1]") != fp("POST", "/a", "", JSON, b"[1, 2]")


def test_invalid_json_is_hashed_as_received() -> None:
    assert fp("POST", "/a", "", JSON, b"{not json") == fp("POST", "/a", "", JSON, b"{not json")
    assert fp("POST", "/a", "", JSON, b"{not json") != fp("POST", "/a", "", JSON, b"{not  json")


@pytest.mark.parametrize(
    ("duplicated", "deduplicated"),
    [
        (b'{"a":1,"a":2}', b'{"a":2}'),
        (b'{"a":1,"a":2}', b'{"a":1}'),
        (b'{"amount":100,"to":"me","amount":1}', b'{"amount":1,"to":"me"}'),
        (b'[{"a":1,"a":1}]', b'[{"a":1}]'),
        (b'{"x":"' + b"p" * 70_000 + b'","a":1,"a":2}', b'{"x":"' + b"p" * 70_000 + b'","a":2}'),
    ],
)
def test_duplicate_names_are_never_the_deduplicated_request(duplicated: bytes,
                                                            deduplicated: bytes) -> None:
    """Which duplicate an upstream's parser keeps varies (first, last, error); a retry that
    resolves them differently is a different request. The exact same bytes still match."""
    assert fp("POST", "/a", "", JSON, duplicated) != fp("POST", "/a", "", JSON, deduplicated)
    assert fp("POST", "/a", "", JSON, duplicated) == fp("POST", "/a", "", JSON, duplicated)
    assert fp("POST", "/a", "", JSON, duplicated) != fp(
        "POST", "/a", "", JSON, duplicated.replace(b",", b", "))


def test_numbers_a_double_cannot_hold_are_not_rounded_together() -> None:
    assert fp("POST", "/a", "", JSON, b'{"id":9007199254740993}') != fp(
        "POST", "/a", "", JSON, b'{"id":9007199254740992}')
    assert fp("POST", "/a", "", JSON, b'{"n":1E400}') != fp("POST", "/a", "", JSON, b'{"n":1E401}')
    assert fp("POST", "/a", "", JSON, b'{"n":1.50}') == fp("POST", "/a", "", JSON, b'{"n":15e-1}')


def test_too_deep_json_raises() -> None:
    with pytest.raises(JsonTooDeep):
        fp("POST", "/a", "", JSON, b"[" * (DEPTH + 1) + b"]" * (DEPTH + 1))
    # Only bodies that are fingerprinted as JSON have a depth.
    fp("POST", "/a", "", "text/plain", b"[" * (DEPTH + 1) + b"]" * (DEPTH + 1))


def test_query_order_by_name_keeps_repeated_values_in_order() -> None:
    assert canonical_query("b=2&a=1") == "a=1&b=2"
    assert canonical_query("a=2&b=0&a=1") == "a=2&a=1&b=0"
    assert canonical_query("a=1&a=2") != canonical_query("a=2&a=1")
    assert canonical_query("") == ""


def test_media_type() -> None:
    assert media_type("Application/JSON ; charset=UTF-8") == "application/json"
    assert media_type(None) == ""
