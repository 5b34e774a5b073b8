"""Scheduler addresses, worker counts and memory limits from a hostile user (issue 27).

Whatever is at a ``--scheduler`` address (a listener that accepts and never answers, an HTTP
server, a server greeting in another protocol, one that hangs up, nothing) and however the
address is malformed, the command ends in one line with no traceback, the Dask client's
finaliser included (each CLI runs in its own process, so its whole stderr is read), and no
workspace exists. The servers are real, started here; the one bound on time is the probe's own,
which the message states (the subprocess timeout only guards against a hang). A local cluster
larger than the machine, and memory limits it cannot honour, are refused before any process or
workspace exists.
"""

from __future__ import annotations

import http.server
import os
import socket
import socketserver
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.tiny import run_cli

# A guard against a hang (the failure this file is about), not a bound that is tested.
pytestmark = [pytest.mark.timeout(600), pytest.mark.dask]

REPO = Path(__file__).resolve().parents[2]
GIB = 1 << 30


@pytest.fixture(scope="module")
def silent() -> Iterator[str]:
    """A listener that accepts connections and never says a word."""
    server = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"tcp://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()


class _Greeter(socketserver.BaseRequestHandler):
    greeting = b""

    def handle(self) -> None:
        if self.greeting:
            self.request.sendall(self.greeting)
            self.request.recv(1024)


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[str, str]]:
    """An HTTP server, a server that greets in another protocol (as SSH does), one that hangs
    up at once: each on its own port of this machine."""
    ssh = type("Ssh", (_Greeter,), {"greeting": b"SSH-2.0-OpenSSH_9.6\r\n"})
    started = {
        "http": http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler),
        "ssh": socketserver.ThreadingTCPServer(("127.0.0.1", 0), ssh),
        "hangs up": socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Greeter),
    }
    for server in started.values():
        threading.Thread(target=server.serve_forever, daemon=True).start()
    yield {name: f"tcp://127.0.0.1:{s.server_address[1]}" for name, s in started.items()}
    for server in started.values():
        server.shutdown()
        server.server_close()


def _closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"  # nothing listens once it is closed


MALFORMED = ["tcp://127.0.0.1:notaport", "tcp://", "127.0.0.1:99999", "::::", "http://127.0.0.1:8786",
             "tcp://127.0.0.1:8786/path", "", "tcp://user@127.0.0.1:8786", "tcp://127.0.0.1:0"]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "interp.cli", *args], capture_output=True, text=True, env=env,
                          timeout=120, check=False)


def _assert_one_line(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode != 0, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: "), proc.stderr
    assert proc.stdout == ""
    return lines[0]


def test_whatever_answers_at_the_scheduler_address_is_one_line(
    silent: str, servers: dict[str, str], tiny_folder: Path, tmp_path: Path
) -> None:
    cases = {"silent": (silent, "said nothing within 5 s"), "http": (servers["http"], "said nothing within 5 s"),
             "ssh": (servers["ssh"], "not as a Dask scheduler"),
             "hangs up": (servers["hangs up"], "closed the connection"), "closed": (_closed_port(), "cannot reach")}
    for name, (address, says) in cases.items():
        ws = tmp_path / name
        for command in (["run", "induction", "-m"], ["atlas", "-d", "induction", "--models"]):
            line = _assert_one_line(_cli(*command, str(tiny_folder), "-w", str(ws), "--scheduler", address))
            assert says in line, (name, line)
            assert address.removeprefix("tcp://") in line
            assert not ws.exists(), f"{name}: {command[0]} created the workspace"


@pytest.mark.parametrize("address", MALFORMED)
def test_a_malformed_scheduler_address_is_one_line(address: str, tiny_folder: Path, tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    line = _assert_one_line(_cli("run", "induction", "-m", str(tiny_folder), "-w", str(ws), "--scheduler", address))
    assert "--scheduler" in line
    assert not ws.exists()


def test_the_executor_refuses_a_silent_scheduler_without_a_late_traceback(
    silent: str, tiny_folder: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """Through the API: a UserError, and nothing printed later when the garbage is collected."""
    import gc

    from interp.errors import UserError
    from interp.model.spec import ModelSpec
    from interp.runs.dask_executor import DaskExecutor

    for address in (silent, "tcp://127.0.0.1:notaport"):
        with pytest.raises(UserError) as info:
            DaskExecutor(ModelSpec(str(tiny_folder)), scheduler=address)
        assert "\n" not in str(info.value)
    gc.collect()
    captured = capfd.readouterr()
    assert "Traceback" not in captured.err, captured.err


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--workers", "100000"], "--workers 100000 is more than this machine can run"),
        (["--workers", str(_cores() + 1)], f"--workers {_cores() + 1} is more than this machine can run"),
        (["--device-map", "auto", "--max-memory", "cpu=lots"], "cpu='lots' is not a size"),
        (["--device-map", "auto", "--max-memory", "cpu=-1GiB"], "is not a size"),
        (["--device-map", "auto", "--max-memory", "cpu=0GiB"], "is not a size"),
        (["--device-map", "auto", "--max-memory", "cpu=100"], "is not a size"),
        (["--device-map", "auto", "--max-memory", "cpu=1GiB,cpu=2GiB"], "'cpu' is given twice"),
        (["--device-map", "auto", "--max-memory", "cuda:7=1GiB"], "cuda:7 names a GPU this machine lacks"),
        (["--backend", "tl"], "unknown backend 'tl'"),
    ],
)
def test_cluster_and_placement_are_checked_before_anything_starts(
    extra: list[str], needle: str, tiny_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if "cuda:7" in needle and __import__("torch").cuda.device_count() > 7:
        pytest.skip("this machine has 8 GPUs")
    me = psutil.Process()
    before = {p.pid for p in me.children(recursive=True)}
    commands = [["run", "induction", "-m"], ["scan", "-d", "induction", "-m"], ["atlas", "-d", "induction", "--models"]]
    for command in commands[:2] if "--backend" in extra else commands:  # the atlas hooks with bridge only
        ws = tmp_path / command[0]
        code, out, err = run_cli(capsys, [*command, str(tiny_folder), "-w", str(ws), *extra])
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert code != 0, (command, err)
        assert len(lines) == 1, (command, err)
        assert needle in lines[0], (command, err)
        assert not ws.exists()
        assert out == ""
    assert {p.pid for p in me.children(recursive=True)} == before, "a process was started"
    if "--workers" in extra:
        # The numbers that decide it are in the message, and where to go for more.
        assert f"{_cores()} cores" in lines[0]
        assert f"{psutil.virtual_memory().total / GIB:.1f} GiB of memory" in lines[0]
        assert "--scheduler" in lines[0]


def test_the_local_worker_limit_by_hand() -> None:
    """The limit is the smaller of the cores and the copies of the model memory holds, each
    copy its weights in the run's dtype plus half a GiB for the process: worked out by hand."""
    from interp.model.spec import ModelSpec
    from interp.runs.capacity import Machine, local_worker_limit

    smol = ModelSpec("smollm2-135m", dtype="float32")  # 134.5 M parameters: 538.0e6 bytes in float32
    # 4 GiB / (538.0e6 + 2**29) = 4294967296 / 1074870912 = 3.996: 3 copies.
    assert local_worker_limit(smol, Machine(cores=64, memory_bytes=4 * GIB))[0] == 3
    # In bfloat16 a copy is 269.0e6 + 2**29 = 805870912 bytes: 5.33, 5 copies.
    assert local_worker_limit(ModelSpec("smollm2-135m", dtype="bfloat16"), Machine(64, 4 * GIB))[0] == 5
    assert local_worker_limit(smol, Machine(cores=2, memory_bytes=64 * GIB))[0] == 2


def test_a_folder_s_parameters_are_counted_from_its_weights(tiny_folder: Path) -> None:
    from safetensors import safe_open

    from interp.model.spec import ModelSpec
    from interp.runs.capacity import parameter_count

    with safe_open(str(tiny_folder / "model.safetensors"), "pt") as f:
        expected = sum(f.get_tensor(k).numel() for k in f.keys())  # noqa: SIM118 - safe_open is no dict
    assert parameter_count(ModelSpec(str(tiny_folder))) == expected
    assert parameter_count(ModelSpec("someorg/somemodel")) is None
