"""Shared benchmark plumbing: environment row, timing, copy bandwidth, result files."""

import argparse
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import time

import torch
import triton


def environment() -> dict:
    """GPU, versions and commit, written beside every result row."""
    # A copy of the tree without .git gets the commit from the environment. A copy with a .git
    # older than its files (seen on the GPU machine) is marked "-dirty", as is any uncommitted change.
    commit = os.environ.get("F8TENSOR_COMMIT", "")
    if not commit:
        here = os.path.dirname(__file__)
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                    text=True, cwd=here).stdout.strip()
            changed = subprocess.run(["git", "diff", "--quiet", "HEAD", "--"], capture_output=True, cwd=here)
            if commit and changed.returncode != 0:
                commit += "-dirty"
        except OSError:
            pass
    return {
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor(),
        "torch": torch.__version__, "triton": triton.__version__, "torchao": _version("torchao"),
        "cuda_driver": _driver_version(), "commit": commit or "unknown",
    }


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _driver_version() -> str | None:
    """The NVIDIA driver (nvidia-smi's driver_version), or None without one."""
    if not torch.cuda.is_available() or shutil.which("nvidia-smi") is None:
        return None
    out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=30).stdout.split()
    return out[0] if out else None


def bench_ms(fn, warmup=25, rep=100) -> float:
    """Median time of fn in milliseconds (CUDA events via triton.testing.do_bench)."""
    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def host_and_wall_us(fn, n: int = 200) -> tuple[float, float]:
    """Microseconds per call of fn over n calls after one: host time (until the last call returns)
    and wall time (until the GPU has finished too). Equal when the GPU never held the CPU back."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    host = time.perf_counter() - t0
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    return host / n * 1e6, wall / n * 1e6


def host_us(fn, n: int = 200) -> float:
    """Host microseconds per call of fn (`host_and_wall_us`'s first figure)."""
    return host_and_wall_us(fn, n)[0]


def peak_mib(step) -> float:
    """CUDA memory step allocates beyond what was allocated before it, at its peak, in MiB."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def copy_bandwidth_tbps(nbytes: int = 2 << 30) -> float:
    """Device-to-device copy bandwidth, counting bytes read plus bytes written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src))
    del src, dst
    return 2 * nbytes / ms / 1e9


def gpu_ms(fn) -> float:
    """GPU time of fn in milliseconds, replayed as a CUDA graph (no host time)."""
    return triton.testing.do_bench_cudagraph(fn, rep=100)


def kernel_benchmark_start(name: str, ap: argparse.ArgumentParser | None = None):
    """A kernel benchmark's command line (--out results/<name>.jsonl, --sweep, and whatever `ap`
    already has) and header: (parsed args, environment row, this run's copy bandwidth in TB/s)."""
    ap = ap or argparse.ArgumentParser()
    ap.add_argument("--out", default=f"results/{name}.jsonl")
    ap.add_argument("--sweep", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    return (args, *environment_and_copy_bandwidth())


def environment_and_copy_bandwidth() -> tuple[dict, float]:
    """A kernel benchmark's header: the environment row and this run's copy bandwidth, printed."""
    env = environment()
    copy_bw = copy_bandwidth_tbps()
    print(f"{env}\ncopy bandwidth {copy_bw:.3f} TB/s")
    return env, copy_bw


def write_rows(path: str, rows: list[dict]):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
