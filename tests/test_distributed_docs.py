"""docs/distributed_example.py, the runnable example of docs/distributed.md, on 4 gloo CPU ranks."""

import math
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(not dist.is_available() or torch.cuda.is_available(),
                    reason="runs the example's CPU (gloo) path; needs torch.distributed")
def test_distributed_example_trains():
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
                          os.path.join(ROOT, "docs", "distributed_example.py")],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    losses = [float(v) for v in re.findall(r"^step \d+  loss (\S+)$", run.stdout, re.M)]
    assert len(losses) == 5, run.stdout
    # random tokens over a 256-token vocabulary: the loss starts near ln(256) and stays finite
    assert all(math.isfinite(v) for v in losses) and abs(losses[0] - math.log(256)) < 0.5
