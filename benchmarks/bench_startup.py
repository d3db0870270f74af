#!/usr/bin/env python
"""How long the scripts take to start, and to stop on inputs they refuse; prints a table and appends it to RESULTS.md.

    python benchmarks/bench_startup.py               # every script's --help, and the two fail-fast errors
    python benchmarks/bench_startup.py --repeats 5 --scripts evaluate.py

The fail-fast rows are the timings the tests no longer assert (a wall-clock bound fails on a busy machine and
says nothing on a fast one): evaluate.py asked for FID without Inception weights, and prepare_sidewalk.py offline
without --data_dir, must each stop with their message in about the time it takes to import their libraries, not
wait on a download. The --help rows give that import time for comparison. Each row runs its command --repeats
times, each a fresh offline process with one thread (as the test suite runs them), and reports the median and
the slowest run.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import RESULTS, append_results  # noqa: E402

SCRIPTS = (
    "train_seg_mask_diffusion.py",
    "train_controlnet_seg.py",
    "train_spade_sdm.py",
    "generate_joint_image_mask_diffusion.py",
    "generate_controlnet_seg.py",
    "generate_spade_sdm.py",
    "evaluate.py",
    "prepare_sidewalk.py",
    "demo.py",
)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scripts", nargs="+", default=list(SCRIPTS), choices=SCRIPTS, help="Scripts to time.")
    parser.add_argument("--repeats", type=int, default=3, help="Runs per row.")
    parser.add_argument("--skip_help", action="store_true", help="Only the fail-fast rows.")
    parser.add_argument("--results", default=str(RESULTS))
    parser.add_argument("--note", default="", help="A paragraph to add below the table.")
    return parser.parse_args()


def timed(command: list, env: dict, repeats: int, expect_failure: bool, expect_text: str | None = None) -> list:
    """Seconds per run of ``python <command>``; checks the exit status (and message) every time."""
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = subprocess.run([sys.executable, *map(str, command)], cwd=ROOT, env=env, capture_output=True, text=True)
        seconds.append(time.perf_counter() - start)
        output = result.stdout + result.stderr
        if (result.returncode != 0) != expect_failure or (expect_text and expect_text not in output):
            raise SystemExit(f"{command} exited {result.returncode}, not as expected:\n{output[-3000:]}")
    return seconds


def row(setup: str, measurement: str, seconds: list) -> dict:
    result = f"{statistics.median(seconds):.2f} s median, {max(seconds):.2f} s slowest of {len(seconds)}"
    print(f"{setup}: {measurement}: {result}", flush=True)
    return {"setup": setup, "measurement": measurement, "result": result}


def main(args):
    work = Path(tempfile.mkdtemp(prefix="bench_startup_"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    env["OMP_NUM_THREADS"] = "1"
    rows = []
    if not args.skip_help:
        for script in args.scripts:
            rows.append(row(script, "--help", timed([script, "--help"], env, args.repeats, expect_failure=False)))

    if "evaluate.py" in args.scripts:
        from segdiff.toy import make_toy_dataset

        toy = make_toy_dataset(work / "toy", num_images=4, size=32, seed=0)
        command = ["evaluate.py", "--generated_dir", toy, "--real_dir", toy, "--metrics", "fid"]
        # An empty torch hub: no cached Inception weights, so the script must stop and name the file.
        seconds = timed(
            command, {**env, "TORCH_HOME": str(work / "empty_hub")}, args.repeats, True, "--inception_weights"
        )
        rows.append(row("evaluate.py", "--metrics fid without Inception weights: error naming the file", seconds))

    if "prepare_sidewalk.py" in args.scripts:
        command = ["prepare_sidewalk.py", "--output_dir", work / "sidewalk"]
        seconds = timed(command, {**env, "HF_DATASETS_CACHE": str(work / "hf_cache")}, args.repeats, True, "--data_dir")
        rows.append(row("prepare_sidewalk.py", "offline, no --data_dir: error naming --data_dir", seconds))
        if (work / "sidewalk").exists():
            raise SystemExit("prepare_sidewalk.py wrote its --output_dir before refusing")

    append_results("bench_startup.py", rows, args.results, args.note)


if __name__ == "__main__":
    main(parse_args())
