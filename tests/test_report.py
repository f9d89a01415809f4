"""benchmarks/report.py: JSON -> README table and PNG chart, every figure from the JSON."""
import json
import os
import subprocess
import sys

import pytest

REPORT = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "report.py")


def write(path, device, records):
    path.write_text(json.dumps({"device": device, "date": "2026-11-22T10:00:00", "torch": "2.11", "triton": "3.6",
                                "cuda": True, "records": records}))
    return str(path)


def rec(group, name, us, baseline=False, **figs):
    return {"group": group, "name": name, "us_per_call": us, "baseline": baseline, **figs}


def test_merged_runs_fill_the_readme_and_draw_a_chart(tmp_path):
    a = write(tmp_path / "a.json", "NVIDIA H100", [rec("sample b1", "diffusers_loop", 4000.0, True),
                                                   rec("sample b1", "graph", 500.0, ms_per_step=0.5)])
    b = write(tmp_path / "b.json", "NVIDIA H100", [rec("sample b1", "graph+compile", 250.0, ms_per_step=0.25)])
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- results:start -->\nold\n<!-- results:end -->\nrest\n")
    png = tmp_path / "docs" / "results.png"
    subprocess.run([sys.executable, REPORT, a, b, "--readme", str(readme), "--png", str(png)], check=True)
    text = readme.read_text()
    assert "old" not in text and text.startswith("intro") and text.rstrip().endswith("rest")
    assert "NVIDIA H100" in text and "a.json, b.json" in text
    assert "| sample b1 | graph | 500.0 | 8.00x vs diffusers_loop | ms_per_step 0.5 |" in text
    assert "| sample b1 | graph+compile | 250.0 | 16.00x vs diffusers_loop |" in text
    assert png.stat().st_size > 1000


def test_runs_from_different_devices_are_refused(tmp_path):
    a = write(tmp_path / "a.json", "NVIDIA H100", [rec("g", "x", 1.0, True)])
    b = write(tmp_path / "b.json", "NVIDIA H200", [rec("g", "y", 1.0)])
    res = subprocess.run([sys.executable, REPORT, a, b], capture_output=True, text=True)
    assert res.returncode != 0 and "different devices" in res.stderr


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))
