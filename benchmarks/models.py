"""The benchmark's other models, at the shapes of train.py's arguments, random weights: torchtitan's
Llama 3 (its PyPI wheel's model code); from transformers, Hugging Face's LlamaForCausalLM and
Qwen2ForCausalLM, OLMo 2's Olmo2ForCausalLM (post-norms, q and k normalized, fp32 RoPE tables) and
Gemma 3's Gemma3ForCausalLM (its text model: 1 + weight norms around each sublayer, q and k
normalized, a GELU-tanh gate, sliding-window layers) and Phi-3's Phi3ForCausalLM (one qkv and one
gate_up projection, the gate over the latter's two halves, a partial-rotary RoPE); and a model
written here in another style than train.py's (`handwritten`: Meta's Llama 3 style, the complex
RoPE and the SwiGLU inline in the block's forward). Each builder returns the model, built in bf16 on the current device, and its
list of blocks, which train.py compiles, checkpoints and shards one by one.
"""

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

MODELS = ("ours", "torchtitan", "hf_llama", "hf_qwen2", "hf_olmo2", "hf_gemma3", "hf_phi3", "handwritten")


def build(name: str, a) -> tuple[nn.Module, nn.ModuleList]:
    """(model, its blocks) for a model of MODELS other than ours; model(tokens) gives the logits
    (Hugging Face's as the .logits of its output)."""
    if name == "torchtitan":
        return _torchtitan(a)
    if name.startswith("hf_"):
        return _hugging_face(name, a)
    if name == "handwritten":
        torch.manual_seed(a.seed)
        model = HandWritten(a)
        for p in model.parameters():  # the parameters only: the frequencies stay complex64
            p.data = p.data.to(torch.bfloat16)
        return model, model.blocks
    raise ValueError(f"unknown model {name!r}; choose one of {MODELS}")


def _hugging_face(name: str, a):
    import transformers  # a benchmark and test dependency (the `test` extra)

    config_cls, model_cls = {"hf_llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
                             "hf_qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
                             "hf_olmo2": (transformers.Olmo2Config, transformers.Olmo2ForCausalLM),
                             "hf_gemma3": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM),
                             "hf_phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM)}[name]
    # Gemma's config defaults head_dim to 256 whatever the width: the others derive dim / heads. Phi-3's
    # defaults its padding token to 32000, past a small test vocabulary.
    extra = {"hf_gemma3": dict(head_dim=a.dim // a.heads), "hf_phi3": dict(pad_token_id=0)}.get(name, {})
    config = config_cls(hidden_size=a.dim, intermediate_size=a.ffn, num_hidden_layers=a.layers,
                        num_attention_heads=a.heads, num_key_value_heads=a.kv_heads, vocab_size=a.vocab,
                        max_position_embeddings=a.seq, rope_theta=500000.0, tie_word_embeddings=False,
                        attn_implementation="sdpa", use_cache=False, **extra)
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


# --- handwritten: another style of the same model than train.py's ----------------------------------

def frequencies(seq: int, head_dim: int, theta: float = 500000.0) -> torch.Tensor:
    """e^(i * position * theta^(-2j / head_dim)), complex64 [seq, head_dim / 2]."""
    inv = theta ** -(torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.arange(seq, dtype=torch.float32)[:, None] * inv[None, :]
    return torch.polar(torch.ones_like(angles), angles)


def _as_broadcast(freqs: torch.Tensor, xc: torch.Tensor) -> torch.Tensor:
    seq, pairs = xc.shape[1], xc.shape[-1]
    assert freqs.dim() == 2 and freqs.shape[0] >= seq and freqs.shape[1] == pairs, (freqs.shape, xc.shape)
    return freqs[:seq].view([seq if d == 1 else pairs if d == xc.dim() - 1 else 1 for d in range(xc.dim())])


def rotary(q: torch.Tensor, k: torch.Tensor, freqs: torch.Tensor):
    """Rotate adjacent pairs of q and k [B, S, heads, head_dim] as complex numbers, in fp32."""
    qc = torch.view_as_complex(q.float().reshape(*q.shape[:-1], -1, 2))
    kc = torch.view_as_complex(k.float().reshape(*k.shape[:-1], -1, 2))
    f = _as_broadcast(freqs, qc)
    return torch.view_as_real(qc * f).flatten(3).type_as(q), torch.view_as_real(kc * f).flatten(3).type_as(k)


class HandAttention(nn.Module):
    def __init__(self, a):
        super().__init__()
        self.n_heads, self.n_kv, self.hd = a.heads, a.kv_heads, a.dim // a.heads
        self.q = nn.Linear(a.dim, a.heads * self.hd, bias=False)
        self.k = nn.Linear(a.dim, a.kv_heads * self.hd, bias=False)
        self.v = nn.Linear(a.dim, a.kv_heads * self.hd, bias=False)
        self.o = nn.Linear(a.heads * self.hd, a.dim, bias=False)

    def forward(self, x, freqs):
        bsz, seq, _ = x.shape
        q, k = rotary(self.q(x).view(bsz, seq, self.n_heads, self.hd),
                      self.k(x).view(bsz, seq, self.n_kv, self.hd), freqs)
        v = self.v(x).view(bsz, seq, self.n_kv, self.hd)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=True, enable_gqa=True)
        return self.o(out.transpose(1, 2).reshape(bsz, seq, -1))


class HandBlock(nn.Module):
    """Attention and a SwiGLU feed-forward whose gate is written in the block's own forward."""

    def __init__(self, a):
        super().__init__()
        self.attn_norm, self.mlp_norm = nn.RMSNorm(a.dim, eps=1e-5), nn.RMSNorm(a.dim, eps=1e-5)
        self.attn = HandAttention(a)
        self.w1 = nn.Linear(a.dim, a.ffn, bias=False)
        self.w2 = nn.Linear(a.ffn, a.dim, bias=False)
        self.w3 = nn.Linear(a.dim, a.ffn, bias=False)

    def forward(self, x, freqs):
        x = x + self.attn(self.attn_norm(x), freqs)
        h = self.mlp_norm(x)
        return x + self.w2(F.silu(self.w1(h)) * self.w3(h))


class HandWritten(nn.Module):
    def __init__(self, a):
        super().__init__()
        self.embed = nn.Embedding(a.vocab, a.dim)
        self.blocks = nn.ModuleList(HandBlock(a) for _ in range(a.layers))
        self.norm = nn.RMSNorm(a.dim, eps=1e-5)
        self.output = nn.Linear(a.dim, a.vocab, bias=False)
        self.register_buffer("freqs", frequencies(a.seq, a.dim // a.heads), persistent=False)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)

    def forward(self, tokens):
        h = self.embed(tokens)
        for block in self.blocks:
            h = block(h, self.freqs)
        return self.output(self.norm(h))


def recompute_everything():
    """Selective checkpointing's contexts with a policy that recomputes every op: under torch.compile
    on torch < 2.12 a plain checkpoint leaves the ops inside autograd.Functions (Float8Linear's) out
    of the recomputation (pytorch/pytorch#177396; docs/design.md); this policy does not."""
    return create_selective_checkpoint_contexts(lambda ctx, op, *args, **kwargs: CheckpointPolicy.PREFER_RECOMPUTE)


class Checkpointed(nn.Module):
    """A block recomputed in backward (activation checkpointing, non-reentrant, PyTorch's default early
    stop, as Hugging Face's gradient checkpointing; torchtitan's trainer turns early stop off unless
    --activation_checkpoint.early_stop), arguments as given; `context_fn` as checkpoint takes it."""

    def __init__(self, block: nn.Module, context_fn=None):
        super().__init__()
        self.block = block
        self.context = {} if context_fn is None else {"context_fn": context_fn}

    def forward(self, *args, **kwargs):
        return checkpoint(self.block, *args, use_reentrant=False, **self.context, **kwargs)


def checkpoint_blocks(blocks: nn.Module, ac: str, context_fn=None) -> None:
    """Wrap every block ("full") or every second one ("every2") of a ModuleList or ModuleDict."""
    if ac == "none":
        return
    for i, (name, block) in enumerate(list(blocks.named_children())):
        if ac == "full" or i % 2 == 0:
            setattr(blocks, name, Checkpointed(block, context_fn))
