import pytest

from proxy.config import ConfigError, StoreKind, parse
from proxy.config.store_url import parse_url
from proxy.config.urls import redact_url
from tests.support.proxy_process import base_config


def test_parse_standalone() -> None:
    url = parse_url("redis://:pw@cache:6380/2")
    assert (url.kind, url.hosts, url.password, url.db) == ("redis", [("cache", 6380)], "pw", 2)
    assert parse_url("rediss://user:p%40ss@h").username == "user"
    assert parse_url("rediss://user:p%40ss@h").password == "p@ss"
    assert parse_url("redis://h").hosts == [("h", 6379)]
    assert parse_url("redis://[::1]:7000").hosts == [("::1", 7000)]


def test_parse_sentinel_and_cluster() -> None:
    url = parse_url("redis+sentinel://s1:26379,s2,s3:26380/mymaster/3")
    assert url.hosts == [("s1", 26379), ("s2", 26379), ("s3", 26380)]
    assert (url.service, url.db) == ("mymaster", 3)
    cluster = parse_url("redis+cluster://a:7000,b:7001")
    assert (cluster.hosts, cluster.db, cluster.service) == ([("a", 7000), ("b", 7001)], 0, None)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis://", "no host"),
        ("redis://a:1,b:2", "several hosts"),
        ("redis+sentinel://s:26379", "service name"),
        ("redis://h/x", "number"),
        ("redis+cluster://a:7000/1", "database 0"),
        ("redis://h:port", "bad host"),
        ("redis://h?ssl_ca_certs=/ca.pem", "only for rediss"),
        ("rediss://h?timeout=1", "unknown option 'timeout'"),
        ("rediss://h?ssl_cert_reqs=maybe", "ssl_cert_reqs"),
    ],
)
def test_bad_urls(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_url(url)


def test_tls_options() -> None:
    url = parse_url("rediss://h:6380/0?ssl_ca_certs=/etc/ca.pem&ssl_cert_reqs=required")
    assert url.tls == {"ssl_ca_certs": "/etc/ca.pem", "ssl_cert_reqs": "required"}


def test_messages_never_show_credentials() -> None:
    assert redact_url("redis://user:secret@h:1/0") == "redis://***@h:1/0"
    with pytest.raises(ValueError, match=r"\*\*\*@h") as error:
        parse_url("redis://user:secret@h/x")
    assert "secret" not in str(error.value)


def test_config_rejects_a_bad_store_url_by_path() -> None:
    config = base_config("http://127.0.0.1:1", store={"url": "redis+sentinel://:pw@s:26379"})
    with pytest.raises(ConfigError) as error:
        parse(config, env={})
    assert error.value.problems[0].startswith("store.url: ")
    assert "service name" in error.value.problems[0]
    assert "pw" not in error.value.problems[0]


@pytest.mark.parametrize(
    ("url", "kind"),
    [
        ("memory://", StoreKind.MEMORY),
        ("memory:", StoreKind.MEMORY),
        ("redis://h", StoreKind.REDIS),
        ("rediss://h?ssl_cert_reqs=none", StoreKind.REDISS),
        ("redis+sentinel://s:26379/mymaster", StoreKind.SENTINEL),
        ("redis+cluster://a:7000,b:7001", StoreKind.CLUSTER),
    ],
)
def test_store_kind_is_parsed_once_at_load(url: str, kind: StoreKind) -> None:
    config = parse(base_config("http://127.0.0.1:1", store={"url": url}), env={})
    assert config.store.kind is kind
    if kind is not StoreKind.MEMORY:
        assert parse_url(url).kind is kind
    # Derived, not a key: `idemproxy check` prints the config as written, and it loads again.
    dumped = config.model_dump(mode="json")
    assert "kind" not in dumped["store"]
    assert parse(dumped, env={}).store.kind is kind


def test_every_store_kind_is_a_known_scheme() -> None:
    """The scheme list in the error message is the enum: a new kind cannot be left out."""
    config = base_config("http://127.0.0.1:1", store={"url": "memcached://h"})
    with pytest.raises(ConfigError) as error:
        parse(config, env={})
    assert error.value.problems == [
        "store.url: unknown store scheme 'memcached'; use one of "
        "memory, redis, rediss, redis+sentinel, redis+cluster"
    ]
