"""A built container image run the way a container runtime would run it, without one.

The OCI runtime cannot start containers on these machines (crun fails to set rlimits), so the
image's own files, user, environment and entrypoint are run directly: `podman image inspect`
gives the config, `podman image mount` the root filesystem, and this file, started under
`unshare --mount`, mounts that root read-only in a private mount namespace with a tmpfs on
/tmp, proc on /proc and the usual device nodes on /dev (what `docker run --read-only --tmpfs
/tmp` gives), then chroots into it and execs the entrypoint as the image's USER, in its
WorkingDir, with exactly its Env plus the overrides (and HOME from its /etc/passwd, as Docker
does). The mounts vanish with the namespace when the last process in it exits.

    unshare --mount --propagation private python3 -I tests/support/image_root.py SPEC.json

SPEC: {"image_root", "mountpoint", "user", "workdir", "argv", "env", "tmp_files"}; the
launcher part below uses the standard library only (it runs with `python -I`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
TMPFS_SIZE = "64m"


# --- the launcher (root, inside the new mount namespace) -------------------------------------


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True)


def _lookup(root: Path, user: str) -> tuple[int, int, str]:
    """uid, gid and home for an image USER ("uid:gid", "uid", "name" or "" for root), resolved
    against the image's own /etc/passwd and /etc/group as a container runtime does."""
    name, _, group = user.partition(":")
    passwd = [line.split(":") for line in (root / "etc/passwd").read_text().splitlines()]
    groups = [line.split(":") for line in (root / "etc/group").read_text().splitlines()]
    entry = next((e for e in passwd if name in (e[0], e[2])), None) if name else passwd[0]
    if entry is None and not name.isdigit():
        raise SystemExit(f"image_root: USER {user!r} is not in the image's /etc/passwd")
    uid = int(entry[2]) if entry else int(name)
    gid = int(entry[3]) if entry else uid
    if group:
        match = next((g for g in groups if group in (g[0], g[2])), None)
        if match is None and not group.isdigit():
            raise SystemExit(f"image_root: group {group!r} is not in the image's /etc/group")
        gid = int(match[2]) if match else int(group)
    return uid, gid, entry[5] if entry else "/"


def launch(spec: dict[str, Any]) -> None:
    image_root, root = spec["image_root"], Path(spec["mountpoint"])
    _mount("--bind", image_root, str(root))
    _mount("-o", "remount,bind,ro", str(root))
    _mount("-t", "tmpfs", "-o", f"mode=1777,size={TMPFS_SIZE},nosuid,nodev", "tmpfs",
           str(root / "tmp"))
    _mount("-t", "proc", "-o", "nosuid,nodev,noexec", "proc", str(root / "proc"))
    _mount("-t", "tmpfs", "-o", "mode=0755,size=64k,nosuid,noexec", "tmpfs", str(root / "dev"))
    for device in DEVICES:
        (root / "dev" / device).touch()
        _mount("--bind", f"/dev/{device}", str(root / "dev" / device))
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                         ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
        (root / "dev" / name).symlink_to(target)
    _mount("-o", "remount,ro", str(root / "dev"))
    for name, text in spec["tmp_files"].items():
        path = root / "tmp" / name
        path.write_text(text)
        path.chmod(0o444)

    uid, gid, home = _lookup(root, spec["user"])
    env = {"HOME": home, **spec["env"]}
    os.chroot(root)
    os.chdir(spec["workdir"] or "/")
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    argv = spec["argv"]
    os.execvpe(argv[0], argv, env)


# --- the test side -----------------------------------------------------------------------------


def podman(*args: str, timeout: float = 120) -> str:
    result = subprocess.run(
        ["podman", *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args)} failed:\n{result.stderr[-4000:]}")
    return result.stdout


@dataclass
class Image:
    """What `podman image inspect` says about an image, as a runtime would use it."""

    name: str
    user: str
    entrypoint: list[str]
    cmd: list[str]
    env: dict[str, str]
    workdir: str
    labels: dict[str, str]
    stop_signal: str
    size: int

    @classmethod
    def inspect(cls, name: str) -> Image:
        data = json.loads(podman("image", "inspect", name))[0]
        config = data["Config"]
        return cls(
            name=name,
            user=config.get("User", ""),
            entrypoint=config.get("Entrypoint") or [],
            cmd=config.get("Cmd") or [],
            env=dict(item.split("=", 1) for item in config.get("Env") or []),
            workdir=config.get("WorkingDir", ""),
            labels=config.get("Labels") or {},
            stop_signal=config.get("StopSignal", ""),
            size=int(data["Size"]),
        )


@contextmanager
def mounted(image: str) -> Iterator[Path]:
    """The image's root filesystem on the host (podman's read-only image mount)."""
    root = Path(podman("image", "mount", image).strip())
    try:
        yield root
    finally:
        podman("image", "unmount", image)


@dataclass
class ImageProcess:
    """The image's entrypoint (or `argv`) run on its read-only root. Like `docker run IMAGE
    ARGS...`: `args` replace the image's CMD; `argv` replaces entrypoint and CMD both
    (`--entrypoint`); `env` adds to the image's Env; `tmp_files` are put in its /tmp."""

    image: Image
    image_root: Path
    workdir: Path
    args: list[str] | None = None
    argv: list[str] | None = None
    env: dict[str, str] = field(default_factory=dict)
    tmp_files: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None

    @property
    def command(self) -> list[str]:
        if self.argv is not None:
            return self.argv
        return [*self.image.entrypoint, *(self.args if self.args is not None else self.image.cmd)]

    def start(self) -> ImageProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        mountpoint = self.workdir / "root"
        mountpoint.mkdir(exist_ok=True)
        spec = {
            "image_root": str(self.image_root),
            "mountpoint": str(mountpoint),
            "user": self.image.user,
            "workdir": self.image.workdir,
            "argv": self.command,
            "env": {**self.image.env, **self.env},
            "tmp_files": self.tmp_files,
        }
        spec_path = self.workdir / "spec.json"
        spec_path.write_text(json.dumps(spec))
        self.process = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private",
             sys.executable, "-I", __file__, str(spec_path)],
            stdin=subprocess.DEVNULL,
            stdout=open(self.workdir / "stdout", "wb"),  # noqa: SIM115
            stderr=open(self.workdir / "stderr", "wb"),  # noqa: SIM115
            start_new_session=True,  # its own process group: teardown reaches its children
        )
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def stdout(self) -> str:
        return (self.workdir / "stdout").read_text(errors="replace")

    def stderr(self) -> str:
        return (self.workdir / "stderr").read_text(errors="replace")

    def output(self) -> str:
        return f"--- stdout\n{self.stdout()[-6000:]}\n--- stderr\n{self.stderr()[-6000:]}"

    def wait(self, timeout: float) -> int:
        assert self.process is not None
        return self.process.wait(timeout)

    def run(self, timeout: float = 60) -> int:
        return self.start().wait(timeout)

    def tree(self) -> list[int]:
        """This process and its descendants (the supervisor's workers, say)."""
        parents: dict[int, int] = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    stat = (entry / "stat").read_text()
                except OSError:
                    continue
                parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
        found = [self.pid]
        for pid in found:
            found.extend(child for child, parent in parents.items() if parent == pid)
        return found

    def stop(self, timeout: float = 10) -> None:
        """Teardown: SIGTERM, then SIGKILL to the whole process group."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(5)


def ids(pid: int) -> tuple[list[int], list[int], list[int]]:
    """(real, effective, saved, fs uids), the same for gids, and the supplementary groups."""
    status = {
        key: value.split()
        for key, _, value in (
            line.partition(":\t") for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        )
    }
    return ([int(v) for v in status["Uid"]], [int(v) for v in status["Gid"]],
            [int(v) for v in status.get("Groups", [])])


def writable_mounts(pid: int) -> dict[str, str]:
    """Mount points the process sees as writable ("rw"), with their filesystem type."""
    found = {}
    for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines():
        fields = line.split()
        separator = fields.index("-")
        if "rw" in fields[5].split(","):
            found[fields[4]] = fields[separator + 1]
    return found


if __name__ == "__main__":
    launch(json.loads(Path(sys.argv[1]).read_text()))
