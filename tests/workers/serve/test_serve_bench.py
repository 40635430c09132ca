"""The GPU serving benchmark's code path, tiny on the CPU (--smoke), so it is known to run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.slow
def test_gpu_serving_bench_smoke(tmp_path):
    out = tmp_path / "serve_gpu.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench/gpu/serve_gpu.py"), "--smoke", "--json", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["bench"] == "serve_gpu" and result["quick"] is True
    assert {r["column"] for r in result["rows"]} == {"a_base", "b_set_adapter", "c_peft_mixed", "d_ours",
                                                     "d0_ours_no_adapter"}
    assert all(r["tokens_per_s"] > 0 for r in result["rows"])
    assert {"vs_base", "vs_set_adapter", "vs_peft_mixed"} <= set(result["figures"])
