"""The prefix-tree route table against the first-match linear scan it replaced."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.routes_curve import linear_match
from proxy.pipeline.routing import RouteTable, Spec

EQUIVALENCE = settings(
    max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
METHODS = ["GET", "POST", "PUT", "DELETE"]


_SEGMENTS = st.sampled_from(["a", "b", "ab", "A", "v1", "pay", "payments", "x-y", "~", ".z"])
_PREFIXES = st.builds(
    lambda segments, slash: "/" + "/".join(segments) + ("/" if slash and segments else ""),
    st.lists(_SEGMENTS, max_size=3),
    st.booleans(),
)
_PATHS = st.builds(
    lambda segments, slash: "/" + "/".join(segments) + ("/" if slash and segments else ""),
    st.lists(_SEGMENTS | st.sampled_from(["PAY", "c"]), max_size=4),
    st.booleans(),
)


@st.composite
def _specs(draw: st.DrawFn) -> list[Spec[int]]:
    count = draw(st.integers(0, 12))
    return [
        Spec(
            draw(_PREFIXES),
            draw(st.none() | st.lists(st.sampled_from(METHODS), min_size=1, max_size=2)),
            index,
            draw(st.booleans()),
        )
        for index in range(count)
    ]


@EQUIVALENCE
@given(_specs(), st.lists(st.tuples(_PATHS, st.sampled_from(METHODS)), min_size=1, max_size=8))
def test_the_tree_matches_exactly_like_the_first_match_scan(
    specs: list[Spec[int]], requests: list[tuple[str, str]]
) -> None:
    table = RouteTable(specs)
    for path, method in requests:
        assert table.match(path, method) == linear_match(specs, path, method), (path, method)


def test_an_earlier_shorter_prefix_wins_over_a_later_longer_one() -> None:
    table = RouteTable(
        [Spec("/v1/", ["POST"], "v1-post"), Spec("/v1/payments", None, "payments"),
         Spec("/", None, "default")]
    )
    assert table.match("/v1/payments", "POST") == "v1-post"
    assert table.match("/v1/payments", "GET") == "payments"
    assert table.match("/v1", "POST") == "default"  # "/v1/" needs a segment after it
    assert table.match("/v1/paymentsx", "GET") == "default"


def test_ignore_case_routes_compete_in_config_order() -> None:
    table = RouteTable([Spec("/Pay", None, "pay", ignore_case=True), Spec("/pay", None, "exact")])
    assert table.match("/PAY/x", "GET") == "pay"
    assert table.match("/pay", "GET") == "pay"
    assert RouteTable([Spec("/pay", None, "exact")]).match("/PAY", "GET") is None
