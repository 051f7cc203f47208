"""Start generation servers (SGLang, or the embedded server) and stop them with the trainer.

:class:`ServerLauncher` runs ``python -m sglang.launch_server`` (optionally behind
``sglang_router``) or ``python -m ophsd.rollout.serve`` as child processes, waits until they are
healthy and kills their process groups on :meth:`~ServerLauncher.shutdown` (and at exit).
:meth:`SGLangEngine.launch <ophsd.rollout.sglang.SGLangEngine.launch>` starts one and connects.
"""
from __future__ import annotations

import atexit
import importlib.util
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from typing import Sequence

from ophsd.rollout.base import EngineError, InvalidRequestError
from ophsd.rollout.server_pool import TransientError, http_json, new_client
from ophsd.runtime.distributed import free_port

log = logging.getLogger(__name__)

SGLANG_MISSING = (
    "SGLang is not installed (it needs CUDA GPUs): install it on a GPU machine with `pip install \"sglang[all]\"`, "
    "or use the embedded engine (--rollout-engine embedded), optionally served with `python -m ophsd.rollout.serve`"
)


def sglang_available() -> bool:
    return importlib.util.find_spec("sglang") is not None


class ServerLauncher:
    """Start generation servers for a model directory and stop them with the trainer.

    ``backend="sglang"``: ``python -m sglang.launch_server --model-path M --tp-size T
    --mem-fraction-static F --base-gpu-id i*T`` per server (+ ``sglang_router.launch_router``
    in front when ``router=True``). ``backend="embedded"``: ``python -m ophsd.rollout.serve``
    (same HTTP API; CPU). Logs go to ``log_dir``; the first health wait is long
    (``startup_timeout``, default 900 s for SGLang: weights load + CUDA-graph capture) and fails
    early, with the log tail, when a server process exits.
    """

    def __init__(self, model_path: str, *, backend: str = "sglang", num_servers: int = 1, tp: int = 1,
                 mem_fraction: float = 0.8, host: str = "127.0.0.1", ports: Sequence[int] | None = None,
                 router: bool = False, router_port: int | None = None, extra_args: Sequence[str] = (),
                 startup_timeout: float | None = None, log_dir: str | None = None, env: dict | None = None,
                 python: str = sys.executable):
        if backend not in ("sglang", "embedded"):
            raise ValueError("backend must be 'sglang' or 'embedded'")
        if backend == "sglang" and not sglang_available():
            raise EngineError(SGLANG_MISSING)
        if router and importlib.util.find_spec("sglang_router") is None:
            raise EngineError("sglang-router is not installed (`pip install sglang-router`); "
                              "or pass several URLs to SGLangEngine without a router")
        if num_servers < 1 or tp < 1 or not 0 < mem_fraction <= 1:
            raise ValueError("num_servers and tp must be >= 1 and mem_fraction in (0, 1]")
        self.model_path, self.backend, self.num_servers, self.tp = str(model_path), backend, num_servers, tp
        self.mem_fraction, self.host, self.router = mem_fraction, host, router
        self.ports = list(ports) if ports else [free_port(host) for _ in range(num_servers)]
        if len(self.ports) != num_servers:
            raise ValueError("give one port per server")
        self.router_port = router_port or (free_port(host) if router else None)
        self.extra_args = list(extra_args)
        self.startup_timeout = startup_timeout or (900.0 if backend == "sglang" else 300.0)
        self.log_dir = log_dir or tempfile.mkdtemp(prefix="ophsd-servers-")
        self.env = {**os.environ, **(env or {})}
        self.python = python
        self.procs: list[tuple[str, subprocess.Popen, str]] = []
        self._atexit = False

    @property
    def worker_urls(self) -> list[str]:
        return [f"http://{self.host}:{p}" for p in self.ports]

    @property
    def router_url(self) -> str | None:
        return f"http://{self.host}:{self.router_port}" if self.router else None

    def server_command(self, i: int) -> list[str]:
        port = str(self.ports[i])
        if self.backend == "embedded":
            return [self.python, "-m", "ophsd.rollout.serve", "--model", self.model_path, "--host", self.host,
                    "--port", port, *self.extra_args]
        return [self.python, "-m", "sglang.launch_server", "--model-path", self.model_path,
                "--tp-size", str(self.tp), "--mem-fraction-static", str(self.mem_fraction),
                "--base-gpu-id", str(i * self.tp), "--host", self.host, "--port", port, *self.extra_args]

    def router_command(self) -> list[str]:
        return [self.python, "-m", "sglang_router.launch_router", "--worker-urls", *self.worker_urls,
                "--host", self.host, "--port", str(self.router_port)]

    def _spawn(self, name: str, cmd: list[str]):
        path = os.path.join(self.log_dir, f"{name}.log")
        logf = open(path, "ab")  # noqa: SIM115 - owned by the child for its lifetime
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        logf.close()
        self.procs.append((name, proc, path))
        log.info("started %s (pid %d): %s; log %s", name, proc.pid, " ".join(cmd), path)

    def start(self) -> "ServerLauncher":
        if not self._atexit:
            atexit.register(self.shutdown)
            self._atexit = True
        try:
            for i in range(self.num_servers):
                self._spawn(f"server{i}", self.server_command(i))
            self.wait_healthy(self.worker_urls, self.procs[: self.num_servers])
            if self.router:
                self._spawn("router", self.router_command())
                self.wait_healthy([self.router_url], self.procs[-1:], path="/health")
        except BaseException:
            self.shutdown()
            raise
        return self

    @staticmethod
    def _tail(path: str, n: int = 3000) -> str:
        try:
            with open(path, "rb") as f:
                f.seek(0, 2)
                f.seek(max(0, f.tell() - n))
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def wait_healthy(self, urls, procs, path: str = "/health_generate"):
        deadline = time.monotonic() + self.startup_timeout
        pending = dict(zip(urls, procs))
        delay = 0.5
        with new_client(len(urls)) as client:
            while pending:
                for url, (name, proc, logp) in list(pending.items()):
                    if proc.poll() is not None:
                        raise EngineError(f"{name} exited with code {proc.returncode} before becoming healthy "
                                          f"({' '.join(proc.args)}); last log lines:\n{self._tail(logp)}")
                    try:
                        http_json(client, url, path, timeout=10)
                        del pending[url]
                    except (TransientError, InvalidRequestError):
                        pass
                if not pending:
                    break
                if time.monotonic() > deadline:
                    names = ", ".join(v[0] for v in pending.values())
                    raise EngineError(f"{names} not healthy after {self.startup_timeout:.0f}s; logs in {self.log_dir}")
                time.sleep(delay)
                delay = min(delay * 1.5, 5.0)

    def shutdown(self, timeout: float = 30.0):
        procs, self.procs = self.procs, []
        for name, proc, _ in reversed(procs):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except (ProcessLookupError, PermissionError):
                    proc.terminate()
        end = time.monotonic() + timeout
        for name, proc, _ in procs:
            try:
                proc.wait(timeout=max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    proc.kill()
                proc.wait(timeout=10)
