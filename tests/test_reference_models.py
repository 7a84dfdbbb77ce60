"""The model code people train, fused by fuse_model_ops in strict mode: Hugging Face's Llama and Qwen2
(transformers), OLMo 2, Gemma 2 and 3, Phi-3 and GLM-4, torchtitan's Llama 3, and our own benchmark and demo models. An upgrade of Python,
transformers or torchtitan that stops one of these fusions fails here instead of training slower.

The proofs are pure Python, so these run on CPU (CI installs the pinned transformers and torchtitan
of the `test` extra); the GPU machine runs the fused kernels in the other fusion tests. Where a
library's form is not fused, strict mode must say so: that assert
changes when the fusion does."""

import copy
import os
import sys

import pytest
import torch
from f8utils import DEVICE, convert_and_fuse, torchtitan_llama
from torch import nn

from f8tensor import convert_to_float8_training, fuse_model_ops, fusion_report, geglu
from f8tensor.fusion import gate_proof, norm_proof, rope_proof

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU_ONLY = pytest.mark.skipif(DEVICE.type == "cuda", reason="pure-Python proofs: CPU CI runs them with the "
                                                             "pinned transformers and torchtitan")
pytestmark = CPU_ONLY


@pytest.fixture
def fused_calls(monkeypatch):
    """Calls of the fused gate, of the fused rotation (small tensors included) and of the fused norm
    in Hugging Face's form."""
    calls = {"swiglu": 0, "rope": 0, "rms_norm": 0}
    swiglu, rope, norm = gate_proof.swiglu, rope_proof.rope_checked, norm_proof.fused_rms_norm

    def counted_swiglu(*args):
        calls["swiglu"] += 1
        return swiglu(*args)

    def counted_rope(*args, **kwargs):
        calls["rope"] += 1
        return rope(*args, **kwargs)

    def counted_norm(*args, **kwargs):
        calls["rms_norm"] += 1
        return norm(*args, **kwargs)

    monkeypatch.setattr(norm_proof, "fused_rms_norm", counted_norm)
    monkeypatch.setattr(gate_proof, "swiglu", counted_swiglu)
    monkeypatch.setattr(rope_proof, "rope_checked", counted_rope)
    monkeypatch.setattr(rope_proof, "MIN_FUSED_NUMEL", 0)
    return calls


def sqnr(ref, x) -> float:
    return (20 * torch.log10(ref.float().norm() / (ref.float() - x.float()).norm())).item()


def assert_fused_as_written(model, tokens, fused_calls, *logs, **fusions):
    """Every fusion at once, on a float32 copy of the model, gives the written code's float32 output
    to within float32 rounding (the order of operations differs: 130 to 160 dB on these models; a
    rotation left out or a gate off by 25 % gave 11 to 78 dB). The float8 comparisons that follow
    are too coarse to see a wrong fusion. The counters the test keeps are left as they were."""
    counts = {**fused_calls}, [len(log) for log in logs]
    written = copy.deepcopy(model).float()
    fused = copy.deepcopy(written)
    fuse_model_ops(fused, strict=True, **fusions)
    want, got = written(tokens), fused(tokens)
    want, got = getattr(want, "logits", want), getattr(got, "logits", got)
    assert sqnr(want, got) > 100, sqnr(want, got)
    fused_calls.update(counts[0])
    for log, n in zip(logs, counts[1]):
        del log[n:]


def fqns(report, kind):
    return sorted(r.fqn for r in report.fused(kind))


def hugging_face(name):
    import transformers

    config_cls, model_cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
                             "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}[name]
    config = config_cls(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=256, max_position_embeddings=64)
    torch.manual_seed(0)
    return model_cls(config).to(torch.bfloat16)


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_hugging_face_mlp_and_attention_are_fused(name, fused_calls):
    model = hugging_face(name)
    tokens = torch.randint(0, 256, (2, 32))
    want = model(tokens).logits
    assert_fused_as_written(model, tokens, fused_calls)
    convert_to_float8_training(model, module_filter_fn=lambda mod, fqn: "lm_head" not in fqn)
    report = fuse_model_ops(model, strict=True)
    assert fqns(report, "rms_norm") == ["model.layers.0.input_layernorm", "model.layers.0.post_attention_layernorm",
                                        "model.layers.1.input_layernorm", "model.layers.1.post_attention_layernorm",
                                        "model.norm"]
    assert fqns(report, "swiglu") == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert fqns(report, "rope") == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    assert str(report.fused("rope")[0].detail) == "RoPE fused: apply_rotary_pos_emb run as f8tensor.rope"
    got = model(tokens).logits
    assert fused_calls == {"swiglu": 2, "rope": 4, "rms_norm": 5}  # q and k of each layer; 2 norms a layer and the last
    assert sqnr(want, got) > 15  # float8 layers (the fusions' values: assert_fused_as_written)
    got.float().square().mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_olmo2_norms_rope_and_gate_are_fused(fused_calls):
    """OLMo 2 (transformers' Olmo2ForCausalLM): its Olmo2RMSNorm multiplies the weight in fp32 and
    rounds once (nn.RMSNorm's form), fused without the cast before the weight, q_norm and k_norm
    over whole projections; its apply_rotary_pos_emb rotates by fp32 tables and casts back to q's
    dtype, which is rope's arithmetic. Each of the two alone gives the written logits bit for bit
    on CPU."""
    import transformers

    config = transformers.Olmo2Config(hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                                      max_position_embeddings=64, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    torch.manual_seed(0)
    model = transformers.Olmo2ForCausalLM(config).to(torch.bfloat16)
    tokens = torch.randint(0, 256, (2, 32))
    want = model(tokens).logits
    for alone, kind, modules, calls in ((dict(swiglu=False, rope=False), "rms_norm", 9, 9),
                                        (dict(swiglu=False, rms_norm=False), "rope", 2, 4)):
        copied = copy.deepcopy(model)
        assert len(fuse_model_ops(copied, **alone).fused(kind)) == modules
        fused_calls.update(swiglu=0, rope=0, rms_norm=0)
        assert torch.equal(copied(tokens).logits, want)
        assert fused_calls[kind] == calls  # the fused op ran (9 norms; q and k of each layer)
    assert_fused_as_written(model, tokens, fused_calls)
    convert_to_float8_training(model, module_filter_fn=lambda mod, fqn: "lm_head" not in fqn)
    report = fuse_model_ops(model, strict=True)
    norms = [f"model.layers.{i}.{name}" for i in range(2) for name in (
        "post_attention_layernorm", "post_feedforward_layernorm", "self_attn.k_norm", "self_attn.q_norm")]
    assert fqns(report, "rms_norm") == sorted(norms + ["model.norm"])
    assert all(str(r.detail) == "RMSNorm fused: (weight * normalized(x, eps=variance_epsilon)).to(x.dtype)"
               for r in report.fused("rms_norm"))
    assert fqns(report, "swiglu") == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert fqns(report, "rope") == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    fused_calls.update(swiglu=0, rope=0, rms_norm=0)
    got = model(tokens).logits
    assert fused_calls == {"swiglu": 2, "rope": 4, "rms_norm": 9}
    assert sqnr(want, got) > 15  # float8 layers (the fusions' values: assert_fused_as_written)
    got.float().square().mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("name, norms", [("Gemma2", 9), ("Gemma3", 13)])
def test_gemma_norms_gate_and_rope_are_fused(name, norms, fused_calls, monkeypatch):
    """Gemma 2 and 3 (transformers' <Name>ForCausalLM): their RMSNorm normalizes in a helper method
    and scales by 1 + weight in fp32 (Gemma 3 normalizes q and k too): fused in that form, the
    logits bit for bit the written ones on CPU with the norms fused alone; their feed-forward's
    GELU-tanh gate (transformers' GELUTanh) runs as f8tensor.geglu; strict mode holds."""
    import transformers

    geglu_calls = []
    monkeypatch.setattr(gate_proof, "geglu", lambda a, b: geglu_calls.append(1) or geglu(a, b))
    config_cls = transformers.Gemma3TextConfig if name == "Gemma3" else transformers.Gemma2Config
    config = config_cls(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=16, vocab_size=256, pad_token_id=0, bos_token_id=1,
                        eos_token_id=2)
    torch.manual_seed(0)
    model = getattr(transformers, f"{name}ForCausalLM")(config).to(torch.bfloat16)
    tokens = torch.randint(3, 256, (2, 32))
    want = model(tokens).logits
    copied = copy.deepcopy(model)
    assert len(fuse_model_ops(copied, swiglu=False, rope=False).fused("rms_norm")) == norms
    fused_calls.update(swiglu=0, rope=0, rms_norm=0)
    assert torch.equal(copied(tokens).logits, want) and fused_calls["rms_norm"] == norms
    assert_fused_as_written(model, tokens, fused_calls, geglu_calls)
    convert_to_float8_training(model, module_filter_fn=lambda mod, fqn: "lm_head" not in fqn)
    report = fuse_model_ops(model, strict=True)
    assert [len(report.fused(kind)) for kind in ("rms_norm", "swiglu", "rope")] == [norms, 2, 2]
    assert all(str(r.detail) == "RMSNorm fused: (normalized(x, eps=eps) * (1 + weight)).type_as(x)"
               for r in report.fused("rms_norm"))
    assert all(str(r.detail) == "GeGLU gate fused: down_proj(gelu_tanh(gate_proj) * up_proj)"
               for r in report.fused("swiglu"))
    fused_calls.update(swiglu=0, rope=0, rms_norm=0)
    got = model(tokens).logits
    assert fused_calls == {"swiglu": 0, "rope": 4, "rms_norm": norms} and len(geglu_calls) == 2
    assert sqnr(want, got) > 15
    got.float().square().mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", ["Phi3", "Glm4"])
def test_chunked_gate_up_feed_forwards_are_fused(name, fused_calls, monkeypatch):
    """Phi-3 and GLM-4 (transformers' <Name>ForCausalLM): one gate_up projection chunked in two, its
    gate run as f8tensor.swiglu_halves on the projection's output. With the gate fused alone the
    logits on CPU are bit for bit those of the same model written with swiglu of the two halves
    (one rounding, where the written code rounds silu's output first); strict mode holds for the
    norms, the gate and the RoPE (the partial-rotary form, cat([rotation of x[..., :R], x[..., R:]]);
    GLM's rotation in the adjacent pairs' form by tables repeated per pair)."""
    import transformers

    from f8tensor import swiglu, swiglu_halves

    halves_calls = []
    monkeypatch.setattr(gate_proof, "swiglu_halves", lambda y, half: halves_calls.append(half) or swiglu_halves(y, half))
    config = getattr(transformers, f"{name}Config")(
        hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, vocab_size=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = getattr(transformers, f"{name}ForCausalLM")(config).to(torch.bfloat16)
    tokens = torch.randint(3, 256, (2, 32))
    written = copy.deepcopy(model)
    for mlp in (layer.mlp for layer in written.model.layers):
        mlp.forward = lambda x, mlp=mlp: mlp.down_proj(swiglu(*mlp.gate_up_proj(x).chunk(2, dim=-1)))
    want = written(tokens).logits
    copied = copy.deepcopy(model)
    report = fuse_model_ops(copied, rms_norm=False, rope=False, strict=True)
    assert fqns(report, "swiglu") == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert all(str(r.detail) == "SwiGLU gate fused: down_proj(silu(gate_up_proj half 0 of 2) * gate_up_proj half 1 of 2)"
               for r in report.fused("swiglu"))
    assert torch.equal(copied(tokens).logits, want) and halves_calls == [0, 0]
    assert_fused_as_written(model, tokens, fused_calls, halves_calls)
    convert_to_float8_training(model, module_filter_fn=lambda mod, fqn: "lm_head" not in fqn)
    report = fuse_model_ops(model, strict=True)
    assert len(report.fused("swiglu")) == 2 and len(report.fused("rms_norm")) == (5 if name == "Phi3" else 9)
    assert len(report.fused("rope")) == 2
    fused_calls.update(swiglu=0, rope=0, rms_norm=0)
    got = model(tokens).logits
    assert halves_calls == [0, 0] * 2 and fused_calls["rope"] == 4
    assert sqnr(want, got) > 15
    got.float().square().mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_torchtitan_feed_forward_norms_and_complex_rope_are_fused(fused_calls):
    model = torchtitan_llama()
    tokens = torch.randint(0, 256, (2, 32))
    want = model(tokens)
    assert_fused_as_written(model, tokens, fused_calls)
    convert_to_float8_training(model, module_filter_fn=lambda mod, fqn: fqn != "output")
    report = fuse_model_ops(model, strict=True)
    assert fqns(report, "swiglu") == ["layers.0.feed_forward", "layers.1.feed_forward"]
    assert fqns(report, "rope") == ["layers.0.attention", "layers.1.attention"]  # the complex form
    assert len(report.fused("rms_norm")) == 5  # attention_norm, ffn_norm per layer, and the final norm
    got = model(tokens)
    assert fused_calls["swiglu"] == 2 and fused_calls["rope"] == 4 and sqnr(want, got) > 15


def test_our_benchmark_and_demo_models_are_fused(fused_calls):
    from types import SimpleNamespace

    from f8tensor.demo.run import Transformer as DemoTransformer

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import train
    finally:
        sys.path.pop(0)
    a = SimpleNamespace(vocab=256, dim=64, layers=2, heads=4, kv_heads=2, ffn=128, seq=32, rope="rotate_half")
    bench = train.Transformer(a).to(torch.bfloat16)
    tokens = torch.randint(0, 256, (2, 32))
    assert_fused_as_written(bench, tokens, fused_calls)
    report = fuse_model_ops(bench, strict=True)
    assert [len(report.fused(k)) for k in ("rms_norm", "swiglu", "rope")] == [5, 2, 2]
    bench(tokens)
    assert fused_calls == {"swiglu": 2, "rope": 4, "rms_norm": 0}  # its nn.RMSNorms are swapped
    demo = DemoTransformer(dim=64, layers=2, heads=4, seq=32)
    assert_fused_as_written(demo, tokens, fused_calls, rope=False)
    demo = convert_and_fuse(demo, rope=False, strict=True)
    assert [len(fusion_report(demo).fused(k)) for k in ("rms_norm", "swiglu")] == [5, 2]
    assert isinstance(demo, nn.Module)
