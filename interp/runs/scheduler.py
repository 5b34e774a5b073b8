"""Reaching a Dask scheduler (``--scheduler``): its address checked, then its greeting read
within one deadline, before any Dask client exists.

A Dask scheduler speaks first: on accepting a connection it sends its handshake, a small
message in Dask's frame format, before it reads anything. :func:`probe` connects, reads that
greeting and decodes it, sending nothing, all within :data:`PROBE_TIMEOUT_S` (the name lookup
included). So a listener that accepts and never answers, a server of another protocol (an HTTP
server waits for a request; others greet with text that is no Dask frame) and a malformed
address each end in one line. The Dask client is built only for an address that answered as a
scheduler: its own connect waits for the greeting without a bound, reads a foreign greeting's
first bytes as a frame length (an HTTP reply asks for exabytes), and a client whose
construction failed leaves a finaliser that prints a traceback seconds later.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from urllib.parse import urlsplit

from interp.errors import UserError

PROBE_TIMEOUT_S = 5.0
DEFAULT_PORT = 8786  # where ``dask scheduler`` listens unless told otherwise
# A scheduler's greeting is a few hundred bytes; a length beyond this is no Dask frame.
_MAX_GREETING = 1 << 20
_FRAME_LENGTH = struct.Struct("Q")  # Dask's own framing: a native unsigned 64-bit length


def normalise(address: str) -> tuple[str, str, int]:
    """``tcp://HOST:PORT`` of a scheduler address (``HOST:PORT``, ``tcp://HOST``, IPv6 in
    brackets), with its host and port; UserError (one line) for anything malformed."""
    text = address.strip()
    scheme, sep, rest = text.partition("://")
    if not sep:
        scheme, rest = "tcp", text
    if scheme != "tcp":
        raise UserError(f"--scheduler {address!r}: the workbench joins a Dask scheduler over tcp:// "
                        f"(tcp://HOST:PORT), not {scheme or 'an empty scheme'}://")
    try:
        parts = urlsplit(f"tcp://{rest}")
        host, port = parts.hostname, parts.port
    except ValueError as exc:
        raise UserError(f"--scheduler {address!r} is not an address: {exc} (give tcp://HOST:PORT)") from None
    if not host or parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise UserError(f"--scheduler {address!r} is not an address: give tcp://HOST:PORT")
    port = DEFAULT_PORT if port is None else port
    if not 1 <= port <= 65535:
        raise UserError(f"--scheduler {address!r}: port {port} is not in 1..65535")
    shown = f"[{host}]" if ":" in host else host
    return f"tcp://{shown}:{port}", host, port


def probe(address: str, timeout: float = PROBE_TIMEOUT_S) -> str:
    """The address in ``tcp://HOST:PORT`` form, once a Dask scheduler there has greeted us;
    UserError (one line) otherwise, within ``timeout`` seconds whatever is at the other end."""
    target, host, port = normalise(address)
    outcome: list[BaseException | None] = []

    def attempt() -> None:  # in a thread: a name lookup ignores socket timeouts
        try:
            _read_greeting(target, host, port, time.monotonic() + timeout)
            outcome.append(None)
        except BaseException as exc:  # handed to the caller's thread
            outcome.append(exc)

    thread = threading.Thread(target=attempt, name="interp-scheduler-probe", daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    if not outcome:
        raise UserError(f"cannot reach the Dask scheduler at {target}: no connection within {timeout:g} s "
                        "(the name did not resolve in time)")
    if outcome[0] is not None:
        raise outcome[0]
    return target


def _read_greeting(target: str, host: str, port: int, deadline: float) -> None:
    try:
        sock = socket.create_connection((host, port), timeout=max(0.01, deadline - time.monotonic()))
    except TimeoutError:
        raise UserError(f"cannot reach the Dask scheduler at {target}: no connection within "
                        f"{PROBE_TIMEOUT_S:g} s") from None
    except OSError as exc:
        raise UserError(f"cannot reach the Dask scheduler at {target}: {exc.strerror or exc}") from None
    with sock:
        head = _receive(sock, _FRAME_LENGTH.size, deadline, target)
        (length,) = _FRAME_LENGTH.unpack(head)
        if not 0 < length <= _MAX_GREETING:
            raise UserError(f"{target} answers, but not as a Dask scheduler (it began with {head!r})")
        body = _receive(sock, length, deadline, target)
    if not _is_handshake(body):
        raise UserError(f"{target} answers, but not as a Dask scheduler (its greeting is no Dask handshake)")


def _receive(sock: socket.socket, n: int, deadline: float, target: str) -> bytes:
    data = bytearray()
    while len(data) < n:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        sock.settimeout(left)
        try:
            chunk = sock.recv(n - len(data))
        except TimeoutError:
            break
        except OSError as exc:
            raise UserError(f"cannot reach the Dask scheduler at {target}: {exc.strerror or exc}") from None
        if not chunk:
            raise UserError(f"{target} closed the connection without a word: no Dask scheduler there")
        data += chunk
    if len(data) < n:
        said = "nothing" if not data else f"only {bytes(data)!r}"
        raise UserError(f"{target} accepted a connection but said {said} within {PROBE_TIMEOUT_S:g} s: "
                        "no Dask scheduler answers there")
    return bytes(data)


def _is_handshake(body: bytes) -> bool:
    """Whether ``body`` decodes as a Dask handshake (a dict naming the compression it takes)."""
    from distributed.protocol.core import loads
    from distributed.protocol.utils import unpack_frames

    try:
        frames, buffers = unpack_frames(body, partial=True)
        message = loads(frames)
    except Exception:
        return False
    return not buffers and isinstance(message, dict) and "compression" in message
