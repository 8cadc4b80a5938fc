"""``cmae serve`` as a user starts it: a real server process on a free port."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request

import pytest

from tests.conftest import start_cmae


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture
def serve(tmp_path):
    procs = []
    temp = tmp_path / "temp"  # the server's TMPDIR: where its uploads go
    temp.mkdir()

    def start(*args: str) -> tuple[str, subprocess.Popen]:
        port = _free_port()
        env = {**os.environ, "TMPDIR": str(temp)}
        roots = ("--data-root", tmp_path, "--model-root", tmp_path)
        p = start_cmae("serve", "--port", port, *roots, *args, stdout=None, env=env)
        procs.append(p)
        first = p.stderr.readline()  # the URL line, once bound
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
                break
            except OSError:
                time.sleep(0.1)
        return first, p, port

    yield start
    for p in procs:
        p.terminate()
        p.wait(timeout=10)


def test_serve__loopback_without_token(serve):
    first, _, port = serve()
    assert first.strip() == f"cmae serve: http://127.0.0.1:{port}/ (Ctrl-C to stop)"
    status, body = _get(f"http://127.0.0.1:{port}/api/health")
    assert status == 200 and body["status"] == "ok"
    # A rebinding name pointing at this port is refused.
    status, body = _get(
        f"http://127.0.0.1:{port}/api/health", {"Host": f"attacker.example:{port}"}
    )
    assert status == 400 and "not served here" in body["message"]


def test_serve__beyond_loopback_warns_and_requires_the_token(serve):
    first, proc, port = serve("--host", "0.0.0.0")
    assert "reachable from other machines" in first
    url_line = proc.stderr.readline()
    token = url_line.split("?token=")[1].split()[0]
    assert len(token) >= 24
    status, body = _get(f"http://127.0.0.1:{port}/api/health")
    assert status == 401 and "access token" in body["message"]
    status, _ = _get(
        f"http://127.0.0.1:{port}/api/health", {"Authorization": f"Bearer {token}"}
    )
    assert status == 200


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_serve__ctrl_c_or_sigterm_stops_cleanly(serve, tmp_path, sig):
    """A service manager's SIGTERM stops the server like Ctrl-C: exit 0, one
    line, and its upload folder is removed."""
    _, proc, port = serve()
    uploads = lambda: list((tmp_path / "temp").glob("cmae-uploads-*"))  # noqa: E731
    assert len(uploads()) == 1
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=10)
    assert proc.returncode == 0, stderr
    assert stderr.strip() == "cmae serve: stopped"
    assert uploads() == []


def test_serve__answers_while_many_connections_trickle(serve):
    """Clients that open a connection and send a request a byte at a time
    (slowloris) hold no thread; 150 of them leave the server answering."""
    _, _, port = serve()
    held = []
    try:
        for _ in range(150):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.sendall(b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            held.append(s)
        req = urllib.request.Request(f"http://127.0.0.1:{port}/api/health")
        with urllib.request.urlopen(req, timeout=60) as r:
            assert r.status == 200 and json.loads(r.read())["status"] == "ok"
    finally:
        for s in held:
            s.close()
