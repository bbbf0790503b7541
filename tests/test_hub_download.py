"""A hub id downloads on first use (issue 26 item 8), tested against a loopback server that answers the way the
Hugging Face Hub's API does: the revision info, the recursive tree listing, and ``resolve`` with HEAD + GET.

huggingface_hub reads ``HF_ENDPOINT`` / ``HF_HUB_OFFLINE`` at import, so each case runs in a subprocess with its
own environment and cache; nothing leaves the loopback interface.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

REPO = "apet-test/tiny-llava"
SHA = "0123456789abcdef0123456789abcdef01234567"
# resolve the hub id the way the CLI does; an ApetError is one line on stderr and its exit code
SCRIPT = ("import sys; from apet.errors import guarded; from apet.models.registry import resolve_checkpoint; "
          "sys.exit(guarded(lambda: print(resolve_checkpoint(sys.argv[1])) or 0, False))")


class FakeHub(ThreadingHTTPServer):
    """Serves ``files`` as repo :data:`REPO` at commit :data:`SHA`; records every request."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files
        self.requests: list[tuple[str, str]] = []
        super().__init__(("127.0.0.1", 0), _Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: FakeHub

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def _send(self, status: int, body: bytes, headers: dict[str, str], *, head: bool = False) -> None:
        self.send_response(status)
        for key, value in {"Content-Length": str(len(body)), **headers}.items():
            self.send_header(key, value)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _route(self, head: bool) -> None:
        path = unquote(urlparse(self.path).path)
        self.server.requests.append((self.command, path))
        files = self.server.files
        if path in (f"/api/models/{REPO}/revision/main", f"/api/models/{REPO}"):
            info = {"id": REPO, "sha": SHA, "siblings": [{"rfilename": name} for name in files]}
            return self._send(200, json.dumps(info).encode(), {"Content-Type": "application/json"}, head=head)
        if path in (f"/api/models/{REPO}/tree/{SHA}", f"/api/models/{REPO}/tree/main"):
            tree = [{"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                    for name, data in files.items()]
            return self._send(200, json.dumps(tree).encode(), {"Content-Type": "application/json"}, head=head)
        prefix = f"/{REPO}/resolve/"
        if path.startswith(prefix):
            _, _, name = path[len(prefix):].partition("/")
            if name in files:
                data = files[name]
                return self._send(200, data, {"ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                                              "X-Repo-Commit": SHA, "Content-Type": "application/octet-stream"},
                                  head=head)
        code = "RepoNotFound" if path.startswith("/api/models/") else "EntryNotFound"  # the hub's error codes
        self._send(404, b'{"error": "not found"}', {"X-Error-Code": code}, head=head)

    def do_GET(self) -> None:
        self._route(head=False)

    def do_HEAD(self) -> None:
        self._route(head=True)


@pytest.fixture
def hub(tiny_checkpoint: Path):
    files = {p.name: p.read_bytes() for p in sorted(tiny_checkpoint.iterdir()) if p.is_file()}
    files["pytorch_model.bin"] = b"pickled weights export never needs"
    files["flax_model.msgpack"] = b"other frameworks' weights"
    server = FakeHub(files)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _resolve(tmp_path: Path, endpoint: str, *, offline: bool = False, model: str = REPO):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1" if offline else "0",
               HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_ETAG_TIMEOUT="5", HF_HUB_DOWNLOAD_TIMEOUT="5",
               PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    return subprocess.run([sys.executable, "-c", SCRIPT, model], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)


def test_hub_id_downloads_only_export_files_and_says_the_size_first(hub: FakeHub, tmp_path: Path) -> None:
    done = _resolve(tmp_path, hub.url)
    assert done.returncode == 0, done.stderr
    snapshot = Path(done.stdout.strip())
    wanted = {n: d for n, d in hub.files.items() if not n.endswith((".bin", ".msgpack")) and n != "APET_TINY"}
    assert sorted(p.name for p in snapshot.iterdir()) == sorted(wanted)
    assert all((snapshot / n).read_bytes() == d for n, d in wanted.items())
    size_mb = sum(len(d) for d in wanted.values()) / 1e6
    assert f"downloading {REPO}: {len(wanted)} files, {size_mb:.1f} MB (0 already cached)" in done.stderr
    fetched = {path.rsplit("/", 1)[-1] for method, path in hub.requests if method == "GET" and "/resolve/" in path}
    assert fetched == set(wanted)  # no .bin, no .msgpack, nothing outside the patterns
    # the size is announced before the first file byte is requested
    first_get = next(i for i, (m, p) in enumerate(hub.requests) if m == "GET" and "/resolve/" in p)
    assert any("/tree/" in p for _, p in hub.requests[:first_get])

    # second use offline: the cache answers, no request reaches the hub
    before = len(hub.requests)
    again = _resolve(tmp_path, hub.url, offline=True)
    assert again.returncode == 0, again.stderr
    assert Path(again.stdout.strip()) == snapshot and len(hub.requests) == before


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the block ends: connections are refused


def test_unreachable_hub_is_one_line_naming_a_local_directory(tmp_path: Path) -> None:
    done = _resolve(tmp_path, f"http://127.0.0.1:{_closed_port()}")
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"error: cannot download '{REPO}' from http://127.0.0.1:")
    assert "not in the Hugging Face cache" in lines[0] and "pass --model DIR" in lines[0]


def test_offline_without_cache_is_one_line(hub: FakeHub, tmp_path: Path) -> None:
    done = _resolve(tmp_path, hub.url, offline=True)
    assert done.returncode == 2 and hub.requests == []
    assert done.stderr.strip() == (
        f"error: cannot load '{REPO}': HF_HUB_OFFLINE is set and it is not in the Hugging Face cache — download it "
        f"where you have network (hf download {REPO} --local-dir DIR) and pass --model DIR, a local checkpoint "
        "directory")


def test_unknown_repo_is_named_as_such(hub: FakeHub, tmp_path: Path) -> None:
    done = _resolve(tmp_path, hub.url, model="apet-test/missing")
    assert done.returncode == 2
    assert "not found, private or gated" in done.stderr and "HF_TOKEN" in done.stderr
