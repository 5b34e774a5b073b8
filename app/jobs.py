"""Background jobs of the dashboard: ``interp run``/``interp scan`` in a detached process.

A job is a JSON file in ``<workspace>/jobs/``; the process runs this file as a script
(``python app/jobs.py <job file>``), which runs the CLI with its output in the job's log and
writes ``<id>.rc`` when the CLI exits. The state therefore lives on disk, not in a browser
session: a reload (or a restarted dashboard) finds the job again, and the same command is not
started twice while it runs. The results go to the store unit by unit, as with any CLI run,
and so does the progress: :mod:`app.progress` reads the job's runs there (the job records which
detectors it runs; the log is only read for the CLI's error line).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

JOBS_DIR = "jobs"
# Popen handles of jobs started by this process, polled so finished children are reaped.
_CHILDREN: dict[str, subprocess.Popen[bytes]] = {}


@dataclass
class Job:
    id: str
    argv: list[str]
    label: str
    pid: int
    started_at: float
    log: Path
    status: str  # running | done | failed | lost
    returncode: int | None
    finished_at: float | None
    error: str | None
    detectors: tuple[str, ...] = ()  # the detectors it runs, in order: its runs in the store

    @property
    def active(self) -> bool:
        return self.status == "running"


def jobs_dir(workspace: Path) -> Path:
    path = Path(workspace) / JOBS_DIR
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def _locked(workspace: Path) -> Iterator[None]:
    # Serialises "is the same command running? if not, start it" across sessions and processes.
    with open(jobs_dir(workspace) / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped by its parent) counts as gone.
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _tail(path: Path, n_bytes: int = 20_000) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - n_bytes))
            return fh.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def error_line(text: str) -> str | None:
    """The CLI's one-line error (``error: ...``/``internal error: ...``), else the last line."""
    lines = [ln.strip() for ln in re.split(r"[\r\n]+", text) if ln.strip()]
    for ln in reversed(lines):
        if ln.startswith(("error:", "internal error:")):
            return ln
    return lines[-1] if lines else None


def _read(path: Path) -> Job | None:
    try:
        meta = json.loads(path.read_text())
        job_id = str(meta["id"])
        argv = [str(a) for a in meta["argv"]]
        pid = int(meta["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    child = _CHILDREN.get(job_id)
    if child is not None and child.poll() is not None:
        _CHILDREN.pop(job_id, None)
    log = path.with_suffix(".log")
    rc_path = path.with_suffix(".rc")
    returncode: int | None = None
    finished_at: float | None = None
    if rc_path.exists():
        try:
            rc = json.loads(rc_path.read_text())
            returncode, finished_at = int(rc["returncode"]), float(rc["finished_at"])
        except (OSError, ValueError, KeyError, TypeError):
            returncode = None
    if returncode is not None:
        status = "done" if returncode == 0 else "failed"
    elif pid > 0 and _alive(pid):
        status = "running"
    else:
        status = "lost"
    error = None
    if status == "failed":
        error = error_line(_tail(log)) or f"exit code {returncode}"
    elif status == "lost":
        error = "the job's process ended without reporting (killed?); rerun it to resume"
    return Job(
        id=job_id,
        argv=argv,
        label=str(meta.get("label", " ".join(argv))),
        pid=pid,
        started_at=float(meta.get("started_at", 0.0)),
        log=log,
        status=status,
        returncode=returncode,
        finished_at=finished_at,
        error=error,
        detectors=tuple(str(d) for d in meta.get("detectors", ())),
    )


def list_jobs(workspace: Path) -> list[Job]:
    """All jobs of the workspace, newest first (none, and nothing created, in a workspace
    where no job was started yet)."""
    folder = Path(workspace) / JOBS_DIR
    jobs = [j for p in folder.glob("*.json") if (j := _read(p)) is not None] if folder.is_dir() else []
    return sorted(jobs, key=lambda j: j.started_at, reverse=True)


def get_job(workspace: Path, job_id: str) -> Job | None:
    if not re.fullmatch(r"[0-9a-f]{12}", job_id):
        return None
    return _read(jobs_dir(workspace) / f"{job_id}.json")


def launch(
    workspace: Path, argv: Sequence[str], label: str | None = None, detectors: Sequence[str] = ()
) -> tuple[Job, bool]:
    """Start ``interp <argv> --workspace <workspace>`` in the background; ``detectors``: those
    it runs, in order (its progress is read from their runs in the store).

    Returns (job, started): when the same command is already running, that job and False.
    """
    workspace = Path(workspace).resolve()
    full = [*argv, "--workspace", str(workspace)]
    with _locked(workspace):
        for job in list_jobs(workspace):
            if job.active and job.argv == full:
                return job, False
        job_id = uuid.uuid4().hex[:12]
        meta_path = jobs_dir(workspace) / f"{job_id}.json"
        meta: dict[str, Any] = {
            "id": job_id,
            "argv": full,
            "label": label or " ".join(argv),
            "detectors": list(detectors),
            "pid": 0,
            "started_at": time.time(),
        }
        meta_path.write_text(json.dumps(meta))
        with open(meta_path.with_suffix(".log"), "wb") as log:
            # A new session: the job outlives the dashboard and a Ctrl-C in its terminal.
            proc = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), str(meta_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=str(workspace),
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        _CHILDREN[job_id] = proc
        meta["pid"] = proc.pid
        meta_path.write_text(json.dumps(meta))
    job = _read(meta_path)
    assert job is not None
    return job, True


def stop(workspace: Path, job_id: str) -> bool:
    """Interrupt a running job (SIGINT: the run is marked interrupted and resumes later)."""
    job = get_job(workspace, job_id)
    if job is None or not job.active:
        return False
    try:
        os.killpg(job.pid, signal.SIGINT)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _main(meta_path: str) -> int:
    path = Path(meta_path)
    meta = json.loads(path.read_text())
    try:
        proc = subprocess.Popen([sys.executable, "-m", "interp.cli", *meta["argv"]])
    except OSError as exc:
        print(f"error: cannot start the job: {exc}", file=sys.stderr)
        rc = 1
    else:
        while True:
            # A stop (SIGINT to the group) reaches the CLI too, which marks its run interrupted:
            # keep waiting for it instead of killing it.
            try:
                rc = proc.wait()
                break
            except KeyboardInterrupt:
                continue
    tmp = path.with_suffix(".rc.tmp")
    tmp.write_text(json.dumps({"returncode": rc, "finished_at": time.time()}))
    tmp.replace(path.with_suffix(".rc"))
    return rc


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1]))
