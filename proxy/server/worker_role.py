"""Who this process is when `workers: N` runs several: the supervisor tells each worker its
index, its private admin socket and its own pid through the environment."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

INDEX = "IDEMPROXY_WORKER"
ADMIN_SOCKET = "IDEMPROXY_WORKER_ADMIN"
SUPERVISOR = "IDEMPROXY_SUPERVISOR_PID"


@dataclass(frozen=True, slots=True)
class WorkerRole:
    index: int
    admin_socket: str
    supervisor_pid: int

    def environment(self) -> dict[str, str]:
        return {
            INDEX: str(self.index),
            ADMIN_SOCKET: self.admin_socket,
            SUPERVISOR: str(self.supervisor_pid),
        }

    @classmethod
    def from_environment(cls, env: Mapping[str, str] = os.environ) -> WorkerRole | None:
        """The role a supervisor gave this process, or None for a process started by hand."""
        if INDEX not in env:
            return None
        return cls(int(env[INDEX]), env[ADMIN_SOCKET], int(env[SUPERVISOR]))
