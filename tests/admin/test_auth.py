"""The admin credential (issue 14 finding 5): a non-loopback admin port without a token does
not start; with a token, every admin action needs it while probes and /metrics stay open; the
supervisor checks it and still reaches its workers; the comparison is constant-time."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web

from proxy.admin import auth
from proxy.config import Admin, ConfigError, loads
from proxy.observability import events, logsink
from proxy.pipeline.runtime import admin_app
from tests.support.lines import Lines
from tests.support.proxy_process import REPO, ProxyProcess, base_config
from tests.support.upstream import RecordingUpstream

TOKEN = "3f1c0e9a7b5d4c2e8f6a1b3c5d7e9f00"
BEARER = {"Authorization": f"Bearer {TOKEN}"}
OPEN = ("/live", "/ready", "/health", "/metrics")
MINIMAL = "upstreams: {app: {url: 'http://127.0.0.1:1'}}\nroutes: [{name: r, upstream: app}]\n"


def run_refused(tmp_path: Path, admin: dict[str, Any], env: dict[str, str] | None = None
                ) -> str:
    """`idemproxy run` with this admin section: it must exit 1 before listening; its stderr."""
    config = base_config("http://127.0.0.1:1", admin=admin)
    path = tmp_path / "proxy.yaml"
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "run", "--config", str(path)],
        cwd=REPO, capture_output=True, text=True, timeout=60,
        env={"PATH": "/usr/bin:/bin", **(env or {})},
    )
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "started" not in result.stdout
    return result.stderr


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "", "10.1.2.3", "admin.example"])
def test_non_loopback_admin_without_a_token_refuses_to_start(tmp_path: Path, host: str) -> None:
    stderr = run_refused(tmp_path, {"host": host, "port": 9901})
    assert "admin.host:" in stderr and "admin.token_file" in stderr
    assert "allow_unauthenticated" in stderr


def test_a_token_source_that_yields_nothing_refuses_to_start(tmp_path: Path) -> None:
    stderr = run_refused(tmp_path, {"host": "0.0.0.0", "port": 9901, "token_env": "ADMIN_TOKEN"})
    assert "admin.token_env: environment variable ADMIN_TOKEN is not set" in stderr
    missing = tmp_path / "absent"
    stderr = run_refused(tmp_path, {"host": "127.0.0.1", "port": 9901,
                                    "token_file": str(missing)})
    assert f"admin.token_file: cannot read {missing}" in stderr
    short = tmp_path / "short"
    short.write_text("hunter2\n")
    stderr = run_refused(tmp_path, {"host": "0.0.0.0", "port": 9901, "token_file": str(short)})
    assert "admin.token_file: the token must be at least 16 characters" in stderr
    stderr = run_refused(tmp_path, {"host": "0.0.0.0", "port": 9901, "token_env": "T"},
                         {"T": "has spaces in the middle of it"})
    assert "admin.token_env: the token must be" in stderr


def test_config_rules_name_the_yaml_path() -> None:
    with pytest.raises(ConfigError, match=r"admin\.host: 0\.0\.0\.0 is reachable"):
        loads(MINIMAL + "admin: {host: 0.0.0.0}\n")
    with pytest.raises(ConfigError, match=r"admin: set at most one of token_file and token_env"):
        loads(MINIMAL + "admin: {token_file: /t, token_env: T}\n")
    for admin in ("{host: 0.0.0.0, allow_unauthenticated: true}", "{host: 0.0.0.0, token_env: T}",
                  "{host: '::1'}", "{host: localhost}", "{host: 127.0.0.2}"):
        loads(MINIMAL + f"admin: {admin}\n")
    # `${VAR:-}` leaves a token source out rather than naming an empty one.
    config = loads(MINIMAL + "admin: {token_file: '${NO_SUCH_VAR:-}'}\n", env={})
    assert config.admin.token_file is None


def test_token_env_on_loopback_may_be_unset() -> None:
    admin = Admin(token_env="ADMIN_TOKEN")
    assert auth.load_token(admin, {}) is None
    assert auth.load_token(admin, {"ADMIN_TOKEN": f" {TOKEN}\n"}) == TOKEN


def test_allow_unauthenticated_is_reported_at_start() -> None:
    reported = Lines()
    events.configure("info", reported)
    try:
        assert auth.guard(Admin(host="0.0.0.0", allow_unauthenticated=True), None) == []
        assert auth.guard(Admin(), None) == []  # loopback: nothing to report
    finally:
        events.configure("info", logsink.STDOUT)
    (line,) = reported.json()
    assert (line["event"], line["level"], line["host"]) == (
        "admin_unauthenticated", "warning", "0.0.0.0"
    )


async def assert_unauthorized(response: aiohttp.ClientResponse, invalid: bool) -> None:
    assert response.status == 401, await response.text()
    challenge = response.headers["WWW-Authenticate"]
    assert challenge.startswith("Bearer ")
    assert ('error="invalid_token"' in challenge) is invalid
    body = await response.json(content_type="application/problem+json")
    assert body["type"] == "urn:idemproxy:problem:admin-unauthorized"
    assert TOKEN not in await response.text()


def with_token(tmp_path: Path, upstream: RecordingUpstream, **overrides: Any) -> dict[str, Any]:
    token_file = tmp_path / "admin-token"
    token_file.write_text(TOKEN + "\n")  # as `kubectl create secret --from-file` keeps it
    config = base_config(upstream.url, **overrides)
    config["admin"]["token_file"] = str(token_file)
    return config


async def refuses_without_the_token(session: aiohttp.ClientSession, admin: str) -> None:
    wrong = {"Authorization": f"Bearer {TOKEN[:-1]}1"}
    for path in ("/admin/drain", "/admin/reload", "/admin/anything-added-later"):
        async with session.post(admin + path) as response:
            await assert_unauthorized(response, invalid=False)
        async with session.post(admin + path, headers=wrong) as response:
            await assert_unauthorized(response, invalid=True)
        for other in ({"Authorization": f"Basic {TOKEN}"}, {"Authorization": TOKEN}):
            async with session.post(admin + path, headers=other) as response:
                await assert_unauthorized(response, invalid=False)
    async with session.get(admin + "/admin/drain") as response:
        await assert_unauthorized(response, invalid=False)
    for path in OPEN:
        async with session.get(admin + path) as response:
            assert response.status == 200, path


async def test_with_a_token_admin_actions_need_it_and_probes_stay_open(
    proxy_process: Any, upstream: RecordingUpstream, tmp_path: Path
) -> None:
    proc: ProxyProcess = proxy_process(with_token(tmp_path, upstream))
    async with aiohttp.ClientSession() as session:
        await refuses_without_the_token(session, proc.admin_url)
        async with session.post(proc.admin_url + "/admin/reload", headers=BEARER) as response:
            assert response.status == 200
        async with session.post(proc.admin_url + "/admin/nothing", headers=BEARER) as response:
            assert response.status == 404
        async with session.post(proc.admin_url + "/admin/drain", headers=BEARER) as response:
            assert response.status == 202
    assert proc.process is not None and proc.process.wait(15) == 0
    refused = [e for e in proc.json_lines() if e.get("event") == "admin_unauthorized"]
    assert {e["reason"] for e in refused} == {"missing", "invalid"}
    assert TOKEN not in proc.stdout() + proc.stderr()


async def test_loopback_without_a_token_still_works(
    proxy_process: Any, upstream: RecordingUpstream
) -> None:
    proc: ProxyProcess = proxy_process(base_config(upstream.url))
    async with aiohttp.ClientSession() as session, session.post(
        proc.admin_url + "/admin/drain"
    ) as response:
        assert response.status == 202
    assert proc.process is not None and proc.process.wait(15) == 0
    assert "admin_unauthenticated" not in proc.stdout()


async def test_supervisor_checks_the_token_and_still_reaches_its_workers(
    proxy_process: Any, upstream: RecordingUpstream, tmp_path: Path
) -> None:
    proc: ProxyProcess = proxy_process(with_token(tmp_path, upstream, workers=2))
    async with aiohttp.ClientSession() as session:
        await refuses_without_the_token(session, proc.admin_url)
        # Forwarded to each worker's private socket, which needs no token.
        async with session.post(proc.admin_url + "/admin/reload", headers=BEARER) as response:
            assert response.status == 200, await response.text()
            assert set((await response.json())["workers"]) == {"0", "1"}
        async with session.post(proc.admin_url + "/admin/drain", headers=BEARER) as response:
            assert response.status == 202
    assert proc.process is not None and proc.process.wait(30) == 0


async def test_the_token_is_compared_with_compare_digest(
    aiohttp_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The decision is hmac.compare_digest's, over fixed-length digests (no early exit on the
    first differing byte, no length leak): a spy that says "no" refuses the right token."""
    compared: list[tuple[bytes, bytes]] = []

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return False

    async def drain(request: web.BaseRequest) -> web.Response:
        return web.Response(status=202)

    app = admin_app({}, {"/admin/drain": drain}, None, [auth.bearer_middleware(TOKEN)])
    client = await aiohttp_client(app)
    assert (await client.post("/admin/drain", headers=BEARER)).status == 202
    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    assert (await client.post("/admin/drain", headers=BEARER)).status == 401
    for short in ("x" * 16, "y" * 500):
        assert (await client.post("/admin/drain",
                                  headers={"Authorization": f"Bearer {short}"})).status == 401
    assert [(len(a), len(b)) for a, b in compared] == [(32, 32)] * 3
