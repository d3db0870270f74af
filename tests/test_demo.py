"""`make demo` end to end, in its minute-long --quick form: every stage runs and the report is written."""

import json

from conftest import run_script


def test_quick_demo_runs_every_stage_and_reports_agreement(tmp_path):
    out = tmp_path / "demo"
    result = run_script("demo.py", "--quick", "--output_dir", out)
    summary = json.loads((out / "demo_summary.json").read_text())
    assert 0.0 <= summary["image_mask_agreement_iou"] <= 1.0
    assert set(summary["per_class"]) == {"background", "square", "disk", "triangle"}
    assert summary["num_samples"] == 8
    assert (out / "samples" / "grid.png").is_file() and (out / "joint-model" / "model_index.json").is_file()
    assert "Image/mask agreement" in result.stdout

    # A second run finds every stage done and only reports again.
    again = run_script("demo.py", "--quick", "--output_dir", out)
    assert again.stdout.count("already done") == 4
