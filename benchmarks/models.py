"""The benchmark's models written by others, at the shapes of train.py's arguments, random weights:
torchtitan's Llama 3 (its PyPI wheel's model code) and Hugging Face's LlamaForCausalLM and
Qwen2ForCausalLM (transformers). Each builder returns the model, built in bf16 on the current
device, and its list of blocks, which train.py compiles, checkpoints and shards one by one.
"""

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

MODELS = ("ours", "torchtitan", "hf_llama", "hf_qwen2")


def build(name: str, a) -> tuple[nn.Module, nn.ModuleList]:
    """(model, its blocks) for a model of MODELS other than ours; model(tokens) gives the logits
    (Hugging Face's as the .logits of its output)."""
    if name == "torchtitan":
        return _torchtitan(a)
    if name in ("hf_llama", "hf_qwen2"):
        return _hugging_face(name, a)
    raise ValueError(f"unknown model {name!r}; choose one of {MODELS}")


def _hugging_face(name: str, a):
    import transformers  # a benchmark and test dependency (the `test` extra)

    config_cls, model_cls = {"hf_llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
                             "hf_qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}[name]
    config = config_cls(hidden_size=a.dim, intermediate_size=a.ffn, num_hidden_layers=a.layers,
                        num_attention_heads=a.heads, num_key_value_heads=a.kv_heads, vocab_size=a.vocab,
                        max_position_embeddings=a.seq, rope_theta=500000.0, tie_word_embeddings=False,
                        attn_implementation="sdpa", use_cache=False)
    model = model_cls(config).to(torch.bfloat16)
    return model, model.model.layers


def _torchtitan(a):
    # torchtitan 0.2.0's wheel: the model module imports nothing of its trainer; the package's other
    # imports (tyro, torchdata, datasets, tensorboard, tokenizers) must be installed.
    from torchtitan.models.llama3.model.args import TransformerModelArgs
    from torchtitan.models.llama3.model.model import Transformer

    # torchtitan sizes the FFN as multiple_of * ceil(int(multiplier * int(8 * dim / 3)) / multiple_of):
    # these two give exactly a.ffn.
    base = int(8 * a.dim / 3)
    args = TransformerModelArgs(dim=a.dim, n_layers=a.layers, n_heads=a.heads, n_kv_heads=a.kv_heads,
                                vocab_size=a.vocab, multiple_of=a.ffn, ffn_dim_multiplier=a.ffn / base,
                                max_seq_len=a.seq, rope_theta=500000.0)
    model = Transformer(args)
    model.init_weights()
    for p in model.parameters():  # the parameters only: freqs_cis stays complex64
        p.data = p.data.to(torch.bfloat16)
    ffn = model.layers["0"].feed_forward.w1.out_features
    if ffn != a.ffn:
        raise ValueError(f"torchtitan sized the FFN {ffn}, not --ffn {a.ffn}")
    return model, model.layers


class Checkpointed(nn.Module):
    """A block recomputed in backward (activation checkpointing, non-reentrant), arguments as given."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, *args, **kwargs):
        return checkpoint(self.block, *args, use_reentrant=False, **kwargs)


def checkpoint_blocks(blocks: nn.Module, ac: str) -> None:
    """Wrap every block ("full") or every second one ("every2") of a ModuleList or ModuleDict."""
    if ac == "none":
        return
    for i, (name, block) in enumerate(list(blocks.named_children())):
        if ac == "full" or i % 2 == 0:
            setattr(blocks, name, Checkpointed(block))
