"""Run the scripts the tests start as real processes, paying the torch/diffusers import once per test process.

Each ``python script.py ...`` a test starts spends seconds importing torch, diffusers and transformers before the
script reads its first flag (``python train_spade_sdm.py --help``: 10.5 s on a 2-core machine), and ``accelerate
launch`` adds a second interpreter that only starts the first (13.8 s for the same ``--help``). For tiny models that import is most of a run's cost. Here
one server process per test process (``python tests/forked_scripts.py``, started on first use) imports those
packages once, by running every top-level script under another name (its imports and definitions, not its
command line), and then forks a child per run. The child is a fresh process for everything that matters: its own
exit status, stdout and stderr, argv, environment and global state, and nothing it does reaches the next run. It
runs the script's ``__main__`` block as ``python script.py args`` would (the script's folder first on sys.path,
stdin empty), and ends as an interpreter does: non-daemon threads joined, ``atexit`` handlers run.

``accelerate launch ...`` runs accelerate's own launch command (its parser, its checks, the environment its simple
launcher builds) with only the last step changed: the script runs in the forked child instead of a new interpreter
(so a failed run ends with the script's own status and stderr, where accelerate would add its CalledProcessError
traceback and end with 1).
Anything else (torchrun, several processes) is left to `subprocess.run` by the caller.

What a fresh interpreter would catch and a fork cannot (a script that works only because the server imported a
module it forgot to import) is caught by the tests that start scripts for real: the drivers (demo.py,
scripts/*.py) start every stage as a new interpreter, and tests/test_byte_identical.py runs the pipelines so.

Protocol: one JSON request per line on the server's stdin (``{"argv": [...], "timeout": seconds}``, argv as
`run_script` builds it after the interpreter), one JSON answer per line on its stdout
(``{"returncode", "stdout", "stderr"}``).
"""

import atexit
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE_LAUNCH = ["-m", "accelerate.commands.launch"]


class ScriptServer:
    """The client side: starts the server on first use, and again if it died."""

    def __init__(self, env: dict):
        self.env = env
        self.process = None
        self.log = None

    def start(self):
        # The server's own stderr (its import errors, if any), open for as long as the server runs.
        self.log = tempfile.TemporaryFile()  # noqa: SIM115
        self.process = subprocess.Popen(
            [sys.executable, __file__], cwd=ROOT, env=self.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self.log, text=True,
        )  # fmt: skip
        atexit.register(self.stop)

    def stop(self):
        if self.process and self.process.poll() is None:
            self.process.stdin.close()
            self.process.wait(timeout=30)
        if self.log:
            self.log.close()

    def run(self, argv: list, timeout: float) -> SimpleNamespace:
        if self.process is None or self.process.poll() is not None:
            self.start()
        request = {"argv": [str(part) for part in argv], "timeout": timeout}
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        answer = self.process.stdout.readline()
        if not answer:
            self.log.seek(0)
            raise RuntimeError(f"the fork server died:\n{self.log.read().decode(errors='replace')[-5000:]}")
        result = SimpleNamespace(args=request["argv"], **json.loads(answer))
        if result.returncode == -signal.SIGALRM:
            raise subprocess.TimeoutExpired(request["argv"], timeout, result.stdout, result.stderr)
        return result


_server: ScriptServer | None = None  # this test process's


def run_forked(argv: list, env: dict, timeout: float = 600) -> SimpleNamespace:
    """``python <argv>`` (``[script, *args]``, or accelerate launch's ``-m accelerate.commands.launch ...``) in a
    child of this test process's server, with ``env`` (the server's, fixed at its start). Returns what
    ``subprocess.run(capture_output=True, text=True)`` would: ``returncode``, ``stdout``, ``stderr``; raises
    ``subprocess.TimeoutExpired`` past ``timeout``."""
    global _server
    if _server is None or _server.env != env:
        if _server:
            _server.stop()
        _server = ScriptServer(dict(env))
    return _server.run(argv, timeout)


# ---------------------------------------------------------------------------------------------------------------
# The server


def launch_in_this_process(launch_argv: list[str]) -> None:
    """``accelerate launch <launch_argv>`` as accelerate runs it, except that its simple launcher runs the script
    here (this process is already the fresh child) instead of in a new interpreter."""
    from accelerate.commands import launch

    def run_here(args):
        command, environment = launch.prepare_simple_launcher_cmd_env(args)
        assert command[0] == sys.executable, command
        os.environ.clear()
        os.environ.update(environment)
        run_script(command[1:])

    def refuse(args):
        raise RuntimeError("the fork server runs one process: start multi-process launches with subprocess.run")

    launch.simple_launcher = run_here
    for name in ("multi_gpu_launcher", "deepspeed_launcher", "tpu_launcher", "tpu_pod_launcher", "sagemaker_launcher"):
        if hasattr(launch, name):
            setattr(launch, name, refuse)
    launch.launch_command(launch.launch_command_parser().parse_args(launch_argv))


def run_script(argv: list[str]) -> None:
    """``python <argv>``: the script's ``__main__`` block, with sys.argv and sys.path[0] as the interpreter sets
    them."""
    import runpy

    if argv[0] == "-m":
        sys.argv = [argv[1], *argv[2:]]
        sys.path[0] = str(Path.cwd())
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        return
    script = (ROOT / argv[0]).resolve()
    sys.argv = list(argv)
    sys.path[0] = str(script.parent)
    runpy.run_path(str(script), run_name="__main__")


def exit_status(stop: SystemExit) -> int:
    """What the interpreter does with an uncaught SystemExit: print a message and exit 1, else the number."""
    if stop.code is None or isinstance(stop.code, int):
        return stop.code or 0
    print(stop.code, file=sys.stderr)
    return 1


def run_in_child(request: dict, stdout_fd: int, stderr_fd: int) -> None:
    """In the forked child: run the request and end the process with the status Python would give."""
    import traceback

    signal.alarm(max(1, int(request["timeout"])))  # a run that hangs ends by SIGALRM; the client raises
    stdin = os.open(os.devnull, os.O_RDONLY)
    os.dup2(stdin, 0)
    os.dup2(stdout_fd, 1)
    os.dup2(stderr_fd, 2)
    argv = request["argv"]
    try:
        if argv[: len(ACCELERATE_LAUNCH)] == ACCELERATE_LAUNCH:
            launch_in_this_process(argv[len(ACCELERATE_LAUNCH) :])
        else:
            run_script(argv)
        status = 0
    except SystemExit as stop:
        status = exit_status(stop)
    except BaseException:
        traceback.print_exc()
        status = 1
    # The interpreter's own exit: join the non-daemon threads, run the atexit handlers, flush.
    try:
        threading._shutdown()
        atexit._run_exitfuncs()
    except BaseException:
        traceback.print_exc()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def preload() -> None:
    """Import what the scripts import: run each top-level script whose command line sits behind a ``__main__``
    guard under another name."""
    import runpy

    sys.path[0] = str(ROOT)  # not tests/, this file's folder: each child sets its script's
    for script in sorted(ROOT.glob("*.py")):
        if 'if __name__ == "__main__":' in script.read_text():
            runpy.run_path(str(script), run_name="preloaded")
    import accelerate.commands.launch  # noqa: F401


def serve() -> None:
    answers = os.fdopen(os.dup(1), "w")  # the protocol's channel; anything else printed goes to stderr
    os.dup2(2, 1)
    preload()
    for line in sys.stdin:
        request = json.loads(line)
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            sys.stdout.flush()
            sys.stderr.flush()
            child = os.fork()
            if child == 0:
                run_in_child(request, out.fileno(), err.fileno())
            _, wait_status = os.waitpid(child, 0)
            out.seek(0)
            err.seek(0)
            answer = {
                "returncode": os.waitstatus_to_exitcode(wait_status),
                "stdout": out.read().decode(errors="replace"),
                "stderr": err.read().decode(errors="replace"),
            }
        answers.write(json.dumps(answer) + "\n")
        answers.flush()


if __name__ == "__main__":
    serve()
