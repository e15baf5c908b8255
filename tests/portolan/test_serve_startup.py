"""``portolan serve`` starting up and running as a real process: refusals of listeners that
cannot bind, the open-file limit and the SVP connection cap, logging (issue 12 items 2 and 14,
issue 13 item 11)."""

from __future__ import annotations

import resource
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from portolan.cli.serve import default_svp_max_connections
from protocol.svp import Ping, Pong, decode_frame
from tests.e2e.conftest import REPO_ROOT, parse_ready, portolan_argv, run_portolan


def serve_argv(
    tmp_path: Path, *extra: str, svp="127.0.0.1:0", api="127.0.0.1:0", metrics="127.0.0.1:0"
):
    return [
        "serve",
        "--store",
        f"sqlite:{tmp_path / 'portolan.db'}",
        "--svp-listen",
        svp,
        "--api-listen",
        api,
        "--metrics-listen",
        metrics,
        *extra,
    ]


class Served:
    def __init__(self, tmp_path: Path, *extra: str, nofile: tuple[int, int] | None = None):
        self.err_path = tmp_path / f"serve-{time.monotonic_ns()}.err"

        def limit() -> None:
            if nofile is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, nofile)

        with open(self.err_path, "w") as err:
            self.proc = subprocess.Popen(
                portolan_argv(*serve_argv(tmp_path, *extra)),
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                cwd=REPO_ROOT,
                preexec_fn=limit,
            )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("READY"):
            self.stop()
            raise AssertionError(f"no READY line: {line!r}\n{self.stderr()}")
        self.addresses = parse_ready(line)

    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        rest = self.proc.stdout.read() if self.proc.stdout else ""
        self.rest_of_stdout = rest
        return self.proc.returncode


def http_get(address: tuple[str, int], path: str) -> tuple[int, str]:
    url = f"http://{address[0]}:{address[1]}{path}"
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.status, resp.read().decode()


# ----------------------------------------------------------------------------------------------
# 14. Listeners that cannot bind


@pytest.mark.parametrize("which", ["svp", "api", "metrics"])
def test_a_port_in_use_is_one_line_naming_the_listener_exit_2_and_no_store(tmp_path, which):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    try:
        done = run_portolan(*serve_argv(tmp_path, **{which: f"127.0.0.1:{port}"}), timeout=60)
    finally:
        taken.close()
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines == [f"portolan serve: {which} listener 127.0.0.1:{port}: address already in use"]
    assert "READY" not in done.stdout
    assert not (tmp_path / "portolan.db").exists()


def test_an_unassignable_address_is_one_line_and_exit_2(tmp_path):
    done = run_portolan(*serve_argv(tmp_path, svp="192.0.2.77:1296"), timeout=60)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        "portolan serve: svp listener 192.0.2.77:1296: cannot assign requested address"
    ]
    assert not (tmp_path / "portolan.db").exists()


def test_two_listeners_on_one_address_are_refused_before_the_store_is_opened(tmp_path):
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    addr = f"127.0.0.1:{port}"
    done = run_portolan(*serve_argv(tmp_path, api=addr, metrics=addr), timeout=60)
    assert done.returncode == 2, done.stderr
    assert "metrics listener" in done.stderr and "address already in use" in done.stderr
    assert not (tmp_path / "portolan.db").exists()


# ----------------------------------------------------------------------------------------------
# 2. File descriptors


def test_default_connection_cap_leaves_room_for_everything_else():
    assert default_svp_max_connections(1024) == 896
    assert default_svp_max_connections(1 << 20) == (1 << 20) - (1 << 20) // 10
    assert default_svp_max_connections(100) == 16


def test_svp_connections_past_the_cap_never_lock_out_the_api_and_metrics(tmp_path):
    # soft 200 / hard 300: raised to 300, so 172 SVP connections (300 - 128) are served.
    served = Served(tmp_path, nofile=(200, 300))
    conns: list[socket.socket] = []
    try:
        pid = served.proc.pid
        limits = Path(f"/proc/{pid}/limits").read_text()
        (line,) = [x for x in limits.splitlines() if x.startswith("Max open files")]
        assert line.split()[3:5] == ["300", "300"]
        for _ in range(320):
            conns.append(socket.create_connection(served.addresses["svp"], timeout=10))
        # the last one is past the cap: closed without an answer
        last = conns[-1]
        last.sendall(Ping(1).encode())
        try:
            assert last.recv(100) == b""
        except ConnectionResetError:
            pass
        # one under the cap is served
        conns[0].sendall(Ping(2).encode())
        assert decode_frame(conns[0].recv(100)) == Pong(2)
        status, text = http_get(served.addresses["metrics"], "/metrics")
        assert status == 200
        assert "portolan_svp_connections_refused_total" in text
        status, _ = http_get(served.addresses["api"], "/cns")
        assert status == 200
    finally:
        for c in conns:
            c.close()
        served.stop()
    err = served.stderr()
    assert "raised from 200" in err and "at most 172 SVP connections" in err
    refused = [x for x in err.splitlines() if "refused" in x and "SVP connection" in x]
    assert len(refused) == 1, refused
    assert "EMFILE" not in err and "Traceback" not in err


# ----------------------------------------------------------------------------------------------
# Issue 13 item 11: log level after the command, one READY, the store named, API access log


def test_serve_logs_its_store_once_ready_and_every_api_request(tmp_path):
    served = Served(tmp_path)
    try:
        assert http_get(served.addresses["api"], "/cns")[0] == 200
        with pytest.raises(urllib.error.HTTPError):
            http_get(served.addresses["api"], "/cns/not-a-uuid")
    finally:
        assert served.stop() == 0
    err = served.stderr()
    assert "READY" not in err  # READY is for stdout only
    assert "READY" not in served.rest_of_stdout
    assert f"store sqlite:{tmp_path / 'portolan.db'} opened" in err
    access = [x for x in err.splitlines() if "portolan.api.access" in x]
    assert len(access) == 2, access
    assert " GET /cns 200 " in access[0] and access[0].rstrip().split()[-3] == "ms"
    assert " GET /cns/not-a-uuid 4" in access[1]


@pytest.mark.parametrize("argv_order", ["after", "before"])
def test_log_level_is_accepted_before_and_after_serve(tmp_path, argv_order):
    if argv_order == "after":
        served = Served(tmp_path, "--log-level", "WARNING")
    else:
        # `portolan --log-level WARNING serve ...` (the top-level option)
        argv = portolan_argv("--log-level", "WARNING", *serve_argv(tmp_path))
        err_path = tmp_path / "before.err"
        with open(err_path, "w") as err:
            proc = subprocess.Popen(
                argv, stdout=subprocess.PIPE, stderr=err, text=True, cwd=REPO_ROOT
            )
        line = proc.stdout.readline()
        assert line.startswith("READY"), err_path.read_text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        assert "INFO" not in err_path.read_text()
        return
    try:
        assert http_get(served.addresses["api"], "/cns")[0] == 200
    finally:
        assert served.stop() == 0
    assert "INFO" not in served.stderr()


def test_serve_log_level_debug_is_accepted(tmp_path):
    done = run_portolan(*serve_argv(tmp_path, "--log-level", "DEBUG", svp="192.0.2.77:0"))
    assert done.returncode == 2
    assert "unrecognized arguments" not in done.stderr
