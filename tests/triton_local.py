"""A local ``tritonserver`` for tests and scripts: the one ``nvidia-pytriton`` bundles (Python backend only), from
its own environment (it pins numpy<2), on loopback. Used by tests/test_triton_server.py and
scripts/serve_vs_triton.py.

The Python backend's stub embeds that environment's interpreter: its libpython goes on LD_LIBRARY_PATH, the stub
of the interpreter's version is copied beside the backend, and the server runs in the environment's site-packages
(the stub's embedded Python ignores PYTHONPATH but puts its working directory first on sys.path: the environment's
packages, numpy<2, onnxruntime and apet installed there, come before the base interpreter's).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

START_TIMEOUT_S = 120


def wait_ready(url: str, process: subprocess.Popen, timeout: float = START_TIMEOUT_S, poll: float = 0.5) -> bool:
    """Whether ``url`` answered 200 before ``timeout`` seconds passed or ``process`` exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return True
        except OSError:
            time.sleep(poll)
    return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TritonServer:
    """``tritonserver`` of the environment ``venv`` over ``repo`` on 127.0.0.1; its log in ``work/tritonserver.log``."""

    def __init__(self, venv: Path, repo: Path, work: Path) -> None:
        self.python = Path(venv) / "bin" / "python"
        site = Path(self._probe("import sysconfig; print(sysconfig.get_paths()['purelib'])"))
        libdir = self._probe("import sysconfig; print(sysconfig.get_config_var('LIBDIR'))")
        version = self._probe("import sysconfig; print(sysconfig.get_python_version())")
        bundle = site / "pytriton" / "tritonserver"
        backends = work / "backends" / "python"  # the Python backend with the stub of this interpreter's version
        backends.mkdir(parents=True, exist_ok=True)
        for source in (bundle / "backends" / "python" / "libtriton_python.so",
                       bundle / "backends" / "python" / "triton_python_backend_utils.py",
                       bundle / "python_backend_stubs" / version / "triton_python_backend_stub"):
            shutil.copy2(source, backends / source.name)
        self.http, self.grpc = free_port(), free_port()
        env = {**os.environ,
               "LD_LIBRARY_PATH": f"{libdir}:{site / 'nvidia_pytriton.libs'}:{os.environ.get('LD_LIBRARY_PATH', '')}"}
        self.log = work / "tritonserver.log"
        self.process = subprocess.Popen(
            [str(bundle / "bin" / "tritonserver"), "--model-repository", str(repo),
             "--backend-directory", str(work / "backends"), "--http-address", "127.0.0.1",
             "--http-port", str(self.http), "--grpc-address", "127.0.0.1", "--grpc-port", str(self.grpc),
             "--allow-metrics", "false", "--exit-timeout-secs", "5"],
            stdout=self.log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=site)

    def _probe(self, code: str) -> str:
        return subprocess.run([str(self.python), "-c", code], capture_output=True, text=True, check=True,
                              timeout=60).stdout.strip()

    def ready(self) -> bool:
        return wait_ready(f"http://127.0.0.1:{self.http}/v2/health/ready", self.process)

    def wait_exit(self, timeout: float) -> int | None:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            if self.wait_exit(15) is None:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(5)
