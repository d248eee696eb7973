"""Run model-written Python in a separate, resource-limited interpreter (HumanEval pass@1).

HumanEval grades a completion by executing it, so code the model wrote runs on the evaluation
machine. :func:`run_python` confines it as far as the standard library allows on POSIX:

* a separate ``python -I -B`` process (isolated: no ``PYTHON*`` variables, user site or script
  directory on ``sys.path``) in its own session and a fresh temporary working directory, with an
  environment of ``PATH`` and ``TMPDIR`` (pointing at that directory) only;
* resource limits the child sets on itself before the code runs: address space (``memory_mb``),
  CPU seconds, size of any file written (``FILE_SIZE_LIMIT_MB``, which also caps stdout/stderr,
  written to files outside the working directory), no core dumps, and ``RLIMIT_NPROC`` 0 so it
  cannot fork or start threads (the kernel ignores this limit for root);
* a wall-clock timeout, after which the whole process group is killed;
* an audit hook (``sys.addaudithook``), installed before the code is compiled, that raises
  ``PermissionError`` on: every ``socket.*`` event (no network, DNS included); process creation
  and signalling (``subprocess.Popen``, ``os.system``, ``os.exec*``, ``os.spawn*``,
  ``os.posix_spawn``, ``os.fork``, ``os.forkpty``, ``os.kill``); ``ctypes``, ``sqlite3``,
  ``resource.setrlimit`` and hard links (``os.link``); opening a file for writing, appending or
  creating, or opening a directory, outside the working directory; and removing, renaming,
  creating, symlinking, truncating or changing permissions, owner or times of paths outside it
  (symlinks are resolved, and paths relative to a ``dir_fd`` through ``/proc/self/fd``; without
  /proc such paths are blocked).

Not blocked: reading any file the user running the evaluation can read, CPU and memory use up to
the limits, and writing inside the working directory. An audit hook runs in the same interpreter
as the code it watches, so it is **not a security boundary** against a determined adversary
(C extensions that do their own I/O, tampering with interpreter internals, bugs in the event
coverage): it stops the accidents a model's code makes, such as deleting or overwriting files or
fetching a URL. Run untrusted evaluations in a container or VM without network as well.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from safesteer.errors import SafesteerError

if TYPE_CHECKING:
    from safesteer.gold import HumanEvalProblem

Status = Literal["passed", "failed", "timeout", "error"]

FILE_SIZE_LIMIT_MB = 16
DETAIL_CHARS = 2000
# Exit codes of the child's prelude (the literals in _PRELUDE); others are the program's own.
_ASSERTION_FAILED, _EXCEPTION, _EARLY_EXIT = 101, 102, 103

# Runs in the child: limits, the audit hook, then the program read from stdin. The first stdin line
# is a nonce printed only after the program ran to its end, so an early os._exit(0) cannot pass.
_PRELUDE = r"""
import linecache, os, resource, sys, traceback

for name, soft, hard in __import__("json").loads(sys.argv[2]):
    if hasattr(resource, name):
        limit = getattr(resource, name)
        current = resource.getrlimit(limit)[1]
        if current != resource.RLIM_INFINITY:
            hard = min(hard, current)
        resource.setrlimit(limit, (min(soft, hard), hard))

nonce, _, source = sys.stdin.read().partition("\n")
work = os.path.realpath(sys.argv[1])
BLOCKED = ("socket.", "subprocess.", "os.system", "os.exec", "os.spawn", "os.posix_spawn",
           "os.fork", "os.forkpty", "os.kill", "os.killpg", "os.link", "ctypes.", "sqlite3.",
           "resource.setrlimit", "_posixsubprocess.")
# event: ((path argument, its dir_fd argument or None), ...), and whether the last component is
# the thing acted on (True) or, if a symlink, followed (False)
PATH_EVENTS = {
    "os.remove": (((0, 1),), True), "os.rmdir": (((0, 1),), True),
    "os.mkdir": (((0, 2),), True), "os.rename": (((0, 2), (1, 3)), True),
    "os.symlink": (((1, 2),), True), "shutil.rmtree": (((0, 1),), True),
    "os.truncate": (((0, None),), False), "os.chmod": (((0, 2),), False),
    "os.chown": (((0, 3),), False), "os.utime": (((0, 3),), False),
}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC

def resolved(path, own_name, dir_fd):
    path = os.fsdecode(path)
    if dir_fd is not None:
        path = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), path)
    head, name = os.path.split(path)
    if own_name and name not in ("", ".", ".."):
        return os.path.join(os.path.realpath(head or "."), name)
    return os.path.realpath(path)

def outside(path, own_name=False, dir_fd=None):
    if isinstance(path, int):
        return False
    try:
        return not (resolved(path, own_name, dir_fd) + os.sep).startswith(work + os.sep)
    except OSError:  # a dir_fd that cannot be resolved (no /proc)
        return True

def opens_for_writing(mode, flags):
    if isinstance(mode, str):
        return any(letter in mode for letter in "wax+")
    return bool(flags & WRITE_FLAGS)

def dir_fd_of(args, index):  # None when absent or the default (-1 for os.*, None for shutil)
    value = args[index] if index is not None and index < len(args) else None
    return value if isinstance(value, int) and value >= 0 else None

def hook(event, args):
    blocked = event.startswith(BLOCKED)
    if event == "open" and outside(args[0]):
        blocked = opens_for_writing(args[1], args[2]) or os.path.isdir(args[0])
    elif event in PATH_EVENTS:
        pairs, own_name = PATH_EVENTS[event]
        blocked = any(outside(args[path], own_name, dir_fd_of(args, dir_fd))
                      for path, dir_fd in pairs)
    if blocked:
        raise PermissionError(f"sandbox: {event} blocked")

def report(code):
    namespace.clear()  # frees what the program allocated (a MemoryError's traceback needs room)
    if code != 103:
        traceback.print_exc()
    sys.stderr.flush()
    os._exit(code)

linecache.cache["<program>"] = (len(source), None, source.splitlines(True), "<program>")
namespace = {"__name__": "__main__"}
sys.addaudithook(hook)
try:
    exec(compile(source, "<program>", "exec"), namespace)
except AssertionError:
    report(101)
except SystemExit as stop:
    print(f"program exited before its end (code {stop.code!r})", file=sys.stderr)
    report(103)
except BaseException:
    report(102)
sys.stdout.flush()
print("\n" + nonce, flush=True)
os._exit(0)
"""


@dataclass(frozen=True)
class SandboxResult:
    """How a program ended: ``passed`` only if it ran to its end within the limits.

    ``status`` is "failed" for an uncaught ``AssertionError`` (a test failed), "timeout" for the
    wall-clock or CPU limit, and "error" for anything else (another exception, a blocked
    operation, ``MemoryError``, an early exit, a signal). ``detail`` is the end of stderr or the
    reason, at most ``DETAIL_CHARS`` characters.
    """

    passed: bool
    status: Status
    detail: str


def _limits(timeout_s: float, memory_mb: int) -> list[tuple[str, int, int]]:
    cpu_seconds = max(1, math.ceil(timeout_s))
    return [("RLIMIT_AS", memory_mb << 20, memory_mb << 20),
            ("RLIMIT_CPU", cpu_seconds, cpu_seconds + 1),
            ("RLIMIT_FSIZE", FILE_SIZE_LIMIT_MB << 20, FILE_SIZE_LIMIT_MB << 20),
            ("RLIMIT_CORE", 0, 0),
            ("RLIMIT_NPROC", 0, 0)]


def _tail(path: Path) -> str:
    with path.open("rb") as handle:
        handle.seek(max(0, path.stat().st_size - DETAIL_CHARS))
        return handle.read().decode("utf-8", errors="replace")


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _classify(returncode: int, stdout: str, stderr: str, nonce: str) -> SandboxResult:
    if returncode == 0 and stdout.rstrip().endswith(nonce):
        return SandboxResult(True, "passed", "")
    if returncode == _ASSERTION_FAILED:
        return SandboxResult(False, "failed", stderr.strip() or "assertion failed")
    if returncode == -signal.SIGXCPU:
        return SandboxResult(False, "timeout", "CPU time limit exceeded")
    if returncode < 0:
        return SandboxResult(False, "error", f"killed by {_signal_name(-returncode)}")
    if returncode in (0, _EXCEPTION, _EARLY_EXIT):
        return SandboxResult(False, "error", stderr.strip() or "exited before its end")
    return SandboxResult(False, "error", f"exit code {returncode}: {stderr.strip()}".strip())


def run_python(code: str, timeout_s: float = 10.0, memory_mb: int = 1024) -> SandboxResult:
    """Execute ``code`` as ``__main__`` in a sandboxed child interpreter (see the module docstring
    for what is and is not blocked) and report how it ended. The temporary directory is removed
    afterwards. POSIX only."""
    if os.name != "posix":
        raise SafesteerError("the code sandbox needs a POSIX system (resource limits, sessions)")
    nonce = secrets.token_hex(16)
    with tempfile.TemporaryDirectory(prefix="safesteer-sandbox-", ignore_cleanup_errors=True) as root:
        work = Path(root) / "work"
        work.mkdir()
        stdout_path, stderr_path = Path(root) / "stdout", Path(root) / "stderr"
        env = {"PATH": os.environ.get("PATH", os.defpath), "TMPDIR": str(work)}
        command = [sys.executable, "-I", "-B", "-c", _PRELUDE, str(work),
                   json.dumps(_limits(timeout_s, memory_mb))]
        with stdout_path.open("wb") as stdout, stderr_path.open("wb") as stderr:
            process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=stdout, stderr=stderr,
                                       cwd=work, env=env, start_new_session=True)
            try:
                process.communicate(f"{nonce}\n{code}".encode(), timeout=timeout_s)
            except subprocess.TimeoutExpired:
                return SandboxResult(False, "timeout", f"killed after {timeout_s:g} s wall clock")
            finally:
                if process.returncode is None:
                    _kill_group(process)
        return _classify(process.returncode, _tail(stdout_path), _tail(stderr_path), nonce)


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL the child's whole process group, then reap the child.

    Only called before the child is reaped: until then its pid, which is also the group id (it
    leads its own session), cannot be reused by an unrelated process.
    """
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def humaneval_program(problem: HumanEvalProblem, completion: str) -> str:
    """prompt + completion + tests + ``check(entry_point)``.

    A bare body (base-model style) continues the prompt's function; a whole function (chat style,
    see :func:`~safesteer.evaluate.grading.extract_code`) follows the docstring-only stub and
    replaces it, so both forms run.
    """
    return (f"{problem.prompt}{completion}\n\n{problem.test}\n\n"
            f"check({problem.entry_point})\n")


def humaneval_pass(problem: HumanEvalProblem, completion: str, timeout_s: float = 10.0,
                   memory_mb: int = 1024) -> SandboxResult:
    """Whether ``completion`` passes the problem's unit tests in the sandbox."""
    return run_python(humaneval_program(problem, completion), timeout_s, memory_mb)
