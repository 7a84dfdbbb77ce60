"""Which Hugging Face decoder architectures fuse_model_ops fuses, and why not where it does not.

    python benchmarks/tools/fusion_coverage.py [ARCH ...]     (CPU; transformers' <Arch>ForCausalLM)

Each architecture is built from its own config class at a tiny size (one layer, DeepSeek's two so
that one has experts; width 128, random weights, bf16), converted (every linear but the output
head) and fused as the README's quick start does, then run forward and backward once. One line per architecture: fused / examined for
norms, gates and RoPE, and the first reason given for each kind left unfused (the report has
them all). The proofs are pure Python, so CPU results are what a GPU run fuses; the speed of the
fused models is measured on the GPU (docs/benchmarks.md). An architecture whose attention or
feed-forward the fusions do not examine shows 0 of 0 for that kind.
"""

import sys
import warnings

import torch

from f8tensor import convert_to_float8_training, fuse_model_ops

ARCHITECTURES = ("Llama", "Mistral", "Qwen2", "Qwen3", "Qwen3Moe", "Mixtral", "Olmo2", "Granite", "Exaone4",
                 "Apertus", "Arcee", "Lfm2", "StableLm", "Starcoder2", "Ernie4_5", "Cohere", "Gemma", "Gemma2",
                 "Phi3", "Glm", "Glm4", "DeepseekV2", "DeepseekV3", "GptOss")
KINDS = ("rms_norm", "swiglu", "rope")
# Config fields an architecture needs beyond the common ones at this size: DeepSeek's multi-head
# latent attention (its low-rank q and kv projections, the rotary part of a head) and mixture of
# experts (one dense layer first, then routed experts beside a shared one).
_MLA = dict(q_lora_rank=64, kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32,
            moe_intermediate_size=64, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
            first_k_dense_replace=1, n_group=1, topk_group=1, num_key_value_heads=4, head_dim=16)
EXTRA = {"DeepseekV2": dict(_MLA, num_hidden_layers=2), "DeepseekV3": dict(_MLA, num_hidden_layers=2)}


def build(arch: str):
    import transformers

    config_cls = getattr(transformers, f"{arch}Config")
    model_cls = getattr(transformers, f"{arch}ForCausalLM")
    fields = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=32, vocab_size=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    config = config_cls(**{**fields, **EXTRA.get(arch, {})})
    torch.manual_seed(0)
    return model_cls(config).to(torch.bfloat16)


def coverage(arch: str) -> str:
    model = build(arch)
    convert_to_float8_training(model, module_filter_fn=lambda mod, fqn: "lm_head" not in fqn)
    report = fuse_model_ops(model)
    model(torch.randint(3, 256, (1, 16))).logits.float().square().mean().backward()
    cells, reasons = [], []
    for kind in KINDS:
        examined = [r for r in report.rows if r.kind == kind]
        cells.append(f"{kind} {len(report.fused(kind))}/{len(examined)}")
        unfused = report.not_fused(kind)
        if unfused:
            reasons.append(f"{kind}: {unfused[0].detail}")
    return "  ".join(cells) + ("  | " + " | ".join(reasons) if reasons else "")


def main():
    import transformers

    warnings.simplefilter("ignore")
    print(f"transformers {transformers.__version__}, torch {torch.__version__}", flush=True)
    for arch in sys.argv[1:] or ARCHITECTURES:
        try:
            line = coverage(arch)
        except Exception as e:  # noqa: BLE001  (recorded: an architecture that does not build or run here)
            line = f"did not run: {type(e).__name__}: {str(e)[:200]}"
        print(f"{arch:<11} {line}", flush=True)


if __name__ == "__main__":
    main()
