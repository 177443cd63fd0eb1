"""The local server as a child process, for tests and benchmarks: started on free loopback ports,
ready when it has bound its gRPC port, stopped by PID with SIGTERM."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
SIDECAR = "commands"
"""The ``module`` that runs the logging sidecar: ``python -m commands sidecar ...``."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """``python -m serving.server ARGS`` (or another ``module`` that takes ``--host``, ``--port``
    and ``--port_file``: the logging sidecar) on 127.0.0.1 with a free gRPC port (and a REST port
    when ``rest`` is true); its output goes to ``workdir/<module>.log``."""

    def __init__(
        self,
        args: list[str],
        workdir: Path,
        *,
        rest: bool = False,
        timeout: float = 180,
        module: str = "serving.server",
    ) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        port_file = self.workdir / "port"
        port_file.unlink(missing_ok=True)
        self.rest_port = free_port() if rest else 0
        self.log_path = self.workdir / f"{module.rpartition('.')[2]}.log"
        self.log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        command = [
            sys.executable,
            "-m",
            module,
            *args,
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--port_file",
            str(port_file),
            *(["--rest_api_port", str(self.rest_port)] if module == "serving.server" else []),
        ]
        self.process = subprocess.Popen(
            command, cwd=PROJECT, stdout=self.log, stderr=subprocess.STDOUT, text=True
        )
        deadline = time.monotonic() + timeout
        while not port_file.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server did not start:\n{self.output()}")
            time.sleep(0.1)
        self.port = int(port_file.read_text())
        self.address = f"127.0.0.1:{self.port}"
        self.rest = f"http://127.0.0.1:{self.rest_port}" if rest else None

    def output(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return self.log_path.read_text()

    def stop(self, timeout: float = 60) -> int:
        """SIGTERM by PID and wait; the exit status (0: a clean shutdown)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.send_signal(signal.SIGUSR1)  # the sidecar prints its stacks
                time.sleep(2)
                self.process.kill()
                self.process.wait()
        if not self.log.closed:
            self.log.close()
        return int(self.process.returncode)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def model_config(path: Path, name: str, base_path: str, extra: str = "") -> Path:
    """Write a one-model ModelServerConfig (text format) to ``path``."""
    path.write_text(
        "model_config_list { config { "
        f"name: '{name}' base_path: '{base_path}' model_platform: 'tensorflow' {extra}"
        "} }\n"
    )
    return path
