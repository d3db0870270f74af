"""tests/forked_scripts.py reports a run as `python script.py` would: test_bad_inputs.py's verdicts rest on it."""

import subprocess
import sys

from conftest import SCRIPT_ENV
from forked_scripts import run_forked

SCRIPTS = {
    "argparse_error.py": "import argparse\nargparse.ArgumentParser().parse_args(['--nope'])\n",
    "exit_message.py": "import sys\nprint('out')\nsys.exit('error: --flag names the fix')\n",
    "exit_3.py": "raise SystemExit(3)\n",
    "crash.py": "import logging\nlogging.basicConfig()\nlogging.getLogger('x').warning('logged')\n1 / 0\n",
    "ok.py": "import sys\nprint(sys.argv[1:])\n",
}


def test_each_run_ends_as_a_fresh_interpreter_would(tmp_path):
    for name, code in SCRIPTS.items():
        (tmp_path / name).write_text(code)
    runs = [[str(tmp_path / name), "a", "b"] for name in SCRIPTS]
    forked = run_forked(runs, SCRIPT_ENV)
    for argv, result in zip(runs, forked, strict=True):
        fresh = subprocess.run([sys.executable, *argv], env=SCRIPT_ENV, capture_output=True, text=True)
        assert (result.returncode, result.stdout) == (fresh.returncode, fresh.stdout), argv[0]
        # the same stderr, up to the frames a runpy call adds to a traceback
        assert result.stderr.splitlines()[-1:] == fresh.stderr.splitlines()[-1:], argv[0]
    assert [result.returncode for result in forked] == [2, 1, 3, 1, 0]
    assert "Traceback" in forked[3].stderr and "WARNING:x:logged" in forked[3].stderr
