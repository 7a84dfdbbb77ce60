"""End-to-end training throughput: a Llama-3-8B-shaped decoder in bf16 vs float8 (f8tensor, torchao),
eager and with each block compiled, under three activation-checkpointing modes.

    python benchmarks/train.py          # the headline figures: defaults below, on one H200
    python benchmarks/train.py --ac-modes none every2 full --ablations f8tensor_unfused bf16_compiled

Configurations (--configs, default: all four that can run here):
    bf16               the model as written, bf16, eager
    f8tensor           convert_to_float8_training + fuse_model_ops, eager: the README's quick start
    f8tensor_compiled  the same, each block compiled (torch.compile, as torchtitan does)
    torchao_compiled   torchao's convert_to_float8_training, each block compiled
Ablations (--ablations NAME ..., each answers one question; see ABLATIONS below).

Each configuration builds a fresh model from the same seed (bf16 parameters, AdamW, cross-entropy on
random tokens) and runs --warmup steps (compilation included). All configurations of one AC mode
stay resident and are timed in --rounds interleaved rounds of --steps steps, each round after one
untimed step (a guard against allocator re-allocation after the other models' steps); the median round
counts. Reported: tokens/s, its ratio to bf16 eager under the same AC mode, the peak CUDA memory
of one step (this configuration's own: the other resident models are subtracted), the last loss. The
output projection stays bf16 in every float8 configuration. A configuration that fails (compile
error, OOM) is reported in the status column and the run goes on. On CPU (smoke test only) compiled
configurations run only when named. --grad-accum N makes each step N micro-batches of --batch x
--seq tokens (tokens/s counts all of them). --power (CUDA) samples the SM clock and power during
the timed rounds (tools/power.py): at the GPU's power limit the clock, and so the step time,
follows the energy each configuration draws. --cuda-graph captures each configuration's whole
training step as a CUDA graph after 3 eager steps (f8tensor.cuda_graph.CapturedStep, capturable
AdamW) and replays it: no Python per layer, so small models measure the GPU, not the host.

--fsdp (under torchrun, one process per GPU, NCCL) shards every block and then the whole model
with FSDP2's fully_shard, after conversion and after compiling the blocks (torchtitan's order);
each rank trains on its own tokens, tokens/s counts every rank's, peak memory is rank 0's, and
rank 0 prints and writes the rows. A configuration that fails stops the run (the other ranks would
wait in a collective):

    torchrun --nproc-per-node 2 benchmarks/train.py --fsdp --configs bf16 f8tensor f8tensor_compiled
    torchrun --nproc-per-node 2 benchmarks/train.py --fsdp --configs bf16 f8tensor --ablations f8tensor_fsdp8

--tp N (under torchrun; our model only) makes every block tensor-parallel over N ranks as torchtitan
lays out its Llama: sequence-parallel norms, column-parallel q/k/v and w1/w3, row-parallel wo and
w2, the embedding's output and the output layer's input sharded by sequence. The attention's and the
feed-forward's inputs are gathered with PyTorch's PrepareModuleInput (bf16) in every configuration
but f8tensor_sp8* (f8tensor's Float8PrepareModuleInput: float8) and torchao's (torchao's float8
styles, as torchtitan's float8 tensor parallelism uses them). The ranks of one tp group train on the
same tokens; with --fsdp the mesh is (dp = ranks / N, tp = N) and FSDP2 shards over dp. tokens/s
counts each tp group's tokens once:

    torchrun --nproc-per-node 2 benchmarks/train.py --tp 2 --configs bf16 f8tensor torchao_compiled --ablations f8tensor_sp8

--recipe NAME (default tensorwise) gives every float8 configuration that library's recipe of that
name: f8tensor's Float8Config.from_recipe_name(NAME) (its other options, keep_fp8_weight and the
float8 all-gather, applied on top) and torchao's Float8LinearConfig.from_recipe_name(NAME); for
"blockwise", which torchao 0.17 has no such recipe of, torchao's prototype layer
(torchao.prototype.blockwise_fp8_training: Float8BlockwiseLinear, eager kernels and torch._scaled_mm):

    python benchmarks/train.py --recipe rowwise --configs bf16 f8tensor f8tensor_compiled torchao_compiled
"""

import argparse
import contextlib
import dataclasses
import functools
import gc
import os
import statistics
import time
import traceback

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

import models
from tools.common import environment, write_rows
from tools.power import PowerLog, summarize
from f8tensor import (Float8Config, Float8Linear, convert_to_float8_training, fuse_model_ops, fusion_report,
                      precompute_float8_scales, swiglu)
from f8tensor import rope as fused_rope
from f8tensor import cross_entropy as f8_cross_entropy
from f8tensor.core.convert import default_skip_reason
from f8tensor.cuda_graph import CapturedStep

CONFIGS = ["bf16", "f8tensor", "f8tensor_compiled", "torchao_compiled"]
# Each a variant of one configuration that answers one question; run only when named in --ablations.
ABLATIONS = {
    "bf16_compiled": "bf16 with each block compiled: is float8 faster than compiling bf16?",
    "torchao": "torchao's float8 layers in eager mode: torchao without compile",
    "f8tensor_unfused": "convert_to_float8_training alone (no fuse_model_ops): what the fusions give",
    "f8tensor_no_norm_fusion": "fuse_model_ops(rms_norm=False): what the norm swap gives",
    "f8tensor_no_gate_fusion": "fuse_model_ops(swiglu=False): what the gate fusion gives",
    "f8tensor_no_rope_fusion": "fuse_model_ops(rope=False): what the RoPE fusion gives",
    "f8tensor_ops_in_code": "f8tensor.swiglu and f8tensor.rope written into the model code instead of fused",
    "bf16_ops_in_code": "bf16 with f8tensor.swiglu and f8tensor.rope in the model code: the fused ops without float8",
    "bf16_norm_fusion": "bf16 with fuse_model_ops(swiglu=False, rope=False): the fused norms without float8",
    "f8tensor_keep_weight": "Float8Config(keep_fp8_weight=True): weights cast once per optimizer step",
    "f8tensor_keep_weight_compiled": "keep_fp8_weight=True with the blocks compiled",
    "torchao_fsdp8_compiled": "torchao with float8 all-gather and precomputed scales (--fsdp only)",
    "f8tensor_fsdp8": "Float8Config(fsdp_float8_all_gather=True) with precomputed scales (--fsdp only)",
    "f8tensor_fsdp8_compiled": "the same with the blocks compiled (--fsdp only)",
    "f8tensor_sp8": "the sequence-parallel all-gathers in float8 (Float8PrepareModuleInput; --tp only)",
    "f8tensor_sp8_compiled": "the same with the blocks compiled (--tp only)",
    "f8tensor_fused_loss": "f8tensor with the loss as f8tensor.cross_entropy: the loss fused in eager mode",
    "bf16_fused_loss": "bf16 with the loss as f8tensor.cross_entropy: the fused loss without float8",
    "f8tensor_keep_weight_fused_loss": "keep_fp8_weight=True and the fused loss: no weight cast in AC's recompute",
}
ORDER = CONFIGS[:1] + list(ABLATIONS)[:1] + CONFIGS[1:] + list(ABLATIONS)[1:]  # bf16 first: the ratios' base


def rope_tables(seq, head_dim, theta=500000.0):
    """cos/sin of Llama 3's rotary embedding, [seq, head_dim] (each frequency used twice)."""
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq, dtype=torch.float32), freqs)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """rotate_half form (Hugging Face's Llama), on [B, heads, S, head_dim] views."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def rope_freqs_cis(seq, head_dim, theta=500000.0):
    """Meta's Llama 3 / torchtitan form of the same frequencies: complex64 [seq, head_dim / 2]."""
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq, dtype=torch.float32), freqs)
    return torch.polar(torch.ones_like(angles), angles)


def apply_rope_complex(x, freqs_cis):
    """Meta's Llama 3 / torchtitan apply_rotary_emb, on contiguous [B, S, heads, head_dim]: adjacent
    pairs as complex numbers, rotated in fp32."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * freqs_cis[:, None, :]).flatten(3).type_as(x)


class Attention(nn.Module):
    def __init__(self, dim, heads, kv_heads):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.wq = nn.Linear(dim, heads * self.head_dim, bias=False)
        self.wk = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(heads * self.head_dim, dim, bias=False)
        self.fused_rope = False  # the *_ops_in_code ablations

    def forward(self, x, *rope):
        B, S, _ = x.shape
        q = self.wq(x).view(B, S, self.heads, self.head_dim)
        k = self.wk(x).view(B, S, self.kv_heads, self.head_dim)
        v = self.wv(x).view(B, S, self.kv_heads, self.head_dim).transpose(1, 2)
        if len(rope) == 3:  # complex form: rotated before the transpose, as torchtitan does
            freqs_cis, cos, sin = rope  # cos, sin: freqs_cis's parts, for f8tensor.rope
            if self.fused_rope:
                q, k = fused_rope(q, cos, sin, interleaved=True), fused_rope(k, cos, sin, interleaved=True)
            else:
                q, k = apply_rope_complex(q, freqs_cis), apply_rope_complex(k, freqs_cis)
            q, k = q.transpose(1, 2), k.transpose(1, 2)
        else:
            rotate = fused_rope if self.fused_rope else apply_rope
            q, k = rotate(q.transpose(1, 2), *rope), rotate(k.transpose(1, 2), *rope)
        # enable_gqa: SDPA shares each k/v head across heads/kv_heads query heads without a copy.
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.wo(o.transpose(1, 2).reshape(B, S, -1))


class FeedForward(nn.Module):
    def __init__(self, dim, ffn):
        super().__init__()
        self.w1 = nn.Linear(dim, ffn, bias=False)
        self.w3 = nn.Linear(dim, ffn, bias=False)
        self.w2 = nn.Linear(ffn, dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class FusedGateFeedForward(FeedForward):
    """The *_ops_in_code ablations: the gate written as f8tensor.swiglu in model code."""

    def forward(self, x):
        return self.w2(swiglu(self.w1(x), self.w3(x)))


class Block(nn.Module):
    def __init__(self, a):
        super().__init__()
        self.attention_norm, self.ffn_norm = nn.RMSNorm(a.dim, eps=1e-5), nn.RMSNorm(a.dim, eps=1e-5)
        self.attention = Attention(a.dim, a.heads, a.kv_heads)
        self.feed_forward = FeedForward(a.dim, a.ffn)

    def forward(self, x, *rope):
        x = x + self.attention(self.attention_norm(x), *rope)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, a):
        super().__init__()
        self.tok_embeddings = nn.Embedding(a.vocab, a.dim)
        self.layers = nn.ModuleList(Block(a) for _ in range(a.layers))
        self.norm = nn.RMSNorm(a.dim, eps=1e-5)
        self.output = nn.Linear(a.dim, a.vocab, bias=False)  # stays bf16: the filter skips "output"
        if a.rope == "complex":
            freqs_cis = rope_freqs_cis(a.seq, a.dim // a.heads)
            self.register_buffer("freqs_cis", freqs_cis, persistent=False)
            # the same angles as fp32 [S, 1, head_dim] tables, each twice in a row (adjacent pairs)
            for name, part in (("cos_interleaved", freqs_cis.real), ("sin_interleaved", freqs_cis.imag)):
                self.register_buffer(name, part.repeat_interleave(2, dim=-1)[:, None, :], persistent=False)
        else:
            cos, sin = rope_tables(a.seq, a.dim // a.heads)  # fp32 tables, computed once
            self.register_buffer("cos", cos.to(torch.bfloat16), persistent=False)
            self.register_buffer("sin", sin.to(torch.bfloat16), persistent=False)
        self.rope_kind = a.rope
        self.ac = "none"

    def rope(self):
        if self.rope_kind == "complex":
            return self.freqs_cis, self.cos_interleaved, self.sin_interleaved
        return self.cos, self.sin

    def forward(self, tokens):
        h = self.tok_embeddings(tokens)
        rope = self.rope()
        for i, layer in enumerate(self.layers):
            if self.ac == "full" or (self.ac == "every2" and i % 2 == 0):
                h = checkpoint(layer, h, *rope, use_reentrant=False)
            else:
                h = layer(h, *rope)
        return self.output(self.norm(h))


def not_output(mod, fqn):
    """Every layer but the output projection (ours and torchtitan's "output", Hugging Face's "lm_head")."""
    return fqn.rsplit(".", 1)[-1] not in ("output", "lm_head")


def torchao_blockwise(model, keep_fn):
    """Every nn.Linear for which keep_fn(module, fqn) holds becomes torchao's prototype
    Float8BlockwiseLinear (the same Parameter objects)."""
    from torchao.prototype.blockwise_fp8_training.linear import Float8BlockwiseLinear

    for fqn, mod in list(model.named_modules()):
        for name, child in list(mod.named_children()):
            child_fqn = f"{fqn}.{name}" if fqn else name
            if type(child) is nn.Linear and keep_fn(child, child_fqn):
                setattr(mod, name, Float8BlockwiseLinear.from_float(child))


def build(a, config, ac, device):
    """A fresh model from the seed, converted and compiled as `config` says, and its optimizer."""
    torch.manual_seed(a.seed)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # build bf16 directly: no fp32 copy of 8B-scale weights
    if a.model != "ours":  # built in fp32 where the library needs it (torchtitan's tables), then cast
        torch.set_default_dtype(default_dtype)
    try:
        with torch.device(device):
            if a.model == "ours":
                model = Transformer(a)
                blocks = model.layers
            else:
                model, blocks = models.build(a.model, a)
    finally:
        torch.set_default_dtype(default_dtype)
    if a.model == "ours":
        model.ac = ac
        for block in model.layers:
            if config.endswith("_ops_in_code"):
                block.feed_forward.__class__ = FusedGateFeedForward
            block.attention.fused_rope = config.endswith("_ops_in_code")
    elif config.endswith("_ops_in_code"):
        raise ValueError(f"{config} changes our model's code: run it with --model ours")
    if config.startswith("f8tensor"):
        if "_fsdp8" in config and not a.fsdp:
            raise ValueError(f"{config} is FSDP2's float8 all-gather: run it with --fsdp")
        f8_config = Float8Config.from_recipe_name(a.recipe).replace(
            keep_fp8_weight="_keep_weight" in config, fsdp_float8_all_gather="_fsdp8" in config, emulate=a.emulate)
        if a.f8_filter == "default":  # f8tensor's own default filter (keeps 1024-wide k/v in bf16)
            convert_to_float8_training(
                model, config=f8_config,
                module_filter_fn=lambda mod, fqn: not_output(mod, fqn) and default_skip_reason(mod, f8_config) is None)
        else:  # every linear but the output, as torchao is converted here
            convert_to_float8_training(model, config=f8_config, module_filter_fn=not_output)
        if config != "f8tensor_unfused":
            fuse_model_ops(model, rms_norm=config != "f8tensor_no_norm_fusion",
                           swiglu=config != "f8tensor_no_gate_fusion", rope=config != "f8tensor_no_rope_fusion")
    elif config == "bf16_norm_fusion":
        fuse_model_ops(model, swiglu=False, rope=False)
    elif config.startswith("torchao"):
        from torchao.float8 import Float8LinearConfig  # ImportError: reported
        from torchao.float8 import convert_to_float8_training as ao_convert

        if "_fsdp8" in config and not a.fsdp:
            raise ValueError(f"{config} is torchao's FSDP2 float8 all-gather: run it with --fsdp")
        if a.recipe == "blockwise":
            torchao_blockwise(model, not_output)
            ao_config = None
        else:
            ao_config = Float8LinearConfig.from_recipe_name(a.recipe)
        if "_fsdp8" in config and ao_config is not None:
            ao_config = dataclasses.replace(ao_config, enable_fsdp_float8_all_gather=True)
        if ao_config is not None:
            ao_convert(model, module_filter_fn=not_output, config=ao_config)
    if "_sp8" in config and a.tp == 1:
        raise ValueError(f"{config} is the float8 sequence-parallel all-gather: run it with --tp N")
    mesh = device_mesh(device.type, a.tp)  # None without --tp
    if mesh is not None:  # before compiling, as torchtitan orders them: the styles' hooks are compiled too
        tensor_parallel(model, mesh["tp"], config)
    if a.model != "ours":  # ours checkpoints in its own forward (Transformer.ac)
        # before compiling, as torchtitan orders them
        context_fn = (models.recompute_everything if config.endswith("_compiled")
                      and a.ac_compiled_policy == "recompute_everything" else None)
        models.checkpoint_blocks(blocks, ac, context_fn)
    if config.endswith("_compiled"):
        for block in blocks.children():
            block.compile()  # per block, as torchtitan does: one graph reused by every layer
    if a.fsdp:
        from torch.distributed.fsdp import fully_shard

        dp = {} if mesh is None else dict(mesh=mesh["dp"])
        for block in blocks.children():
            fully_shard(block, **dp)
        fully_shard(model, **dp)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda", capturable=a.cuda_graph)
    if "_fsdp8" in config and config.startswith("torchao"):  # the next step's weight scales
        from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

        opt.register_step_post_hook(lambda *_: precompute_float8_dynamic_scale_for_fsdp(model))
    elif "_fsdp8" in config:  # f8tensor: the next step's weight scales, one all-reduce for the model
        opt.register_step_post_hook(lambda *_: precompute_float8_scales(model))
    return model, opt


@functools.cache
def device_mesh(device_type: str, tp: int):
    """The (dp, tp) mesh of --tp (dp: the ranks / tp), or None without it."""
    if tp == 1:
        return None
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device_type, (world() // tp, tp), mesh_dim_names=("dp", "tp"))


def tensor_parallel(model, mesh, config):
    """Our model tensor-parallel over `mesh` as torchtitan's Llama plan lays it out (see --tp above)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, RowwiseParallel,
                                                   SequenceParallel, parallelize_module)

    colwise, rowwise, prepare = ColwiseParallel, RowwiseParallel, PrepareModuleInput
    if config.startswith("torchao"):  # torchao's float8 styles (float8 all-gather of the inputs)
        from torchao.float8.float8_tensor_parallel import (Float8ColwiseParallel, Float8RowwiseParallel,
                                                           PrepareFloat8ModuleInput)

        colwise, rowwise, prepare = Float8ColwiseParallel, Float8RowwiseParallel, PrepareFloat8ModuleInput
    elif "_sp8" in config:
        from f8tensor.distributed.sequence_parallel import Float8PrepareModuleInput

        # its cast must be the layers' (a --recipe with power-of-2 scales: it raises otherwise)
        f8_config = next(m.config for m in model.modules() if isinstance(m, Float8Linear))
        prepare = functools.partial(Float8PrepareModuleInput, config=f8_config)
    tp = mesh.size()
    parallelize_module(model, mesh, {
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
        "norm": SequenceParallel(),
        "output": ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate()),  # bf16: PyTorch's style
    })
    rope = (None,) * len(model.rope())  # the RoPE tables: replicated, passed as they are
    for block in model.layers:
        attention = block.attention
        if attention.heads % tp or attention.kv_heads % tp:
            raise ValueError(f"--tp {tp}: heads {attention.heads} and kv heads {attention.kv_heads} must divide by it")
        attention.heads, attention.kv_heads = attention.heads // tp, attention.kv_heads // tp  # each rank's
        parallelize_module(block, mesh, {
            "attention_norm": SequenceParallel(),
            "attention": prepare(input_layouts=(Shard(1), *rope), desired_input_layouts=(Replicate(), *rope)),
            "attention.wq": colwise(), "attention.wk": colwise(), "attention.wv": colwise(),
            "attention.wo": rowwise(output_layouts=Shard(1)),
            "ffn_norm": SequenceParallel(),
            "feed_forward": prepare(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            "feed_forward.w1": colwise(), "feed_forward.w3": colwise(),
            "feed_forward.w2": rowwise(output_layouts=Shard(1)),
        })


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def alloc_retries(device) -> int:
    """Allocations the caching allocator could satisfy only after freeing its cached blocks."""
    return torch.cuda.memory_stats().get("num_alloc_retries", 0) if device.type == "cuda" else 0


def allocated(device) -> int:
    return torch.cuda.memory_allocated() if device.type == "cuda" else 0


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """torchtitan's cross_entropy_loss: the logits in fp32."""
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())


def fused_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The same loss through f8tensor.cross_entropy (the *_fused_loss configurations)."""
    return f8_cross_entropy(logits.flatten(0, 1), labels.flatten())


class Run:
    """One configuration, built, warmed up and kept resident while the others are timed."""

    def __init__(self, a, config, ac, device):
        self.config, self.device, self.times, self.spans = config, device, [], []
        self.grad_accum = a.grad_accum
        self.ac_early_stop = a.ac_early_stop == "on"
        self.alloc_retries = self.settle_retries = 0
        # compiled configurations compile the loss too, as torchtitan does by default (its
        # compile.components: model and loss)
        self.loss_fn = (torch.compile(cross_entropy) if config.endswith("_compiled")
                        else fused_cross_entropy if config.endswith("_fused_loss") else cross_entropy)
        # Collect first: a cycle of an earlier configuration freed during this one's warmup would
        # be counted against this configuration's resident memory.
        gc.collect()
        before = allocated(device)
        self.model, self.opt = build(a, config, ac, device)
        # each rank its own tokens; under --tp, each tp group (its ranks must see the same)
        g = torch.Generator(device=device).manual_seed(a.seed + rank() // a.tp)
        tokens = torch.randint(0, a.vocab, (a.batch, a.seq + 1), device=device, generator=g)
        self.inputs, self.labels = tokens[:, :-1], tokens[:, 1:]
        self.graphed = CapturedStep(self.eager_step) if a.cuda_graph else None
        t0 = time.perf_counter()
        for _ in range(a.warmup):
            self.step()
        sync(device)
        self.warmup_s = time.perf_counter() - t0
        gc.collect()
        self.resident = allocated(device) - before  # parameters and optimizer state
        self.peaks = self.measure_peaks() if device.type == "cuda" else {}

    def loss(self):
        with set_checkpoint_early_stop(self.ac_early_stop):  # read when a checkpointed block runs forward
            logits = self.model(self.inputs)
        logits = getattr(logits, "logits", logits)  # Hugging Face's models return an output object
        return self.loss_fn(logits, self.labels)

    def step(self, after_first_loss=None):
        """One optimizer step; with --cuda-graph a replay of the captured step (after_first_loss is
        then not called: a graph has no Python in it)."""
        if self.graphed is not None:
            return self.graphed()
        return self.eager_step(after_first_loss)

    def eager_step(self, after_first_loss=None):
        """One optimizer step over --grad-accum micro-batches (the same tokens each: throughput
        only). after_first_loss: called between the first micro-batch's loss and its backward."""
        for i in range(self.grad_accum):
            loss = self.loss()
            if i == 0 and after_first_loss is not None:
                after_first_loss()
            (loss / self.grad_accum).backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.detach()

    def measure_peaks(self):
        """Peak memory of one step (through forward and loss, and through the whole step), counting
        this configuration's memory only: the other resident models are subtracted."""
        gc.collect()
        torch.cuda.synchronize()
        others = allocated(self.device) - self.resident
        torch.cuda.reset_peak_memory_stats()
        fwd = []
        self.step(after_first_loss=lambda: fwd.append(torch.cuda.max_memory_allocated()))
        torch.cuda.synchronize()
        step = torch.cuda.max_memory_allocated()
        fwd = (fwd[0] - others) / 1e9 if fwd else None  # not with --cuda-graph
        return {"peak_gb": (step - others) / 1e9, "peak_fwd_gb": fwd}

    def time_steps(self, steps):
        # One untimed step first: after the other resident models' steps, the allocator's pool
        # may lack this model's block sizes, and freeing cached blocks to make room synchronizes
        # the device; in training one model runs and its blocks stay cached. Retries inside timed
        # steps are counted and reported (none, in this step or the timed ones, at f40c5a9).
        before = alloc_retries(self.device)
        self.step()
        sync(self.device)
        settled = alloc_retries(self.device)
        self.settle_retries += settled - before
        wall0, t0 = time.time(), time.perf_counter()
        for _ in range(steps):
            self.last_loss = self.step()
        sync(self.device)  # kernels are asynchronous: wait for the last step before reading the clock
        self.times.append((time.perf_counter() - t0) / steps)
        self.spans.append((wall0, time.time()))  # for --power: which samples fall in this round
        self.alloc_retries += alloc_retries(self.device) - settled

    def result(self, a):
        step_s = statistics.median(self.times)
        # float8 layers of either library (torchao's Float8Linear is another class of the same name)
        fp8 = sum(isinstance(m, nn.Linear) and type(m).__name__ == "Float8Linear" or isinstance(m, Float8Linear)
                  for m in self.model.modules())
        report = fusion_report(self.model)
        fused_norms, fused_gates, fused_ropes = (len(report.fused(kind)) for kind in ("rms_norm", "swiglu", "rope"))
        return dict(tokens_per_s=a.batch * a.seq * a.grad_accum * world() // a.tp / step_s, step_ms=step_s * 1e3,
                    round_step_ms=[t * 1e3 for t in self.times], warmup_s=self.warmup_s,
                    loss=self.last_loss.item(), fp8_linears=fp8, fused_norms=fused_norms, fused_gates=fused_gates,
                    fused_ropes=fused_ropes,
                    alloc_retries=self.alloc_retries,
                    settle_alloc_retries=self.settle_retries,
                    **self.peaks)


def rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def world() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def failure(e) -> str:
    if world() > 1:  # the other ranks would wait for this one in their next collective
        raise e
    traceback.print_exc()  # the whole story on stderr; the table gets one line
    lines = str(e).strip().splitlines() or [""]
    return f"{type(e).__name__}: {lines[0]}"[:160]


def run_mode(a, configs, ac, device, env, shape):
    """Every configuration of one AC mode: built one after another and kept resident, then timed
    in interleaved rounds (--rounds of --steps steps each; the median round counts), so a drift
    of the GPU's speed during the run (clocks, temperature) falls on every configuration alike;
    every second round runs them in reverse order, so no configuration always follows the same one."""
    runs, status = {}, {}
    for config in configs:
        try:
            runs[config] = Run(a, config, ac, device)
        except Exception as e:  # noqa: BLE001  (compile errors, OOM, missing torchao: report, go on)
            status[config] = failure(e)
        if config in status:  # outside except: the traceback no longer pins the failed model
            free(device, keep_compiled=True)
    with PowerLog(torch.cuda.current_device()) if a.power and rank() == 0 else contextlib.nullcontext() as log:
        for i in range(a.rounds):
            for config, run in (list(runs.items()) if i % 2 == 0 else list(runs.items())[::-1]):
                try:
                    run.time_steps(a.steps)
                except Exception as e:  # noqa: BLE001
                    status[config] = failure(e)
                    del runs[config]
                if config in status:
                    free(device, keep_compiled=True)
    results = {config: run.result(a) for config, run in runs.items()}
    if log is not None:
        samples = log.samples()
        if not samples:
            print(f"--power: nvidia-smi gave no samples ({log.error or 'no message'})", flush=True)
        for config, run in runs.items():
            results[config].update(summarize(samples, run.spans, results[config]["step_ms"] / 1e3),
                                   power_field=log.power_field)
    base = results["bf16"]["tokens_per_s"] if "bf16" in results else None
    rows = []
    for config in configs:
        row = dict(env, bench="train", config=config, ac=ac, device=device.type, **shape)
        if config in results:
            row.update(results[config], status="ok")
            row["vs_bf16"] = row["tokens_per_s"] / base if base else None
        else:
            row.update(status=status[config], vs_bf16=None)
        rows.append(row)
        done = f"ok: {row['tokens_per_s']:.0f} tok/s" if row["status"] == "ok" else row["status"]
        if rank() == 0:
            print(f"{ac:<7} {config:<28} {done}", flush=True)
    if a.profile and device.type == "cuda":
        for config, run in runs.items():
            profile_step(run.step, f"{os.path.splitext(a.out)[0]}_profile.txt", f"{config} ac={ac}",
                         results[config]["step_ms"], a.power)
    if rank() == 0:
        write_rows(a.out, rows)
    runs.clear()
    free(device)
    return rows


def profile_step(step, path, label, step_ms, power=False, lead=3):
    """Every kernel of two consecutive steps with its GPU time, appended to `path` under `label`
    (the top 25 printed), with the GPU's idle gaps and the host synchronizations of a step. One
    file for all configurations: fewer files to carry off a remote machine.

    `lead` unprofiled steps are queued first, without a synchronization, so the profiled steps run
    on a GPU already drawing training's power, at the clock of the timed rounds (at the power
    limit a GPU that just idled starts faster). With `power`, the SM clock during them is given."""
    torch.cuda.synchronize()
    with PowerLog(torch.cuda.current_device()) if power else contextlib.nullcontext() as log:
        for _ in range(lead):
            step()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            step()
            step()  # the second starts while the first still runs, as in training
            torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    busy_ms = sum(e.time_range.elapsed_us() for e in kernels) / 1e3 / 2
    # Timed minus busy is the GPU's waiting plus any clock difference between the timed rounds
    # and these two steps; the gaps below are the waiting alone.
    summary = (f"{len(kernels) // 2} kernels per step, GPU busy {busy_ms:.1f} ms per step; timed step "
               f"{step_ms:.1f} ms ({step_ms - busy_ms:.1f} ms more; table: two steps)\n"
               + idle_gaps(kernels) + "\n" + sync_count(step))
    if log is not None:
        samples = log.samples()
        clock = summarize(samples, [(samples[0][0], samples[-1][0])], 1.0)["sm_mhz_median"] if samples else None
        summary += ("\nSM clock during the lead and profiled steps: "
                    + (f"median {clock:.0f} MHz ({len(samples)} samples)" if samples else "no samples"))
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=-1, max_name_column_width=90)
    with open(path, "a") as f:
        f.write(f"== {label}: {summary}\n{table}\n")
    print(summary)
    print("\n".join(table.splitlines()[:28]))


def idle_gaps(kernels, top=8) -> str:
    """Where the GPU sat idle between two kernels of the profiled steps: the total, and the
    longest gaps with the kernels on either side (the first kernel's wait for the CPU excluded)."""
    spans = sorted((e.time_range.start, e.time_range.end, e.name) for e in kernels)
    gaps, end, last = [], spans[0][1], spans[0][2]
    for start, stop, name in spans[1:]:
        if start > end:
            gaps.append((start - end, last, name))
        if stop > end:
            end, last = stop, name
    total = sum(g for g, _, _ in gaps) / 1e3
    small = sum(g for g, _, _ in gaps if g < 20) / 1e3
    lines = [f"idle between kernels: {total:.1f} ms over both steps, {small:.1f} ms of it in gaps < 20 us "
             f"({sum(g < 20 for g, _, _ in gaps)} gaps); longest:"]
    lines += [f"  {g / 1e3:7.3f} ms after {a[:60]} before {b[:60]}" for g, a, b in sorted(gaps, reverse=True)[:top]]
    return "\n".join(lines)


def sync_count(step) -> str:
    """Host synchronizations in one step (CUDA sync debug mode): each stalls the CPU's run-ahead."""
    import warnings

    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    # (the mode's own "prototype feature" notice is not a synchronization)
    syncs = [str(w.message).splitlines()[0][:100] for w in caught
             if "called a synchronizing CUDA operation" in str(w.message)]
    return f"host synchronizations in one step: {len(syncs)}" + "".join(f"\n  {m}" for m in sorted(set(syncs)))


def free(device, keep_compiled=False):
    gc.collect()
    if not keep_compiled:  # the resident compiled models still need their graphs
        torch._dynamo.reset()  # drop compiled graphs (and what their guards hold) of the last models
    if device.type == "cuda":
        torch.cuda.empty_cache()


def default_configs(device):
    """The main configurations that can run here: torchao's where it imports, compiled ones on CUDA."""
    try:
        import torchao.float8  # noqa: F401
        ao = True
    except Exception:  # noqa: BLE001  (a torchao built for another torch can fail in other ways)
        ao = False
    keep = [c for c in CONFIGS if ao or not c.startswith("torchao")]
    return keep if device.type == "cuda" else [c for c in keep if not c.endswith("_compiled")]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for flag, default in [("layers", 8), ("dim", 4096), ("heads", 32), ("kv-heads", 8), ("ffn", 14336),
                          ("vocab", 128256), ("batch", 2), ("seq", 4096), ("steps", 10), ("warmup", 3),
                          ("rounds", 3), ("seed", 0), ("grad-accum", 1)]:
        ap.add_argument(f"--{flag}", type=int, default=default)
    ap.add_argument("--configs", nargs="+", choices=CONFIGS + list(ABLATIONS),
                    help="default: all that can run here; an ablation's name here runs it without bf16 "
                         "(one configuration per process, for its peak memory)")
    ap.add_argument("--ablations", nargs="+", choices=list(ABLATIONS), default=[], metavar="NAME",
                    help="variants that answer one question each: " + "; ".join(
                        f"{name}: {why}" for name, why in ABLATIONS.items()))
    ap.add_argument("--ac", choices=["none", "every2", "full"], help="one AC mode (overrides --ac-modes)")
    ap.add_argument("--ac-modes", nargs="+", choices=["none", "every2", "full"], default=["none"])
    ap.add_argument("--ac-early-stop", choices=["on", "off"], default="on",
                    help="checkpoint recomputation stops after the last saved tensor (on: PyTorch's and Hugging "
                         "Face's default; off: torchtitan's trainer's unless --activation_checkpoint.early_stop)")
    ap.add_argument("--ac-compiled-policy", choices=["plain", "recompute_everything"], default="plain",
                    help="how compiled configurations checkpoint other models' blocks: plain (as torchtitan does), "
                         "or with a selective policy that recomputes every op (under torch < 2.12 a plain "
                         "checkpoint under compile keeps Float8Linear's activations: docs/design.md)")
    ap.add_argument("--f8-filter", choices=["all", "default"], default="all",
                    help="f8tensor configs: convert every linear but the output (all, as torchao here) "
                         "or only those f8tensor's default filter converts (default)")
    ap.add_argument("--model", choices=models.MODELS, default="ours",
                    help="ours (below), torchtitan's Llama 3, or Hugging Face's Llama, Qwen2, OLMo 2 or Gemma 3 "
                         "(benchmarks/models.py), all at the shape arguments' sizes")
    ap.add_argument("--rope", choices=["rotate_half", "complex"], default="rotate_half",
                    help="rotary embedding code: rotate_half on the transposed heads (Hugging Face's "
                         "Llama; the issue's reference model) or Meta's Llama 3 / torchtitan complex form")
    ap.add_argument("--out", default="results/train.jsonl")
    ap.add_argument("--profile", action="store_true",
                    help="after timing, profile one step per configuration (CUDA only)")
    ap.add_argument("--fsdp", action="store_true",
                    help="FSDP2 over every GPU of a torchrun launch (see above; NCCL)")
    ap.add_argument("--tp", type=int, default=1,
                    help="tensor parallelism over N ranks of a torchrun launch (see above; our model only)")
    ap.add_argument("--emulate", action="store_true",
                    help="f8tensor's GEMMs in high precision on the quantized operands (Float8Config.emulate): "
                         "a CPU check of recipes whose scaled GEMM the CPU's _scaled_mm lacks (blockwise)")
    ap.add_argument("--recipe", default="tensorwise",
                    help="the float8 recipe of both libraries (Float8Config / Float8LinearConfig.from_recipe_name)")
    ap.add_argument("--cuda-graph", action="store_true",
                    help="capture each configuration's training step as a CUDA graph and replay it (CUDA only)")
    ap.add_argument("--power", action="store_true",
                    help="sample SM clock and power (nvidia-smi) during the timed rounds; each row gets "
                         "the median clock, mean power, energy per step and power-capped fraction (CUDA only)")
    a = ap.parse_args()
    if a.fsdp and a.profile:
        ap.error("--profile profiles one process: run it without --fsdp")
    if a.model != "ours" and a.rope != "rotate_half":
        ap.error("--rope chooses the RoPE code of our model; the other models run their own")
    if a.cuda_graph and (a.fsdp or a.profile or not torch.cuda.is_available()):
        ap.error("--cuda-graph captures one process's step on a CUDA GPU: not with --fsdp or --profile, nor on CPU")
    if a.power and not torch.cuda.is_available():
        ap.error("--power samples a CUDA GPU's clock and power: no CUDA device here")
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")
    if hasattr(torch._dynamo.config, "recompile_limit"):
        torch._dynamo.config.recompile_limit = 1000
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if a.tp < 1:
        ap.error("--tp must be at least 1")
    if a.tp > 1 and a.model != "ours":
        ap.error("--tp lays out our model (--model ours); the other models are not tensor-parallel here")
    if a.tp > 1 and (a.profile or a.cuda_graph):
        ap.error("--tp runs several processes: not with --profile or --cuda-graph")
    if a.fsdp or a.tp > 1:
        if "LOCAL_RANK" not in os.environ:
            flag = "--fsdp" if a.fsdp else f"--tp {a.tp}"
            ap.error(f"{flag} runs under torchrun: torchrun --nproc-per-node N benchmarks/train.py {flag} ...")
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if world() % a.tp or (world() != a.tp and not a.fsdp):
            ap.error(f"--tp {a.tp} over {world()} ranks: the ranks must be --tp's (or, with --fsdp, a multiple of it)")
    # bf16 first in each AC mode: it is the base of the vs_bf16 ratio
    configs = sorted(dict.fromkeys((a.configs or default_configs(device)) + a.ablations), key=ORDER.index)
    env = environment()
    if rank() == 0:
        print(env)
    shape = {k: v for k, v in vars(a).items()
             if k not in ("configs", "ablations", "ac", "ac_modes", "out", "profile", "power")}
    shape["world"] = world()
    # (f8_filter rides along in `shape`: it is part of what was measured)
    rows = []
    for ac in [a.ac] if a.ac else a.ac_modes:
        rows += run_mode(a, configs, ac, device, env, shape)
    if rank() == 0:
        fsdp = f"  FSDP2 over {world() // a.tp} ranks, batch per rank" if a.fsdp else ""
        fsdp += f"  tensor parallel over {a.tp} ranks" if a.tp > 1 else ""
        print(f"\n{env['gpu'] or device.type}  torch {env['torch']}  commit {env['commit']}  {a.model}: {a.layers} x (dim "
              f"{a.dim}, ffn {a.ffn}, heads {a.heads}/{a.kv_heads}){fsdp}  batch {a.batch} x seq {a.seq}")
        print_table(rows)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def print_table(rows):
    cols = [("tok/s", "tokens_per_s", "{:.0f}"), ("vs bf16", "vs_bf16", "{:.3f}"),
            ("step ms", "step_ms", "{:.1f}"), ("peak GB", "peak_gb", "{:.2f}"),
            ("fwd peak", "peak_fwd_gb", "{:.2f}"), ("loss", "loss", "{:.3f}")]
    if any("sm_mhz_median" in r for r in rows):  # --power
        cols += [("SM MHz", "sm_mhz_median", "{:.0f}"), ("W", "power_w_mean", "{:.0f}"),
                 ("J/step", "energy_j_per_step", "{:.1f}"), ("capped", "power_capped_frac", "{:.2f}")]
    print(f"{'ac':<7} {'config':<28}" + "".join(f"{name:>10}" for name, _, _ in cols) + "  status")
    for r in rows:
        cells = "".join(f"{fmt.format(r[key]) if r.get(key) is not None else '-':>10}" for _, key, fmt in cols)
        status = f"ok ({r['fp8_linears']} fp8 linears)" if r["status"] == "ok" else r["status"]
        if r.get("alloc_retries"):  # the allocator freed its cache inside timed steps: slower
            status += f", {r['alloc_retries']} allocator retries while timed"
        print(f"{r['ac']:<7} {r['config']:<28}{cells}  {status}")

if __name__ == "__main__":
    main()
