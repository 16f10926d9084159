"""tools/device_check.sh: its dry run (the GPU check's stages on the CPU, strict stand-in, tiny sizes) passes."""

import json
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"


@pytest.mark.skipif(not SHAKESPEARE.exists(), reason="../shared/data/tinyshakespeare.txt is not beside the checkout")
def test_the_device_checks_dry_run_passes_and_writes_its_json(tmp_path):
    done = subprocess.run([str(ROOT / "tools" / "device_check.sh"), str(tmp_path), "--dry-run"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    for name in ("environment", "tests", "steps", "recipe"):
        assert json.loads((tmp_path / f"{name}.json").read_text()) == summary[name]
    assert summary["dry_run"] and summary["environment"]["device"] == "strict"
    assert summary["tests"]["returncode"] == 0 and " passed" in summary["tests"]["tail"]
    float32 = [row for row in summary["steps"]["rows"] if row["dtype"] == "float32"]
    assert float32 and all(row["mnn"]["status"] == row["torch"]["status"] == "ok" for row in float32)
    assert all(row["first_loss_difference"] < 1e-5 for row in float32)  # the same weights, data and step
    bf16 = [row for row in summary["steps"]["rows"] if row["dtype"] == "bf16"]  # mnn.precision against autocast
    assert bf16 and all(row["mnn"]["status"] == row["torch"]["status"] == "ok" for row in bf16)
    assert all(row["first_loss_difference"] < 1e-3 for row in bf16)
    recipe = summary["recipe"]
    assert recipe["returncode"] == 0 and recipe["last_iter"] == 20 and [p["iter"] for p in recipe["val_curve"]] == [0, 10, 20]
