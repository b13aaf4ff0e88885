"""Run untrusted generated code and its tests in a separate, locked-down process.

The official evaluator `exec`s model output inside the evaluator itself; one `os.system("rm -rf ~")`
or `while True: os.fork()` in a generation takes the run (or the machine) with it. Here each program
runs in a fresh interpreter with:

- a throw-away working directory (deleted afterwards), the program's only writable place;
- an unprivileged uid when we are root (root ignores file permissions and RLIMIT_NPROC), so files
  outside the folder cannot be written or deleted and /proc/<parent>/environ cannot be read;
- rlimits: address space (memory bombs raise MemoryError), process count (fork bombs fail),
  file size, CPU seconds, no core dumps;
- an empty network namespace and private tmpfs /tmp, /var/tmp, /dev/shm when `unshare` is allowed
  (root here), and in any case a prelude that makes socket creation raise;
- a scrubbed environment (no host variable reaches the program);
- its own process group, killed as a whole on timeout.
"""
from __future__ import annotations

import ctypes
import itertools
import os
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

#: uids/gids programs run as when the evaluator is root: a fresh id per run (no real account, no other
#: run shares it), so RLIMIT_NPROC (counted per uid) is the run's own and leftovers can be swept by uid.
SANDBOX_UID_BASE = 100_000
_run_ids = itertools.count()


# `pragma: no mutate` marks the five lines whose mutants would harm the machine running the tests (uid 0, SIGKILL
# to every process, root without RLIMIT_NPROC, a tmpfs over the host's /tmp): tools/results/mutation.md
def _fresh_uid() -> int:
    return SANDBOX_UID_BASE + (os.getpid() % 1000) * 1000 + next(_run_ids) % 1000  # pragma: no mutate
_CLONE_NEWNET, _CLONE_NEWNS = 0x40000000, 0x00020000
_MS_NOSUID, _MS_NODEV, _MS_REC, _MS_PRIVATE = 2, 4, 16384, 1 << 18

_PRELUDE = """\
import socket as _s, _socket as _ss
def _no_network(*a, **k):
    raise OSError("network access is disabled in the unisd sandbox")
_s.socket = _ss.socket = _s.create_connection = _s.socketpair = _no_network
del _s, _ss, _no_network
"""


@dataclass(frozen=True)
class SandboxResult:
    """passed: the program ran to its end and exited 0 within the limits.

    reason: 'passed', 'timeout after N s', or the last line of its output (usually the error).
    """

    passed: bool
    reason: str
    returncode: int | None
    seconds: float


def _interpreter() -> str:
    """A Python the unprivileged uid can execute (the venv's may live under a private /root)."""
    if os.geteuid() != 0:
        return sys.executable
    for cand in (sys.executable, os.path.realpath(sys.executable), "/usr/bin/python3", "/usr/local/bin/python3"):
        if cand and os.path.exists(cand) and _world_executable(cand):
            return cand
    return sys.executable


def _world_executable(path: str) -> bool:
    """True if every directory on the way and the file itself are executable by 'other'."""
    p = Path(os.path.realpath(path))
    return all(os.stat(part).st_mode & 0o001 for part in [p, *p.parents])


def _limits(memory_mb: int, cpu_s: int, nproc: int, fsize_mb: int, drop_to: int | None):
    """preexec_fn: runs in the child between fork and exec (order matters: limits, netns, then setuid)."""

    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (memory_mb << 20, memory_mb << 20))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize_mb << 20, fsize_mb << 20))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
        _isolate()
        if drop_to is not None:
            os.setgroups([])
            os.setgid(drop_to)
            os.setuid(drop_to)

    return apply


def _isolate() -> None:
    """New network and mount namespaces (best effort: needs CAP_SYS_ADMIN, which root has here).

    The cwd is already the work folder (subprocess chdirs before preexec_fn), so fresh tmpfs mounts over
    the world-writable /tmp, /var/tmp and /dev/shm hide every host file there and whatever the program
    writes to them vanishes with the namespace.
    """
    try:
        libc = ctypes.CDLL(None)
        if libc.unshare(_CLONE_NEWNET | _CLONE_NEWNS) != 0:  # pragma: no mutate
            libc.unshare(_CLONE_NEWNET)
            return
        if libc.mount(b"none", b"/", None, _MS_REC | _MS_PRIVATE, None) != 0:
            return
        for folder in (b"/tmp", b"/var/tmp", b"/dev/shm"):
            if os.path.isdir(folder):
                libc.mount(b"tmpfs", folder, b"tmpfs", _MS_NOSUID | _MS_NODEV, b"size=16m,mode=1777")
    except Exception:
        pass


def _kill_uid(uid: int) -> None:
    """Kill any process still running as the sandbox uid (a child that left our process group)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
            real_uid = int(status.split("\nUid:")[1].split()[0])
        except (OSError, IndexError, ValueError):
            continue
        if real_uid == uid:  # pragma: no mutate
            try:
                os.kill(int(entry.name), signal.SIGKILL)
            except OSError:
                pass


def run_program(
    source: str,
    timeout: float = 10.0,
    memory_mb: int = 1024,
    nproc: int = 32,
    fsize_mb: int = 16,
) -> SandboxResult:
    """Run `source` (a whole Python program) in the sandbox; passed iff it exits 0 before `timeout`."""
    root = os.geteuid() == 0  # pragma: no mutate
    drop_to = _fresh_uid() if root else None  # pragma: no mutate
    workdir = tempfile.mkdtemp(prefix="unisd-sandbox-")
    start = time.monotonic()
    try:
        if drop_to is not None:
            os.chown(workdir, drop_to, drop_to)
        os.chmod(workdir, 0o700)
        program = Path(workdir) / "main.py"
        # A program only passes by reaching its last line: `sys.exit(0)` before the asserts is a failure.
        token = secrets.token_hex(12)
        program.write_text(f"{_PRELUDE}\n{source}\n\nprint({token!r}, flush=True)\n", encoding="utf-8")
        log = Path(workdir) / "output.log"
        env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8",
               "PYTHONDONTWRITEBYTECODE": "1", "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
        with open(log, "wb") as out, open(program, "rb") as src:  # the program writes through these fds
            proc = subprocess.Popen(
                [_interpreter(), "-I", *(["-S"] if root else []), "-"],
                cwd=workdir, env=env, stdin=src, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, close_fds=True,
                preexec_fn=_limits(memory_mb, int(timeout) + 1, nproc, fsize_mb, drop_to),
            )
            try:
                rc: int | None = proc.wait(timeout=timeout)
                last = _last_line(log)
                if rc == 0 and last != token:
                    rc, reason = -1, "exited before the end of the tests"
                else:
                    reason = "passed" if rc == 0 else last or f"exit status {rc}"
            except subprocess.TimeoutExpired:
                rc, reason = None, f"timeout after {timeout:g} s"
            finally:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # the whole group: forked children too
                except OSError:
                    pass
                proc.wait()
                if drop_to is not None:
                    _kill_uid(drop_to)
        return SandboxResult(rc == 0, reason, rc, time.monotonic() - start)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _last_line(log: Path) -> str:
    """The error line of a failed run (the last non-empty line of its output), shortened."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, os.path.getsize(log) - 4096))
            tail = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    lines = [ln.strip() for ln in tail.splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c passed: 1 - C(n-c, k) / C(n, k)."""
    if n - c < k:
        return 1.0
    prob = 1.0
    for i in range(n - c + 1, n + 1):
        prob *= 1.0 - k / i
    return 1.0 - prob
