"""convert_to_float8_training: what is swapped, what is kept and why, idempotence, the summary."""

import pytest
import torch
import torch.nn.utils.prune  # noqa: F401 (torch.nn.utils.prune)
from expecttest import TestCase
from f8utils import DEVICE
from torch import nn

from f8tensor import Float8Config, Float8Linear, conversion_summary, convert_to_float8_training


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(64, 256)
        self.down = nn.Linear(256, 64)
        self.odd = nn.Linear(64, 10)  # 10 outputs: not a multiple of 16
        self.attn = nn.MultiheadAttention(64, 4)  # out_proj is a subclass of nn.Linear


def model():
    return nn.Sequential(Block(), nn.Linear(64, 64, bias=False)).to(DEVICE)


def every_layer(mod, fqn):
    return True


class TestConvert(TestCase):
    def test_summary(self):
        m = convert_to_float8_training(model(), module_filter_fn=every_layer)
        self.assertExpectedInline(conversion_summary(m), """\
f8tensor: 3 of 5 linear layers in float8
  0.up             64->256      float8
  0.down           256->64      float8
  0.odd            64->10       kept: in_features=64, out_features=10: _scaled_mm needs both divisible by 16
  0.attn.out_proj  64->64       kept: NonDynamicallyQuantizableLinear: nn.MultiheadAttention reads its weight itself, its forward never runs
  1                64->64       float8""")

    def test_filter_fn_and_its_reason(self):
        m = convert_to_float8_training(model(), module_filter_fn=lambda mod, fqn: fqn != "0.down")
        self.assertExpectedInline(conversion_summary(m).splitlines()[2], """  0.down           256->64      kept: excluded by module_filter_fn""")


def test_swaps_in_place_keeping_parameters_and_optimizer():
    m = model()
    params = list(m.parameters())
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    out = convert_to_float8_training(m, config=Float8Config(fast_accum_output=False), module_filter_fn=every_layer)
    assert out is m
    assert list(m.parameters()) == params  # same objects, same order
    assert type(m[0].up) is Float8Linear and m[0].up.config.fast_accum_output is False
    assert type(m[0].odd) is nn.Linear
    loss = m[0].down(m[0].up(torch.randn(8, 64, device=DEVICE))).sum()
    loss.backward()
    before = m[0].up.weight.detach().clone()
    opt.step()
    assert not torch.equal(before, m[0].up.weight)


def test_hooks_registered_before_conversion_run_on_the_new_layer():
    """Forward pre/post, full backward and state-dict hooks move with the layer (parallelize_module
    puts its input/output conversions in such hooks); their handles still remove them."""
    lin = nn.Linear(64, 32, device=DEVICE)
    seen = []
    pre = lin.register_forward_pre_hook(lambda mod, args: seen.append(("pre", type(mod).__name__)))
    lin.register_forward_hook(lambda mod, args, out: seen.append(("post", type(mod).__name__)))
    lin.register_forward_hook(lambda mod, args, kwargs, out: out * 2, with_kwargs=True)
    lin.register_full_backward_hook(lambda mod, gin, gout: seen.append(("backward", type(mod).__name__)))
    lin.register_state_dict_post_hook(lambda mod, sd, prefix, local: seen.append(("state_dict", type(mod).__name__)))
    new = convert_to_float8_training(lin, module_filter_fn=every_layer)
    seen.clear()
    x = torch.randn(8, 64, device=DEVICE, requires_grad=True)
    out = new(x)
    out.sum().backward()
    new.state_dict()
    assert seen == [("pre", "Float8Linear"), ("post", "Float8Linear"), ("backward", "Float8Linear"),
                    ("state_dict", "Float8Linear")]
    with torch.no_grad():
        assert torch.equal(out, 2 * new.forward(x))  # the kwargs hook's result replaced the output
    pre.remove()
    seen.clear()
    new(torch.randn(8, 64, device=DEVICE))
    assert seen == [("post", "Float8Linear")]


def test_converting_twice_is_a_no_op():
    m = convert_to_float8_training(model(), module_filter_fn=every_layer)
    layers = [m[0].up, m[0].down, m[1]]
    convert_to_float8_training(m, module_filter_fn=every_layer)
    assert [m[0].up, m[0].down, m[1]] == layers


def test_root_linear_is_converted_and_returned():
    lin = nn.Linear(2048, 4096, device="meta")
    out = convert_to_float8_training(lin)
    assert out is lin and type(out) is Float8Linear
    assert convert_to_float8_training(out) is out


def test_conversion_keeps_the_layer_object_and_everything_on_it():
    """The layer's class changes in place: its own buffers and attributes, its training flag, a
    layer registered twice and references held outside the model all stay with it."""
    lin = nn.Linear(64, 64, device=DEVICE)
    lin.register_buffer("steps", torch.zeros(()))
    lin.tag = "shared"
    outside = [lin]
    m = nn.Sequential(lin, nn.ReLU(), lin).eval()
    convert_to_float8_training(m, module_filter_fn=every_layer)
    assert m[0] is m[2] is outside[0] is lin and type(lin) is Float8Linear
    assert not lin.training and lin.tag == "shared" and "0.steps" in m.state_dict()
    assert conversion_summary(m).splitlines()[0] == "f8tensor: 1 of 1 linear layers in float8"


def test_a_pruned_layer_converts_and_runs_its_mask():
    """torch.nn.utils.prune makes weight a plain tensor recomputed before each forward (weight_orig *
    weight_mask): the converted layer runs on the masked weight, its hook and state kept."""
    lin = nn.Linear(64, 64, device=DEVICE)
    torch.nn.utils.prune.l1_unstructured(lin, "weight", amount=0.5)
    x = torch.randn(8, 64, device=DEVICE)
    with torch.no_grad():
        want = lin(x)
    convert_to_float8_training(lin, module_filter_fn=every_layer)
    assert type(lin) is Float8Linear and {"weight_orig", "weight_mask"} <= set(lin.state_dict())
    with torch.no_grad():
        lin.weight_orig.mul_(2)  # the mask's hook recomputes the weight before the next forward
    out = lin(x)
    assert torch.equal(lin.weight, lin.weight_orig * lin.weight_mask)
    torch.testing.assert_close(out, 2 * want - lin.bias, rtol=0.1, atol=0.1 * want.abs().max().item())
    out.sum().backward()
    assert lin.weight_orig.grad is not None


def test_an_instance_forward_is_kept_with_the_reason():
    """A forward set on the instance (accelerate's hooks install one) would be bypassed by nothing,
    but would hide Float8Linear's: kept, with the reason."""
    lin = nn.Linear(64, 64, device=DEVICE)
    lin.forward = lambda x: 7 * torch.ones_like(x)
    convert_to_float8_training(lin, module_filter_fn=every_layer)
    assert type(lin) is nn.Linear and torch.equal(lin(torch.zeros(2, 64, device=DEVICE)), 7 * torch.ones(2, 64,
                                                                                                         device=DEVICE))
    assert "kept: Linear: the module has an instance-level forward" in conversion_summary(lin)


def test_converting_again_with_another_config_is_refused():
    m = convert_to_float8_training(model(), module_filter_fn=every_layer)
    convert_to_float8_training(m, module_filter_fn=every_layer, config=m[1].config)  # the same: a no-op
    with pytest.raises(ValueError, match="a Float8Linear already, with another config"):
        convert_to_float8_training(m, module_filter_fn=every_layer, config=Float8Config(fast_accum_output=False))


class TestDefaultFilter(TestCase):
    def test_small_layers_stay_bf16_by_default(self):
        with torch.device("meta"):
            m = nn.ModuleDict({"q": nn.Linear(4096, 4096), "k": nn.Linear(4096, 1024),
                               "w1": nn.Linear(4096, 14336), "tiny": nn.Linear(64, 64)})
        convert_to_float8_training(m)
        self.assertExpectedInline(conversion_summary(m), """\
f8tensor: 2 of 4 linear layers in float8
  q      4096->4096   float8
  k      4096->1024   kept: 4096->1024: a dimension <= 1024, where fp8 measured slower than bf16
  w1     4096->14336  float8
  tiny   64->64       kept: 64->64: a dimension <= 1024, where fp8 measured slower than bf16""")


def test_runs_without_triton():
    """Where triton is not installed (macOS, say) f8tensor imports and runs the PyTorch references."""
    import os
    import subprocess
    import sys

    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch, f8tensor\n"
            "m = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.RMSNorm(64))\n"
            "f8tensor.convert_to_float8_training(m, module_filter_fn=lambda *a: True)\n"
            "report = f8tensor.fuse_model_ops(m)\n"
            "m(torch.randn(4, 64)).sum().backward()\n"
            "f8tensor.reset_state()\n"
            "print(type(m[0]).__name__, len(report.fused()))\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split() == ["Float8Linear", "1"]


class Configurable:  # torchtitan 0.3's: a base after nn.Module in the MRO, with an __init_subclass__
    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)


class TitanModule(nn.Module, Configurable):  # torchtitan 0.3's protocols.module.Module
    def init_weights(self, std=0.02):
        for p in self.parameters(recurse=False):
            nn.init.normal_(p, std=std)


class TitanLinear(nn.Linear, TitanModule):  # torchtitan 0.3's models.common.linear.Linear
    def __init__(self, in_features, out_features):
        super().__init__(in_features, out_features, bias=False)
        self.tag = "wq"


class ScaledBiasRowwiseLinear(nn.Linear):  # overrides forward: kept
    def forward(self, x):
        return super().forward(x) * 2


def test_subclasses_that_keep_nn_linears_forward_convert_in_place():
    """torchtitan 0.3 builds its models from nn.Linear subclasses: they take Float8Linear's forward
    in place (same object, parameters, attributes and methods), the bits of a Float8Linear; one that
    overrides forward is kept, with the reason."""
    import copy
    import pickle

    torch.manual_seed(0)
    m = nn.Sequential(TitanLinear(64, 64), ScaledBiasRowwiseLinear(64, 64)).to(DEVICE, torch.bfloat16)
    titan, weight, keys = m[0], m[0].weight, list(m.state_dict())
    assert convert_to_float8_training(m, module_filter_fn=every_layer) is m
    assert m[0] is titan and m[0].weight is weight and isinstance(titan, Float8Linear) and isinstance(titan, TitanLinear)
    assert type(titan).__name__ == "TitanLinear" and titan.tag == "wq" and list(m.state_dict()) == keys
    titan.init_weights(std=0.5)  # its own methods still work
    assert type(m[1]) is ScaledBiasRowwiseLinear
    assert conversion_summary(m).splitlines()[1:] == [
        "  0      64->64       float8",
        "  1      64->64       kept: ScaledBiasRowwiseLinear: overrides forward (ScaledBiasRowwiseLinear.forward), "
        "which f8tensor's layer would replace"]
    plain = Float8Linear.from_float(nn.Linear(64, 64, bias=False).to(DEVICE, torch.bfloat16),
                                    Float8Config())
    plain.weight = titan.weight
    x = torch.randn(8, 64, device=DEVICE, dtype=torch.bfloat16)
    assert torch.equal(titan(x), plain(x))
    for twin in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        assert isinstance(twin[0], Float8Linear) and isinstance(twin[0], TitanLinear) and twin[0].tag == "wq"
        assert torch.equal(twin[0](x), titan(x))
    assert convert_to_float8_training(m, module_filter_fn=every_layer) is m and m[0] is titan  # twice: no-op


def test_subclasses_the_swap_would_change_are_kept_with_the_reason():
    """An attribute of its own named as Float8Linear's (config), a lazy module (it turns into
    nn.Linear at its first call): kept, with the reason, the module untouched."""
    class CfgLinear(nn.Linear):
        def __init__(self, i, o):
            super().__init__(i, o)
            self.config = {"name": "wq"}

    m = nn.Sequential(CfgLinear(64, 64), nn.LazyLinear(64))
    convert_to_float8_training(m, module_filter_fn=every_layer)
    assert type(m[0]) is CfgLinear and m[0].config == {"name": "wq"} and type(m[1]) is nn.LazyLinear
    assert conversion_summary(m).splitlines()[1:] == [
        "  0      64->64       kept: CfgLinear: its own config would be replaced by Float8Linear's",
        "  1      0->64        kept: LazyLinear: a lazy module (it becomes Linear at its first call): convert after that"]


def test_the_swap_runs_no_subclass_hook_and_copies_keep_later_subclasses():
    """Making the converted class calls no __init_subclass__ of the user's (a registry keeps its
    class); a class made of the converted one later (as FSDP2 makes one) survives a deepcopy."""
    import copy

    registry = {}

    class Registered:
        def __init_subclass__(cls, **kwargs):
            super().__init_subclass__(**kwargs)
            registry[cls.__name__] = cls

    class MyLinear(nn.Linear, TitanModule, Registered):  # the hook comes after nn.Module in the MRO
        pass

    m = MyLinear(64, 64)
    assert registry == {"MyLinear": MyLinear}
    convert_to_float8_training(nn.Sequential(m), module_filter_fn=every_layer)
    assert isinstance(m, Float8Linear) and registry == {"MyLinear": MyLinear}
    m.__class__ = type("Wrapped", (type(m),), {})  # as fully_shard makes a class of the module's own
    twin = copy.deepcopy(m)
    assert type(twin) is type(m) and isinstance(twin, MyLinear)


def test_summary_names_weights_conversion_does_not_reach():
    """A mixture of experts' batched experts (one 3-D parameter per projection, as transformers 5
    holds them) and a convolution are not linear layers: conversion leaves them, the summary says so."""
    class Experts(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_up_proj = nn.Parameter(torch.randn(4, 128, 64))
            self.down_proj = nn.Parameter(torch.randn(4, 64, 64))
            self.scale = nn.Parameter(torch.ones(64))  # one dim: not listed

    m = nn.Sequential(nn.Linear(64, 64), Experts(), nn.Conv1d(8, 8, 3))
    convert_to_float8_training(m, module_filter_fn=every_layer)
    assert type(m[1]) is Experts and type(m[2]) is nn.Conv1d
    assert conversion_summary(m).splitlines() == [
        "f8tensor: 1 of 1 linear layers in float8",
        "  0      64->64       float8",
        "2 modules with weights of three or more dims (a mixture of experts' batched experts, convolutions), not "
        "linear layers: conversion swaps nn.Linear only, these stay as they are",
        "  1  gate_up_proj [4, 128, 64], down_proj [4, 64, 64]",
        "  2  weight [8, 8, 3]"]
