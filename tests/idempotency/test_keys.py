import pytest

from proxy.idempotency.keys import KeyHasher, parse_key, storage_key


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        ("abc", "abc"),
        ("8e03978e-40d5-43e8-bc93-6894a57f9324", "8e03978e-40d5-43e8-bc93-6894a57f9324"),
        ('"abc"', "abc"),
        ('"a\\"b\\\\c"', 'a"b\\c'),
        ("!#$%&'*+-.^_`|~:/=", "!#$%&'*+-.^_`|~:/="),
        ("x" * 255, "x" * 255),
        ('"' + "x" * 255 + '"', "x" * 255),
    ],
)
def test_valid_keys(raw: str, key: str) -> None:
    assert parse_key(raw) == key


@pytest.mark.parametrize(
    "raw",
    ["", '""', "a b", '"a b"', "x" * 256, '"' + "x" * 256 + '"', 'ab"', '"ab', "\x7f", "é",
     "a\tb", '"a\\b"'],
)
def test_malformed_keys(raw: str) -> None:
    assert parse_key(raw) is None


def test_storage_key_separates_route_identity_and_key() -> None:
    base = storage_key("payments", "id-a", "k")
    assert base == storage_key("payments", "id-a", "k")
    assert len({base, storage_key("orders", "id-a", "k"), storage_key("payments", "id-b", "k"),
                storage_key("payments", "id-a", "k2"), storage_key("payments", "id-ak", "")}) == 5


def test_scope_identity_is_stable_across_processes_without_a_salt() -> None:
    # Replicas sharing Redis must derive the same storage key for the same caller.
    assert KeyHasher("").identity("Bearer x") == KeyHasher("").identity("Bearer x")
    assert KeyHasher("s1").identity("Bearer x") != KeyHasher("s2").identity("Bearer x")
    assert "Bearer" not in KeyHasher("").identity("Bearer x")


def test_log_hashes_are_short_and_salted() -> None:
    assert len(KeyHasher("s").log_hash("k")) == 16
    assert KeyHasher("s").log_hash("k") == KeyHasher("s").log_hash("k")
    assert KeyHasher("s").log_hash("k") != KeyHasher("t").log_hash("k")
