"""safesteer.evaluate.sandbox: what sandboxed programs can and cannot do, and how their end is
reported. Every program here is harmless; the blocked ones only try to write, delete or connect."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from safesteer.evaluate.sandbox import humaneval_pass, run_python
from safesteer.gold import HumanEvalProblem

pytestmark = pytest.mark.skipif(os.name != "posix", reason="the sandbox is POSIX only")

PROBLEM = HumanEvalProblem(
    task_id="Toy/0",
    prompt='def add(a: int, b: int) -> int:\n    """Sum of a and b."""\n',
    canonical_solution="    return a + b\n",
    test="def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n",
    entry_point="add",
)


def test_a_correct_program_passes() -> None:
    result = run_python("import math\nassert math.gcd(12, 18) == 6\nprint('done')\n", timeout_s=10)
    assert (result.passed, result.status, result.detail) == (True, "passed", "")


def test_humaneval_body_and_whole_function_completions_pass() -> None:
    assert humaneval_pass(PROBLEM, PROBLEM.canonical_solution).status == "passed"
    whole_function = "def add(a: int, b: int) -> int:\n    return b + a\n"
    assert humaneval_pass(PROBLEM, whole_function).status == "passed"


def test_a_wrong_completion_fails_with_its_traceback() -> None:
    result = humaneval_pass(PROBLEM, "    return a - b\n")
    assert (result.passed, result.status) == (False, "failed")
    assert "AssertionError" in result.detail


@pytest.mark.parametrize(
    ("code", "expected"),
    [("1 / 0\n", "ZeroDivisionError"), ("def broken(:\n", "SyntaxError"),
     ("import sys\nsys.exit(0)\n", "exited before its end"),
     ("import os\nos._exit(0)\n", "exited before its end")],
)
def test_crashes_and_early_exits_are_errors(code: str, expected: str) -> None:
    result = run_python(code, timeout_s=10)
    assert (result.passed, result.status) == (False, "error")
    assert expected in result.detail


@pytest.mark.parametrize("code", ["while True:\n    pass\n", "import time\ntime.sleep(60)\n"])
def test_a_program_that_never_ends_is_killed_at_the_timeout(code: str) -> None:
    start = time.monotonic()
    result = run_python(code, timeout_s=1.0)
    assert (result.passed, result.status) == (False, "timeout")
    assert time.monotonic() - start < 5.0


def test_a_memory_bomb_fails_cleanly() -> None:
    result = run_python("blocks = []\nwhile True:\n    blocks.append(bytearray(1 << 24))\n",
                        timeout_s=10, memory_mb=256)
    assert (result.passed, result.status) == (False, "error")
    assert "MemoryError" in result.detail


def test_writing_outside_the_working_directory_is_blocked(tmp_path: Path) -> None:
    target = tmp_path / "escaped.txt"
    for code in (f"open({str(target)!r}, 'w').write('x')\n",
                 f"import os\nos.open({str(target)!r}, os.O_WRONLY | os.O_CREAT)\n",
                 f"import os\nos.symlink({str(tmp_path)!r}, 'link')\nopen('link/escaped.txt', 'a')\n",
                 f"import pathlib\npathlib.Path({str(target)!r}).touch()\n"):
        result = run_python(code, timeout_s=10)
        assert (result.status, "blocked" in result.detail) == ("error", True), code
        assert not target.exists()


def test_deleting_or_renaming_outside_files_is_blocked(tmp_path: Path) -> None:
    keep = tmp_path / "keep.txt"
    keep.write_text("precious")
    for code in (f"import os\nos.remove({str(keep)!r})\n",
                 f"import os\nos.rename({str(keep)!r}, 'stolen.txt')\n",
                 f"import shutil\nshutil.rmtree({str(tmp_path)!r})\n",
                 f"import os\nos.chmod({str(keep)!r}, 0)\n"):
        result = run_python(code, timeout_s=10)
        assert (result.status, "blocked" in result.detail) == ("error", True), code
    assert keep.read_text() == "precious"


@pytest.mark.parametrize(
    "code",
    ["import socket\nsocket.create_connection(('127.0.0.1', 9), timeout=1)\n",
     "import socket\nsocket.getaddrinfo('localhost', 80)\n",
     "import subprocess\nsubprocess.run(['true'])\n",
     "import os\nos.system('true')\n",
     "import os\nos.fork()\n",
     "import ctypes\nctypes.CDLL(None)\n"],
)
def test_network_and_processes_are_blocked(code: str) -> None:
    result = run_python(code, timeout_s=10)
    assert (result.passed, result.status) == (False, "error")
    assert "blocked" in result.detail


def test_writing_inside_the_working_directory_works() -> None:
    code = ("import os, shutil, tempfile\n"
            "assert os.listdir('.') == []\n"
            "os.makedirs('sub/dir')\n"
            "with open('sub/dir/out.txt', 'w') as handle:\n    handle.write('hello')\n"
            "assert open('sub/dir/out.txt').read() == 'hello'\n"
            "os.rename('sub/dir/out.txt', 'moved.txt')\n"
            "with tempfile.NamedTemporaryFile('w') as handle:\n    handle.write('scratch')\n"
            "shutil.rmtree('sub')\n"
            "os.remove('moved.txt')\n")
    assert run_python(code, timeout_s=10).status == "passed"


def test_the_environment_is_empty_and_the_directory_is_removed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAFESTEER_TEST_SECRET", "hunter2")
    code = ("import os\nassert 'SAFESTEER_TEST_SECRET' not in os.environ and 'HOME' not in os.environ\n"
            "assert False, os.getcwd()\n")
    result = run_python(code, timeout_s=10)
    assert result.status == "failed"
    work_dir = Path(result.detail.strip().splitlines()[-1].removeprefix("AssertionError: "))
    assert work_dir.name == "work" and not work_dir.exists()


def test_output_floods_are_cut_off() -> None:
    result = run_python("while True:\n    print('x' * 4096)\n", timeout_s=10)
    assert (result.passed, result.status) == (False, "error")
    assert "File too large" in result.detail  # Python ignores SIGXFSZ, so the write fails
