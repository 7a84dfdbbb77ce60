"""A converted and fused model under FakeTensorMode outside torch.compile (shape propagation, memory
estimation: torchtitan's and PyTorch's FSDP memory tracker run a step on fake tensors): the step
runs, with the real step's output and gradient shapes and dtypes, and nothing reads a fake tensor's
data pointer (on CUDA the kernels' entry points take the references for fake tensors,
kernels/__init__.py; a Triton launch read the pointer, which PyTorch warns of and will refuse)."""

import warnings

import pytest
import torch
from f8utils import DEVICE, SwiGLU, skip_rowwise_without_cpu_gemm
from torch import nn

from f8tensor import Float8Config, RMSNorm, convert_to_float8_training, fuse_model_ops
from f8tensor.core import weight_amax


def build(recipe):
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # made in place: under FakeTensorMode .to() cannot swap parameters
    try:
        with torch.device(DEVICE):
            model = nn.Sequential(nn.Linear(256, 512), nn.RMSNorm(512), nn.Linear(512, 256, bias=False),
                                  SwiGLU(256, 512))
    finally:
        torch.set_default_dtype(default)
    config = Float8Config.from_recipe_name(recipe)
    if recipe == "blockwise" and DEVICE.type == "cpu":  # CPU's _scaled_mm has no blockwise scaling
        config = config.replace(emulate=True)
    convert_to_float8_training(model, module_filter_fn=lambda mod, fqn: True, config=config)
    fuse_model_ops(model)
    assert type(model[1]) is RMSNorm
    return model


def step(model):
    x = torch.randn(2, 128, 256, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    out = model(x)
    out.float().square().mean().backward()
    return [(t.shape, t.dtype) for t in [out, x.grad] + [p.grad for p in model.parameters()]]


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise", "blockwise"])
def test_a_step_on_fake_tensors_runs_and_gives_the_real_steps_shapes(recipe):
    skip_rowwise_without_cpu_gemm(recipe, DEVICE.type)
    want = step(build(recipe))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "Accessing the data pointer of FakeTensor is deprecated"
        with torch._subclasses.fake_tensor.FakeTensorMode():
            model = build(recipe)
            got = step(model)
    assert got == want
    assert all(weight_amax.ATTR not in p.__dict__ for p in model.parameters())  # no amax of fake values kept
