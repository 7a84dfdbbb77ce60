"""GPU clock and power while a benchmark runs: nvidia-smi samples, summarized per set of time spans.

A GPU that trains at its power limit sets its SM clock, and so every kernel's speed, by the power
the work draws (docs/benchmarks.md measures it on the H200). Two configurations whose kernels take the same
time at a fixed clock can then differ in step time. `PowerLog` samples the SM clock, the power
and the clock-event reasons in the background (`nvidia-smi --loop-ms`); `summarize` reduces the
samples inside given wall-clock spans (the timed rounds of one configuration) to the median SM
clock, the mean power, the energy per step and the fraction of samples with the software power
cap active.

    with PowerLog(torch.cuda.current_device()) as log:
        ...                                   # timed work, spans recorded with time.time()
    stats = summarize(log.samples(), spans, step_s)
"""

import datetime
import shutil
import statistics
import subprocess
import tempfile

import torch

SW_POWER_CAP = 0x4  # clocks_event_reasons.sw_power_cap (nvidia-smi --help-query-gpu)


def _smi() -> str:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        raise RuntimeError("--power needs nvidia-smi on PATH (it samples clocks and power)")
    return exe


def _gpu_id(device_index: int) -> str:
    """nvidia-smi's id of a torch device (by UUID: CUDA_VISIBLE_DEVICES renumbers torch's indices)."""
    return f"GPU-{torch.cuda.get_device_properties(device_index).uuid}"


def _power_field(exe: str, gpu: str) -> str:
    """power.draw.instant where the driver has it; power.draw (a 1 s average on recent GPUs) else."""
    probe = subprocess.run([exe, "--query-gpu=power.draw.instant", "--format=csv,noheader,nounits", "-i", gpu],
                           capture_output=True, text=True, timeout=30)
    try:
        float(probe.stdout.strip())
        return "power.draw.instant"
    except ValueError:
        return "power.draw"


class PowerLog:
    """Background nvidia-smi sampling of one GPU every `interval_ms` while the context is open."""

    def __init__(self, device_index: int, interval_ms: int = 50):
        self.device_index, self.interval_ms = device_index, interval_ms
        self.proc = self.file = None

    def __enter__(self):
        exe, gpu = _smi(), _gpu_id(self.device_index)
        self.power_field = _power_field(exe, gpu)
        query = f"timestamp,clocks.sm,{self.power_field},clocks_event_reasons.active"
        self.file = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen(
            [exe, f"--query-gpu={query}", "--format=csv,noheader,nounits", f"--loop-ms={self.interval_ms}",
             "-i", gpu], stdout=self.file, stderr=subprocess.PIPE, text=True)
        return self

    def __exit__(self, *exc):
        self.proc.terminate()
        _, err = self.proc.communicate(timeout=30)
        self.error = err.strip()
        return False

    def samples(self) -> list[tuple[float, float, float, int]]:
        self.file.seek(0)
        return parse_samples(self.file.read())


def parse_samples(text: str) -> list[tuple[float, float, float, int]]:
    """(unix time, SM MHz, watts, clock-event reasons) per line of `nvidia-smi --query-gpu=timestamp,
    clocks.sm,<power>,clocks_event_reasons.active --format=csv,noheader,nounits`; lines it could
    not fill ([N/A]) are left out."""
    rows = []
    for line in text.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 4:
            continue
        try:
            # nvidia-smi writes local time, as datetime's naive timestamp() reads it.
            t = datetime.datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
            rows.append((t, float(parts[1]), float(parts[2]), int(parts[3], 16)))
        except ValueError:
            continue
    return rows


def summarize(samples, spans, step_s: float) -> dict:
    """The samples inside any of `spans` ((start, end) unix times): their count, median SM clock,
    mean power, energy per step (mean power x step_s) and fraction with the software power cap on."""
    inside = [s for s in samples if any(start <= s[0] <= end for start, end in spans)]
    if not inside:
        return {"power_samples": 0}
    watts = statistics.fmean(s[2] for s in inside)
    return {
        "power_samples": len(inside),
        "sm_mhz_median": statistics.median(s[1] for s in inside),
        "power_w_mean": watts,
        "energy_j_per_step": watts * step_s,
        "power_capped_frac": sum(bool(s[3] & SW_POWER_CAP) for s in inside) / len(inside),
    }
