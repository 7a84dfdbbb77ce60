"""GPU time per step by kernel class, from the profile file `train.py --profile` writes.

    python benchmarks/tools/profile_classes.py docs/data/train_steady_profile.txt

Each section of the file (one configuration: two profiled steps) becomes a list of classes with
their GPU time per step and launches per step: GEMMs (cuBLAS), attention (cuDNN SDPA), AdamW
(multi-tensor kernels), loss and embedding, f8tensor's own kernels by name, inductor's generated
kernels, and every other ATen kernel (the model's elementwise code, norms, copies). The classes
sum to the section's "GPU busy" figure.
"""

import argparse
import collections
import re

# Every Triton kernel of kernels/ (by its function's name), the norm's and the loss's included.
OURS = ("cast_kernel", "amax_kernel", "row_kernel", "col_kernel", "col_amax_kernel", "block_kernel",
        "swiglu_kernel", "swiglu_backward_kernel", "rope_kernel", "rms_norm_kernel", "rms_norm_backward_kernel",
        "cross_entropy_forward_kernel", "cross_entropy_backward_kernel")
LOSS_AND_EMBEDDING = ("SoftMax", "nll_loss", "gather", "scatter", "compute_grad_weight", "radix_sort",
                      "cub::", "segment", "arange")


def kernel_class(name: str) -> str:
    if name.startswith("nvjet") or "gemm" in name.lower():
        return "GEMM"
    if "sdpa" in name or "cudnn" in name:
        return "attention"
    if "multi_tensor_apply" in name:
        return "AdamW"
    if any(k in name for k in LOSS_AND_EMBEDDING):
        return "loss and embedding"
    if name in OURS:
        return f"f8tensor: {name}"
    if name.startswith("triton_"):
        return "inductor (generated)"
    if name.startswith("Memset"):
        return "memset"
    return "other ATen (elementwise, norms, copies)"


def _ms(cell: str) -> float:
    """A profiler time cell ("1.234s", "12.5ms", "830.1us") in milliseconds."""
    for unit, factor in (("ms", 1.0), ("us", 1e-3), ("s", 1e3)):
        if cell.endswith(unit):
            return float(cell[: -len(unit)]) * factor
    raise ValueError(f"not a profiler time: {cell!r}")


def sections(text: str):
    """(label, {class: (ms per step, launches per step)}) per configuration in the file."""
    for section in text.split("== ")[1:]:
        lines = section.splitlines()
        times, counts = collections.Counter(), collections.Counter()
        for line in lines[1:]:
            # Profiler table row: name, then 10 columns; Self CUDA is the 7th field, # of Calls the last.
            parts = re.split(r"\s{2,}", line.strip())
            if len(parts) != 11 or not re.fullmatch(r"[\d.]+(s|ms|us)", parts[6]):
                continue
            name = parts[0]
            if name.startswith(("cuda", "cuLaunch", "Activity Buffer", "Command Buffer")):
                continue  # host-side API rows: no GPU time
            ms = _ms(parts[6])
            cls = kernel_class(name)
            times[cls] += ms / 2  # the table covers two steps
            counts[cls] += int(parts[10]) // 2
        yield lines[0].split(":")[0], {c: (times[c], counts[c]) for c in times}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("profile", help="a *_profile.txt file written by train.py --profile")
    a = ap.parse_args()
    with open(a.profile) as f:
        text = f.read()
    for label, classes in sections(text):
        total = sum(ms for ms, _ in classes.values())
        print(f"{label}: {total:.1f} ms per step")
        for cls, (ms, n) in sorted(classes.items(), key=lambda kv: -kv[1][0]):
            print(f"  {cls:<40} {ms:7.2f} ms  {n:5d} launches")


if __name__ == "__main__":
    main()
