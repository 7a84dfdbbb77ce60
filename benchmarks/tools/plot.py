"""Turn benchmark result rows (results/*.jsonl or docs/data/*.jsonl) into the PNGs in docs/.

    python benchmarks/tools/plot.py kernels docs/data/kernels.jsonl docs/kernels.png
    python benchmarks/tools/plot.py kernels-table docs/data/kernels.jsonl   # markdown table
    python benchmarks/tools/plot.py linear  docs/data/linear.jsonl  docs/linear.png
    python benchmarks/tools/plot.py train   docs/data/train.jsonl   docs/train.png
"""

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def load(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def subtitle(rows):
    r = rows[0]
    return f"{r['gpu']}, torch {r['torch']}, triton {r['triton']}"


def grouped_bars(ax, labels, series: dict, line: float):
    """One group of bars per label, one bar per series, and a dashed reference line."""
    w = 0.8 / len(series)
    for i, (name, values) in enumerate(series.items()):
        ax.bar([x + (i - len(series) / 2 + 0.5) * w for x in range(len(labels))], values, w, label=name)
    ax.axhline(line, color="gray", ls="--", lw=1)
    ax.set_xticks(range(len(labels)), labels, fontsize=6)


def plot_kernels(rows, out):
    fig, ax = plt.subplots(figsize=(10, 4.5))
    pct = lambda r, key: 100 * r["bytes"] / r[key] / 1e9 / r["copy_tbps"]  # noqa: E731
    grouped_bars(ax, [f"{r['shape']}\n{r['mode']}" for r in rows], {
        "f8tensor": [r["ours_pct_copy"] for r in rows],
        "torch.compile(reference)": [pct(r, "compile_gpu_ms") for r in rows],
        "eager reference": [pct(r, "eager_ms") for r in rows],
    }, line=85)
    finish(fig, ax, out, "% of copy bandwidth\n(GPU time; eager reference: call time)",
           f"bf16 → float8_e4m3fn quantization ({subtitle(rows)})")


def finish(fig, ax, out, ylabel, title):
    """Label a bar chart, add its legend and write it."""
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def plot_linear(rows, out):
    rows = [r for r in rows if r.get("bench") == "linear"]
    names = [n for n in ("f8tensor", "gemms_only", "torchao_eager", "torchao_compile")
             if any(f"{n}_speedup" in r for r in rows)]
    fig, ax = plt.subplots(figsize=(11, 4.5))
    grouped_bars(ax, [f"M={r['M']}\n{r['K']}→{r['N']}" for r in rows],
                 {name: [r.get(f"{name}_speedup", 0) for r in rows] for name in names}, line=1)
    finish(fig, ax, out, "speedup vs bf16 nn.Linear (fwd+bwd)", f"Linear forward+backward ({subtitle(rows)})")


def plot_train(rows, out):
    rows = [r for r in rows if r.get("status") == "ok"]
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(rows) + 1.2))
    labels = [f"{r['config']}  ac={r['ac']}{'  rope=complex' if r.get('rope') == 'complex' else ''}"
              f"  ({r['commit']}, {r['peak_gb']:.1f} GB)" for r in rows]
    ax.barh(range(len(rows)), [r["vs_bf16"] for r in rows])
    ax.axvline(1, color="gray", ls="--", lw=1)
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("tokens/s vs bf16 eager (same AC mode)")
    ax.set_title(f"8-layer Llama-3-8B-shaped decoder, batch 2 x 4096 ({subtitle(rows)})", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def table_kernels(rows):
    """Markdown table for docs/benchmarks.md."""
    print("| shape (bf16) | mode | MiB in | f8tensor GPU ms | TB/s | % of copy | compile GPU ms | "
          "f8tensor call ms | compile call ms | eager ms | vs eager | vs compile (GPU) | vs compile (call) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['mode']} | {r['mib']:.0f} | {r['ours_gpu_ms']:.3f} | {r['ours_tbps']:.2f} | "
              f"{r['ours_pct_copy']:.0f}% | {r['compile_gpu_ms']:.3f} | {r['ours_ms']:.3f} | {r['compile_ms']:.3f} | "
              f"{r['eager_ms']:.3f} | {r['eager_ms'] / r['ours_ms']:.1f}x | "
              f"{r['compile_gpu_ms'] / r['ours_gpu_ms']:.2f}x | {r['compile_ms'] / r['ours_ms']:.2f}x |")


def table_linear(rows):
    rows = [r for r in rows if r.get("bench") == "linear"]
    names = [n for n in ("f8tensor", "gemms_only", "torchao_eager", "torchao_compile")
             if any(f"{n}_speedup" in r for r in rows)]
    print("| model | M | K→N | bf16 ms | " + " | ".join(names) + " | bf16 peak MiB | f8tensor peak MiB |")
    print("|---|---|---|---|" + "---|" * len(names) + "---|---|")
    for r in rows:
        cells = " | ".join(f"{r[f'{n}_speedup']:.2f}x" if f"{n}_speedup" in r else "" for n in names)
        print(f"| {r['model']} | {r['M']} | {r['K']}→{r['N']} | {r['bf16_ms']:.3f} | {cells} | "
              f"{r['bf16_peak_mib']:.0f} | {r['f8tensor_peak_mib']:.0f} |")


if __name__ == "__main__":
    kind, path = sys.argv[1:3]
    if kind.endswith("-table"):
        {"kernels-table": table_kernels, "linear-table": table_linear}[kind](load(path))
    else:
        {"kernels": plot_kernels, "linear": plot_linear, "train": plot_train}[kind](load(path), sys.argv[3])
