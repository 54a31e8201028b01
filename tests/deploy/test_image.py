"""The container image, built from the real Dockerfile and run for real (issue 17).

Both targets (`idemproxy`, `example`) are built with podman from the Dockerfile as it is, only
the base substituted through its PYTHON_IMAGE argument (localhost/pybase:bookworm, made from
Debian's packages by .ci/pybase-image, since no registry image can be pulled here). Each build
starts from scratch (`--layers=false`): a broken COPY or install step fails here, never hides
behind a cached layer. The images are then run without a container runtime (crun cannot set
rlimits on these machines; see tests/support/image_root.py): their own root filesystem mounted
read-only with a tmpfs on /tmp, their own USER, Env, WorkingDir and ENTRYPOINT.

Needs root and podman (debootstrap too when the base is missing): .ci/run installs both; under
CI their absence fails, elsewhere the module is skipped with the reason. Warm (base cached) it
takes 1 to 2.5 minutes, mostly the two builds; the first base costs about one minute more.
docs/deploy/container.md says what this covers and what it does not."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.support.image_root import Image, ImageProcess, ids, mounted, podman, writable_mounts
from tests.support.ports import free_port, wait_until
from tests.support.redis_server import RedisServer

REPO = Path(__file__).resolve().parents[2]
BASE = os.environ.get("PYBASE_IMAGE", "localhost/pybase:bookworm")
TARGETS = {"idemproxy": "localhost/idemproxy", "example": "localhost/idemproxy-example"}
TAG = f"test-{os.getpid()}"  # concurrent runs on one machine do not share tags
UID = GID = 10001
BAKED_CONFIG = "/etc/idemproxy/proxy.yaml"
VENV = "/opt/idemproxy"
# What `python -m venv` itself puts in a venv: not dependencies of idemproxy.
VENV_SEED = {"pip", "setuptools"}
# The image adds to its base the venv with idemproxy's dependencies (about 75 MB); more than
# this means something else came in (a compiler, a cache, the build stage's wheels).
MAX_ADDED_BYTES = 150 * 1024 * 1024


def _unavailable() -> str | None:
    if sys.platform != "linux":
        return "needs Linux (mount namespaces, chroot)"
    if os.geteuid() != 0:
        return "needs root: podman image mount, mount namespaces and chroot"
    for tool in ("podman", "unshare", "mount", "redis-server"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install podman debootstrap redis-server)"
    return None


_REASON = _unavailable()
if _REASON is not None and os.environ.get("CI") and os.geteuid() == 0:
    pytest.fail(f"CI must run the image test (.ci/run installs its tools): {_REASON}",
                pytrace=False)

pytestmark = [
    pytest.mark.image,
    pytest.mark.slow,
    pytest.mark.timeout(900),  # the first test builds both images (and the base, if cold)
    pytest.mark.skipif(_REASON is not None, reason=_REASON or ""),
]


# --- building -------------------------------------------------------------------------------


def build(target: str, log: Path) -> str:
    name = f"{TARGETS[target]}:{TAG}"
    with log.open("w") as out:
        result = subprocess.run(
            ["podman", "build", "--isolation", "chroot", "--network", "host", "--layers=false",
             "--build-arg", f"PYTHON_IMAGE={BASE}", "--target", target, "-t", name, "."],
            cwd=REPO, stdout=out, stderr=subprocess.STDOUT, timeout=900, check=False,
        )
    if result.returncode != 0:
        pytest.fail(f"podman build --target {target} failed:\n{log.read_text()[-6000:]}")
    return name


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Image]]:
    logs = tmp_path_factory.mktemp("build")
    base = subprocess.run(
        ["bash", str(REPO / ".ci" / "pybase-image")], capture_output=True, text=True,
        timeout=900, check=False, env={**os.environ, "PYBASE_IMAGE": BASE},
    )
    assert base.returncode == 0, f".ci/pybase-image failed:\n{base.stdout}\n{base.stderr}"
    built: list[str] = []
    try:
        for target in TARGETS:
            built.append(build(target, logs / f"{target}.log"))
        yield {target: Image.inspect(name) for target, name in zip(TARGETS, built, strict=True)}
    finally:
        if built:
            podman("rmi", *built)


@pytest.fixture(scope="module")
def roots(images: dict[str, Image]) -> Iterator[dict[str, Path]]:
    with mounted(images["idemproxy"].name) as proxy_root, \
            mounted(images["example"].name) as example_root:
        yield {"idemproxy": proxy_root, "example": example_root}


@pytest.fixture
def started() -> Iterator[list[ImageProcess]]:
    """Processes a test starts on an image; any still running at teardown are stopped."""
    processes: list[ImageProcess] = []
    yield processes
    for process in reversed(processes):
        process.stop()


# --- HTTP -------------------------------------------------------------------------------------


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=3) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def post(url: str, body: dict[str, Any], key: str) -> tuple[int, dict[str, str], dict[str, Any]]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), method="POST",
        headers={"Content-Type": "application/json", "Idempotency-Key": key},
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, dict(response.headers), json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), json.loads(exc.read())


def answering(url: str) -> bool:
    try:
        return get(url)[0] == 200
    except OSError:
        return False


def start(process: ImageProcess, started: list[ImageProcess], url: str) -> ImageProcess:
    started.append(process.start())
    wait_until(lambda: process.process.poll() is not None or answering(url),  # type: ignore[union-attr]
               30, f"{process.image.name} at {url}")
    assert process.process is not None and process.process.poll() is None, process.output()
    return process


# --- the image as built -----------------------------------------------------------------------


def test_image_config_user_entrypoint_and_size(
    images: dict[str, Image], roots: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    proxy, example = images["idemproxy"], images["example"]
    base = Image.inspect(BASE)
    with capsys.disabled():
        for image in (proxy, example):
            print(f"\nimage {image.name}: {image.size / 1e6:.1f} MB "
                  f"({(image.size - base.size) / 1e6:.1f} MB over {BASE})")
    for image in (proxy, example):
        assert image.size - base.size < MAX_ADDED_BYTES, image.name
        assert image.user == f"{UID}:{GID}"
        assert image.workdir == "/tmp"
        assert image.env["IDEMPROXY_CONFIG"] == BAKED_CONFIG
        assert image.env["TMPDIR"] == "/tmp"
        assert image.env["PATH"].split(":")[0] == f"{VENV}/bin"
        assert image.env["PYTHONDONTWRITEBYTECODE"] == "1"
        assert image.labels["org.opencontainers.image.base.name"] == BASE
    assert proxy.entrypoint == ["idemproxy", "run"]
    assert proxy.stop_signal == "SIGTERM"
    assert example.entrypoint == ["python", "/opt/example/recognitions.py"]
    # The user exists in the image (so tools that resolve it by name agree) and cannot log in.
    passwd = (roots["idemproxy"] / "etc/passwd").read_text().splitlines()
    assert f"idemproxy:x:{UID}:{GID}::/nonexistent:/usr/sbin/nologin" in passwd
    # Code and config belong to root: the unprivileged user cannot change what it runs.
    for path in (BAKED_CONFIG, f"{VENV}/bin/idemproxy", VENV):
        stat = (roots["idemproxy"] / path.lstrip("/")).stat()
        assert (stat.st_uid, stat.st_mode & 0o022) == (0, 0), path


def test_baked_in_config_is_found_and_valid(
    images: dict[str, Image], roots: dict[str, Path], tmp_path: Path
) -> None:
    """`idemproxy check` with the image's own environment: the config the image ships is where
    IDEMPROXY_CONFIG says, readable by the image's user, and valid."""
    check = ImageProcess(images["idemproxy"], roots["idemproxy"], tmp_path / "check",
                         argv=["idemproxy", "check"])
    assert check.run() == 0, check.output()
    effective, _, table = check.stdout().partition("\nROUTE ")
    config = yaml.safe_load(effective)
    assert config["listen"] == {"host": "0.0.0.0", "port": 8000}
    assert (config["admin"]["host"], config["admin"]["port"]) == ("127.0.0.1", 9901)
    assert config["store"]["url"] == "memory://"
    assert config["upstreams"]["app"]["url"] == "http://127.0.0.1:8080"
    assert "recognitions" in table and "POST" in table

    version = ImageProcess(images["idemproxy"], roots["idemproxy"], tmp_path / "version",
                           argv=["idemproxy", "version"])
    assert version.run() == 0, version.output()
    label = images["idemproxy"].labels["org.opencontainers.image.version"]
    assert version.stdout().strip() == f"idemproxy {label}"


# Run by the image's own Python: every installed distribution, its version and requirements,
# and the marker environment (packaging's default_environment, which the venv does not have).
INVENTORY = """
import importlib.metadata as m, json, os, platform, sys
env = {
    "implementation_name": sys.implementation.name,
    "implementation_version": platform.python_version(),
    "os_name": os.name, "platform_machine": platform.machine(),
    "platform_release": platform.release(), "platform_system": platform.system(),
    "platform_version": platform.version(),
    "python_full_version": platform.python_version(),
    "platform_python_implementation": platform.python_implementation(),
    "python_version": ".".join(platform.python_version_tuple()[:2]),
    "sys_platform": sys.platform,
}
dists = {d.metadata["Name"]: {"version": d.version, "requires": d.requires or []}
         for d in m.distributions()}
print(json.dumps({"prefix": sys.prefix, "env": env, "dists": dists}))
"""


def test_python_packages_match_pyproject(
    images: dict[str, Image], roots: dict[str, Path], tmp_path: Path
) -> None:
    """The venv holds idemproxy, what pyproject.toml's runtime dependencies need, and nothing
    else: no test, dev or fuzz extra, and no dependency missing."""
    probe = ImageProcess(images["idemproxy"], roots["idemproxy"], tmp_path / "inventory",
                         argv=["python", "-c", INVENTORY])
    assert probe.run() == 0, probe.output()
    inventory = json.loads(probe.stdout())
    assert inventory["prefix"] == VENV  # `python` on the image's PATH is the venv's
    dists = {canonicalize_name(name): info for name, info in inventory["dists"].items()}

    def applies(requirement: Requirement) -> bool:
        marker = requirement.marker or Marker("python_version > '0'")
        return marker.evaluate({**inventory["env"], "extra": ""})

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    runtime = [Requirement(text) for text in project["dependencies"]]
    extras = {canonicalize_name(Requirement(text).name)
              for group in project["optional-dependencies"].values() for text in group}
    extras.discard("idemproxy")

    # The wheel in the image was built from this pyproject.toml.
    own = dists["idemproxy"]
    assert own["version"] == images["idemproxy"].labels["org.opencontainers.image.version"]
    declared = {str(Requirement(text)) for text in own["requires"]
                if "extra ==" not in text.replace('"', "'")}
    assert declared == {str(requirement) for requirement in runtime}

    # Every runtime dependency is installed at a version pyproject.toml allows.
    for requirement in filter(applies, runtime):
        name = canonicalize_name(requirement.name)
        assert name in dists, f"runtime dependency {requirement} is not in the image"
        version = Version(dists[name]["version"])
        assert requirement.specifier.contains(version, prereleases=True), (requirement, version)

    # And nothing else: the closure of those requirements, by the image's own metadata.
    needed, todo = {"idemproxy"}, ["idemproxy"]
    while todo:
        for text in dists[todo.pop()]["requires"]:
            requirement = Requirement(text)
            name = canonicalize_name(requirement.name)
            if applies(requirement) and name not in needed:
                assert name in dists, f"{requirement} (needed by the image) is not installed"
                needed.add(name)
                todo.append(name)
    installed = set(dists) - VENV_SEED
    assert not installed & extras, f"dev/test extras in the image: {sorted(installed & extras)}"
    assert installed == needed, f"not needed by idemproxy: {sorted(installed - needed)}"


# --- the image running ------------------------------------------------------------------------


def assert_unprivileged_on_read_only_root(process: ImageProcess) -> None:
    """Every process of the tree runs as 10001:10001 with no supplementary group, and sees its
    root read-only: the only writable mounts are /tmp (tmpfs), /proc and device nodes."""
    tree = process.tree()
    for pid in tree:
        uids, gids, groups = ids(pid)
        assert uids == [UID] * 4 and gids == [GID] * 4 and groups == [], (pid, uids, gids)
    writable = writable_mounts(process.pid)
    assert writable.pop("/tmp") == "tmpfs"
    assert writable.pop("/proc") == "proc"
    assert all(path.startswith("/dev/") and fs == "devtmpfs" for path, fs in writable.items()), \
        writable
    assert "/" not in writable


def assert_clean_output(process: ImageProcess) -> None:
    text = process.output()
    for sign in ("Read-only file system", "Permission denied", "Traceback"):
        assert sign not in text, text


def in_progress(status: int, headers: dict[str, str], problem: dict[str, Any]) -> bool:
    """The proxy's "retry after Retry-After" answer while the original's record is still being
    finalised: the client may already hold the original's answer (it is streamed to it first),
    so a retry on its heels, on another worker, can get this once or twice before the replay."""
    return status == 409 and "Retry-After" in headers and problem["type"].endswith("in-progress")


def assert_keyed_post_replays(proxy_url: str, app_url: str, key: str) -> None:
    """A keyed POST through the proxy, then its retry: the same 201 answer, the second one a
    replay that never reached the example service."""
    before = json.loads(get(app_url + "/recognitions")[1])["count"]
    body = {"image": "ci", "key": key}
    status, headers, first = post(proxy_url + "/recognitions", body, key)
    assert status == 201 and "Idempotent-Replayed" not in headers, (status, headers, first)
    retry = wait_until(lambda: (answer := post(proxy_url + "/recognitions", body, key))
                       and not in_progress(*answer) and answer, 5, "the retry past in-progress")
    status, headers, again = retry
    assert (status, headers.get("Idempotent-Replayed")) == (201, "true"), retry
    assert again == first and first["idempotency_key"] == key
    assert json.loads(get(app_url + "/recognitions")[1])["count"] == before + 1


def start_example(
    images: dict[str, Image], roots: dict[str, Path], started: list[ImageProcess], workdir: Path
) -> str:
    """The example image on a free loopback port (`docker run IMAGE --host ... --port ...`)."""
    port = free_port()
    app = ImageProcess(images["example"], roots["example"], workdir,
                       args=["--host", "127.0.0.1", "--port", str(port)])
    url = f"http://127.0.0.1:{port}"
    start(app, started, url + "/healthz")
    assert_unprivileged_on_read_only_root(app)
    return url


def partial_post(port: int, key: str) -> tuple[socket.socket, bytes]:
    """A keyed POST whose last body byte is held back: a request in flight."""
    body = json.dumps({"in_flight": key}).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(
        b"POST /recognitions HTTP/1.1\r\nHost: idemproxy\r\nContent-Type: application/json\r\n"
        + f"Idempotency-Key: {key}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body[:-1]
    )
    return sock, body[-1:]


def read_response(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):  # the proxy closes after answering while draining
        data += chunk
    return data


def test_proxy_image_serves_replays_and_drains(
    images: dict[str, Image], roots: dict[str, Path], started: list[ImageProcess], tmp_path: Path
) -> None:
    """The proxy image with its own baked-in config (ports and store chosen through the
    environment variables it reads), in front of the example image, storing in Redis."""
    redis = RedisServer(tmp_path / "redis").start()
    try:
        app_url = start_example(images, roots, started, tmp_path / "app")
        port, admin_port = free_port(), free_port()
        proxy = ImageProcess(images["idemproxy"], roots["idemproxy"], tmp_path / "proxy", env={
            "IDEMPROXY_PORT": str(port), "IDEMPROXY_ADMIN_PORT": str(admin_port),
            "IDEMPROXY_UPSTREAM": app_url, "IDEMPROXY_STORE": redis.url,
        })
        admin = f"http://127.0.0.1:{admin_port}"
        start(proxy, started, admin + "/live")
        assert proxy.command == ["idemproxy", "run"]  # the image's entrypoint, nothing added
        assert_unprivileged_on_read_only_root(proxy)

        wait_until(lambda: get(admin + "/ready") == (200, "ok"), 15, "/ready ok")
        assert get(admin + "/live") == (200, "ok")
        status, text = get(admin + "/health")
        assert (status, json.loads(text)["status"]) == (200, "pass"), text
        assert_keyed_post_replays(f"http://127.0.0.1:{port}", app_url, "image-ci-1")
        assert redis.cli("DBSIZE") != "0"  # the record went to the Redis store

        # SIGTERM with a request in flight: /ready fails at once, the request still finishes,
        # and the process exits 0 within shutdown.timeout (25s in the baked-in config).
        sock, rest = partial_post(port, "image-ci-drain")
        signalled = time.monotonic()
        proxy.process.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        wait_until(lambda: get(admin + "/ready")[0] == 503, 5, "/ready 503 while draining")
        sock.sendall(rest)
        with sock:
            answer = read_response(sock)
        assert answer.startswith(b"HTTP/1.1 201 "), answer[:300]
        assert proxy.wait(25) == 0, proxy.output()
        assert time.monotonic() - signalled < 25
        assert_clean_output(proxy)
        events = [json.loads(line).get("event") for line in proxy.stdout().splitlines()]
        assert events.index("drain_started") < events.index("drained") < events.index("stopped")
    finally:
        redis.stop()


def test_proxy_image_with_workers_writes_only_to_tmp(
    images: dict[str, Image], roots: dict[str, Path], started: list[ImageProcess], tmp_path: Path
) -> None:
    """A config put in the tmpfs /tmp (IDEMPROXY_CONFIG pointing at it) with `workers: 2`: the
    supervisor keeps its worker sockets under TMPDIR, every process stays unprivileged, a
    replay works across workers through Redis, and SIGTERM drains the fleet to exit 0."""
    redis = RedisServer(tmp_path / "redis").start()
    try:
        app_url = start_example(images, roots, started, tmp_path / "app")
        port, admin_port = free_port(), free_port()
        baked = yaml.safe_load((roots["idemproxy"] / BAKED_CONFIG.lstrip("/")).read_text())
        config = {
            **baked,
            "listen": {"host": "127.0.0.1", "port": port},
            "admin": {"host": "127.0.0.1", "port": admin_port},
            "workers": 2,
            "store": {"url": redis.url},
            "upstreams": {"app": {"url": app_url, "connect_timeout": "2s", "timeout": "10s"}},
            "shutdown": {"drain_delay": "1s", "timeout": "8s"},
        }
        proxy = ImageProcess(images["idemproxy"], roots["idemproxy"], tmp_path / "proxy",
                             env={"IDEMPROXY_CONFIG": "/tmp/proxy.yaml"},
                             tmp_files={"proxy.yaml": yaml.safe_dump(config)})
        admin = f"http://127.0.0.1:{admin_port}"
        start(proxy, started, admin + "/live")
        wait_until(lambda: get(admin + "/ready") == (200, "ok"), 15, "/ready ok")
        wait_until(lambda: len(proxy.tree()) == 3, 10, "the supervisor and two workers")
        assert_unprivileged_on_read_only_root(proxy)
        written = sorted(p.name for p in Path(f"/proc/{proxy.pid}/root/tmp").iterdir())
        print("written to /tmp:", written)
        assert any(name.startswith("idemproxy-workers-") for name in written), written

        for n in range(4):  # SO_REUSEPORT spreads connections: replays cross workers
            assert_keyed_post_replays(f"http://127.0.0.1:{port}", app_url, f"image-ci-w{n}")

        signalled = time.monotonic()
        proxy.process.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        assert proxy.wait(8) == 0, proxy.output()
        assert time.monotonic() - signalled < 8
        assert_clean_output(proxy)
    finally:
        redis.stop()
