"""Run many short script invocations as real processes, paying the torch/diffusers import once.

Each ``python script.py ...`` a test starts spends seconds importing torch, diffusers and transformers before the
script reads its first flag. For a table of runs that all stop early (bad inputs), that import is nearly the whole
cost. Here one server process (``python tests/forked_scripts.py``, started by `run_forked`) imports those packages
once and then forks a child per run: the child is a fresh process for everything that matters (its own exit
status, stdout and stderr, logging, argv and global state, nothing left over for the next run), and runs the
script's ``__main__`` block as ``python script.py args`` would, in the repo root with conftest.SCRIPT_ENV. Before
forking, the server runs each script with a ``__main__`` guard once under another name: its imports and definitions,
not its command line, so the children start with every module the script needs.

The server reads the runs as JSON from stdin (a list of argv lists, the script first) and answers one JSON list of
``{"returncode", "stdout", "stderr"}``, like `subprocess.run`'s result.
"""

import json
import os
import subprocess
import sys
import tempfile
from types import SimpleNamespace

from conftest import ROOT

CHILD_TIMEOUT_S = 300


def run_forked(runs: list[list[str]], env: dict, timeout: float = 600) -> list[SimpleNamespace]:
    """``runs``: argv lists (``[script, *args]``, paths relative to the repo root). Returns, per run, what
    ``subprocess.run(capture_output=True, text=True)`` would: ``returncode``, ``stdout``, ``stderr``."""
    request = json.dumps([[str(part) for part in argv] for argv in runs])
    server = subprocess.run(
        [sys.executable, __file__], input=request, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    if server.returncode != 0:
        raise RuntimeError(f"the fork server failed ({server.returncode}):\n{server.stderr[-5000:]}")
    return [SimpleNamespace(**result) for result in json.loads(server.stdout)]


def run_in_child(argv: list[str], stdout_fd: int, stderr_fd: int) -> None:
    """In the forked child: run ``python <argv>`` and end the process with the status Python would give."""
    import runpy
    import signal
    import traceback

    signal.alarm(CHILD_TIMEOUT_S)  # a run that hangs ends by SIGALRM: a nonzero status the test reports
    os.dup2(stdout_fd, 1)
    os.dup2(stderr_fd, 2)
    sys.argv = argv
    try:
        runpy.run_path(str(ROOT / argv[0]), run_name="__main__")
        status = 0
    except SystemExit as stop:  # what the interpreter does with it: print a message, exit 1; else the number
        status = stop.code if isinstance(stop.code, int) else 0 if stop.code is None else 1
        if not isinstance(stop.code, int | None):
            print(stop.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
        status = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def serve() -> None:
    import runpy

    runs = json.load(sys.stdin)
    sys.path.insert(0, str(ROOT))
    for script in dict.fromkeys(ROOT / argv[0] for argv in runs):
        if 'if __name__ == "__main__":' in script.read_text():  # its top level only imports and defines
            runpy.run_path(str(script), run_name="preloaded")
    results = []
    for argv in runs:
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            child = os.fork()
            if child == 0:
                run_in_child(argv, out.fileno(), err.fileno())
            _, wait_status = os.waitpid(child, 0)
            out.seek(0)
            err.seek(0)
            results.append(
                {
                    "returncode": os.waitstatus_to_exitcode(wait_status),
                    "stdout": out.read().decode(errors="replace"),
                    "stderr": err.read().decode(errors="replace"),
                }
            )
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    serve()
