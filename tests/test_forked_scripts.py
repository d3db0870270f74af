"""tests/forked_scripts.py reports a run as `python script.py` (or `accelerate launch script.py`) would: every test
that starts a script through conftest.run_script rests on it."""

import subprocess
import sys

from conftest import ROOT, SCRIPT_ENV
from forked_scripts import run_forked

# Each prints what a fresh interpreter would show of its start and its end.
SCRIPTS = {
    "argparse_error.py": "import argparse\nargparse.ArgumentParser().parse_args(['--nope'])\n",
    "exit_message.py": "import sys\nprint('out')\nsys.exit('error: --flag names the fix')\n",
    "exit_3.py": "raise SystemExit(3)\n",
    "crash.py": "import logging\nlogging.basicConfig()\nlogging.getLogger('x').warning('logged')\n1 / 0\n",
    "ok.py": "import sys\nprint(sys.argv, __name__, __file__, sys.path[0], repr(sys.stdin.read()))\n",
    # Ends as an interpreter does: the main block returns, then a non-daemon thread finishes, then atexit runs.
    "exit_order.py": (
        "import atexit, threading, time\n"
        "atexit.register(lambda: print('atexit', flush=True))\n"
        "threading.Thread(target=lambda: (time.sleep(0.2), print('thread', flush=True))).start()\n"
        "print('main', flush=True)\n"
    ),
    # A module the server imported is not imported by the script: it must import what it uses.
    "forgot_import.py": "import sys\nprint('torch' in dir(), 'segdiff' in globals())\n",
    "environment.py": (
        "import os\n"
        "print(sorted((k, v) for k, v in os.environ.items() if k.startswith('ACCELERATE_')))\n"
        "from accelerate import Accelerator\nprint(Accelerator().state.distributed_type)\n"
    ),
}


def test_each_run_ends_as_a_fresh_interpreter_would(tmp_path):
    for name, code in SCRIPTS.items():
        (tmp_path / name).write_text(code)
    runs = {name: [str(tmp_path / name), "a", "b"] for name in SCRIPTS}
    forked = {name: run_forked(argv, SCRIPT_ENV) for name, argv in runs.items()}
    for name, argv in runs.items():
        fresh = subprocess.run(
            [sys.executable, *argv], cwd=ROOT, env=SCRIPT_ENV, capture_output=True, text=True, stdin=subprocess.DEVNULL
        )
        assert (forked[name].returncode, forked[name].stdout) == (fresh.returncode, fresh.stdout), name
        # the same stderr, up to the frames a runpy call adds to a traceback
        assert forked[name].stderr.splitlines()[-1:] == fresh.stderr.splitlines()[-1:], name
    assert [result.returncode for result in forked.values()] == [2, 1, 3, 1, 0, 0, 0, 0]
    assert "Traceback" in forked["crash.py"].stderr and "WARNING:x:logged" in forked["crash.py"].stderr
    assert forked["ok.py"].stdout == f"{runs['ok.py']} __main__ {tmp_path / 'ok.py'} {tmp_path} ''\n"
    assert forked["exit_order.py"].stdout.split() == ["main", "thread", "atexit"]
    assert forked["forgot_import.py"].stdout == "False False\n"


def test_accelerate_launch_sets_what_a_real_launch_sets(tmp_path):
    script = tmp_path / "environment.py"
    script.write_text(SCRIPTS["environment.py"])
    launch = ["-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1", "--mixed_precision",
              "bf16", "--dynamo_backend", "no", str(script)]  # fmt: skip
    forked = run_forked(launch, SCRIPT_ENV)
    fresh = subprocess.run([sys.executable, *launch], cwd=ROOT, env=SCRIPT_ENV, capture_output=True, text=True)
    assert forked.returncode == fresh.returncode == 0, forked.stderr
    assert forked.stdout == fresh.stdout
    assert "('ACCELERATE_MIXED_PRECISION', 'bf16')" in forked.stdout

    # Several processes are not the server's: the run says so instead of starting one.
    refused = run_forked([*launch[:3], "2", "--multi_gpu", *launch[4:]], SCRIPT_ENV)
    assert refused.returncode != 0 and "subprocess.run" in refused.stderr
