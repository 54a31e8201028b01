"""The log writer never blocks the proxy: background flushing, drops under backpressure, events."""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from aiohttp import ClientSession, ClientTimeout
from prometheus_client.parser import text_string_to_metric_families

from proxy.config import config_hash, parse
from proxy.observability import events, logsink
from proxy.observability.logsink import LogSink
from tests.support.lines import Lines
from tests.support.ports import wait_until
from tests.support.proxy_process import ProxyProcess, base_config
from tests.support.upstream import RecordingUpstream

F_SETPIPE_SZ = 1031  # Linux fcntl: resize a pipe's buffer
SMALL_PIPE = 4096


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    read_fd, write_fd = os.pipe()
    fcntl.fcntl(write_fd, F_SETPIPE_SZ, SMALL_PIPE)
    os.set_blocking(read_fd, False)
    yield read_fd, write_fd
    os.close(read_fd)
    os.close(write_fd)


def _drain(fd: int) -> bytes:
    data = b""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return data
        if not chunk:
            return data
        data += chunk


def _line(i: int) -> bytes:
    return orjson.dumps({"n": i, "pad": "x" * 80}, option=orjson.OPT_APPEND_NEWLINE)


def test_lines_arrive_whole_and_in_order(pipe: tuple[int, int]) -> None:
    read_fd, write_fd = pipe
    sink = LogSink(write_fd)
    received = b""
    for i in range(200):
        sink.write(_line(i))
        received += _drain(read_fd)
    while not sink.flush(0.05):
        received += _drain(read_fd)
    received += _drain(read_fd)
    assert [orjson.loads(line)["n"] for line in received.splitlines()] == list(range(200))
    assert sink.dropped == 0


def test_a_blocked_output_drops_whole_lines_instead_of_blocking(pipe: tuple[int, int]) -> None:
    read_fd, write_fd = pipe
    sink = LogSink(write_fd, limit=8192)
    started = time.monotonic()
    for i in range(2000):  # about 190 KB into a 4 KiB pipe nobody reads
        sink.write(_line(i))
    assert time.monotonic() - started < 1.0  # generous: it is ~2000 appends
    assert sink.dropped > 0
    assert sink.pending <= sink.limit
    assert not sink.flush(0.1)  # cannot finish while nobody reads
    received = b""
    deadline = time.monotonic() + 5
    while sink.pending and time.monotonic() < deadline:
        received += _drain(read_fd)
        sink.flush(0.01)
    received += _drain(read_fd)
    numbers = [orjson.loads(line)["n"] for line in received.splitlines()]
    assert len(numbers) == 2000 - sink.dropped
    assert numbers == sorted(numbers) and numbers[0] == 0


def test_events_have_the_log_shape_and_respect_the_level() -> None:
    lines = Lines()
    events.configure("warning", lines)
    try:
        events.emit("started", hash="abc")
        events.emit("store_error", "error", error="timeout", elapsed_ms=250.5)
        events.emit("weird", "warning", value=object())
    finally:
        events.configure("info", logsink.STDOUT)
    first, second = lines.json()
    assert list(first)[:3] == ["timestamp", "level", "event"]
    assert (first["level"], first["event"], first["error"], first["elapsed_ms"]) == (
        "error",
        "store_error",
        "timeout",
        250.5,
    )
    assert second["event"] == "weird" and isinstance(second["value"], str)


# --- a real process whose stdout is a pipe nobody reads ---------------------------------------


def _unlabelled(text: str) -> dict[str, float]:
    return {
        s.name: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if not s.labels
    }


async def test_proxy_keeps_serving_when_stdout_is_blocked(
    tmp_path: Path, upstream: RecordingUpstream
) -> None:
    workdir = tmp_path / "blocked"
    workdir.mkdir()
    fifo = workdir / "proxy.stdout"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # held open, never read until the end
    # Two pages: the start-up events plus one whole batch (<= PIPE_BUF, written atomically) of
    # access lines always fit, so some lines arrive before the pipe blocks for good.
    fcntl.fcntl(reader, F_SETPIPE_SZ, 2 * SMALL_PIPE)
    config = base_config(upstream.url, logging={"buffer_size": "16KiB", "hash_salt": "fixed"})
    process = ProxyProcess(workdir, config).start()
    try:
        timeout = ClientTimeout(total=5)  # a stalled proxy fails here instead of hanging
        async with ClientSession(timeout=timeout) as session:
            for i in range(150):  # ~100 KB of log lines against 8 KiB pipe + 16 KiB buffer
                async with session.get(f"{process.url}/item/{i}") as response:
                    assert response.status == 200
                    await response.read()
            async with session.get(process.admin_url + "/metrics") as response:
                metrics = _unlabelled(await response.text())
            assert metrics["idemproxy_log_dropped_total"] > 0
            async with session.get(process.admin_url + "/live") as response:
                assert response.status == 200
    finally:
        code = process.stop(timeout=15)  # exits although its stdout is still blocked
        output = b""
        while chunk := _drain_fifo(reader):
            output += chunk
        os.close(reader)
    assert code == 0
    lines = [orjson.loads(line) for line in output.splitlines()]  # every line whole
    access = [line for line in lines if "url.path" in line]
    assert 0 < len(access) < 150
    started = next(line for line in lines if line.get("event") == "started")
    assert started["hash"] == config_hash(parse(config, env={}))


def _drain_fifo(fd: int) -> bytes:
    try:
        return os.read(fd, 65536)
    except BlockingIOError:
        return b""


def test_startup_events_and_level(proxy_process, tmp_path: Path) -> None:
    quiet = proxy_process(base_config("http://127.0.0.1:9", logging={"level": "warning"}))
    salted = proxy_process(base_config("http://127.0.0.1:9", logging={"hash_salt": "s3cret"}))
    [warning] = wait_until(
        lambda: [line for line in quiet.json_lines() if line.get("event") == "hash_salt_random"],
        5,
        "the salt warning",
    )
    assert warning["level"] == "warning"
    # Below the level: no info lines (the other warning at start is store_memory).
    assert all(line["level"] == "warning" for line in quiet.json_lines())
    started = wait_until(
        lambda: [line for line in salted.json_lines() if line.get("event") == "started"], 5, "start"
    )
    assert started[0]["hash"] == config_hash(parse(salted.config, env={}))
    assert not any(line.get("event") == "hash_salt_random" for line in salted.json_lines())
    assert "s3cret" not in salted.stdout()


def test_a_labelled_sink_appends_the_field_to_every_line(pipe: tuple[int, int]) -> None:
    read_fd, write_fd = pipe
    sink = LogSink(write_fd)
    sink.label("worker", 3)
    sink.write(_line(1))
    sink.write(orjson.dumps({"event": "x"}, option=orjson.OPT_APPEND_NEWLINE), urgent=True)
    assert sink.flush(5)
    lines = [orjson.loads(line) for line in _drain(read_fd).splitlines()]
    assert lines == [{"n": 1, "pad": "x" * 80, "worker": 3}, {"event": "x", "worker": 3}]
