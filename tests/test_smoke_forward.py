from tests.support.upstream import RecordingUpstream


async def test_get_is_forwarded_with_trace_id(proxy, upstream: RecordingUpstream) -> None:
    response = await proxy.get("/hello?x=1")
    assert response.status == 200
    assert len(response.headers["X-Trace-Id"]) == 32
    assert upstream.received[0].raw_path == "/hello?x=1"
