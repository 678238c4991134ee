"""Start ``nnterp serve`` on a free loopback port in its own process group, wait (bounded) until it answers, and
stop it: for the serving tests and benchmarks."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

TESTS = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running_server(model: str, arguments: list[str], env: dict | None = None, api_key: str | None = None,
                   start_seconds: float = 300.0, log: Path | None = None) -> Iterator[str]:
    """The base URL of ``nnterp serve MODEL ARGUMENTS`` while it runs; stopped (its whole process group) after."""
    port = free_port()
    command = [sys.executable, "-m", "nnterp", "serve", model, "--port", str(port), *arguments]
    if api_key:
        command += ["--api-key", api_key]
    environment = {**os.environ, "PYTHONPATH": str(TESTS), **(env or {})}
    output = open(log, "w") if log is not None else subprocess.DEVNULL
    process = subprocess.Popen(command, env=environment, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(url, process, start_seconds, api_key)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(30)
        if log is not None:
            output.close()


def wait_until_serving(url: str, process: subprocess.Popen, seconds: float, api_key: str | None) -> None:
    deadline = time.monotonic() + seconds
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with status {process.returncode} before serving")
        try:
            with urllib.request.urlopen(urllib.request.Request(url + "/v1/models", headers=headers), timeout=5) as reply:
                if json.loads(reply.read()).get("data"):
                    return
        except OSError:
            pass
        time.sleep(1)
    raise TimeoutError(f"the server did not answer at {url} within {seconds:.0f} s")
