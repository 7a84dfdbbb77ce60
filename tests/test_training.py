"""Training runs: a converted MLP and a converted small transformer learn in step with bf16."""

import copy
import json

import pytest
import torch
from f8utils import DEVICE
from torch import nn

from f8tensor import Float8Linear, convert_to_float8_training
from f8tensor.demo import main as demo_main


def train_mlp(model, steps=150):
    g = torch.Generator().manual_seed(1)
    teacher = torch.randn(64, 16, generator=g)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        x = torch.randn(256, 64, generator=g)
        y = torch.tanh(x @ teacher)
        x, y = x.to(DEVICE, torch.bfloat16), y.to(DEVICE)
        loss = nn.functional.mse_loss(model(x).float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_two_layer_mlp_trains_like_bf16():
    torch.manual_seed(0)
    bf16 = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 16)).to(DEVICE, torch.bfloat16)
    fp8 = convert_to_float8_training(copy.deepcopy(bf16), module_filter_fn=lambda mod, fqn: True)
    assert all(isinstance(m, Float8Linear) for m in (fp8[0], fp8[2]))
    ref, got = train_mlp(bf16), train_mlp(fp8)
    tail = lambda losses: sum(losses[-20:]) / 20  # noqa: E731
    assert tail(got) < 0.4 * got[0]  # it learns (bf16 reaches 0.30 of its first loss here)
    assert abs(tail(got) - tail(ref)) < 0.15 * tail(ref)  # in step with bf16
    for a, b in zip(ref[::25], got[::25]):  # along the whole curve, not only at the end
        assert abs(a - b) < 0.2 * a


def test_small_transformer_trains_like_bf16(tmp_path):
    path = tmp_path / "run.json"
    out = demo_main(["--steps", "40", "--dim", "64", "--layers", "2", "--heads", "4", "--seq", "64",
                     "--batch", "8", "--lr", "4e-3", "--device", DEVICE.type, "--eval-every", "15",
                     "--out", str(path)])
    bf16, fp8 = out["bf16"], out["fp8"]
    saved = json.loads(path.read_text())
    assert saved["fp8"]["losses"] == fp8["losses"] and saved["environment"]["params"] > 0
    assert [step for step, _ in saved["bf16"]["val_curve"]] == [15, 30, 40]
    assert saved["fp8"]["val_curve"][-1][1] == fp8["val_loss"]
    assert fp8["losses"][-1] < 0.7 * fp8["losses"][0]
    assert abs(fp8["val_loss"] - bf16["val_loss"]) < 0.03 * bf16["val_loss"]
    for a, b in zip(bf16["losses"][::5], fp8["losses"][::5]):
        assert abs(a - b) < 0.05 * a


@pytest.mark.parametrize("recipe", ["rowwise", "rowwise_with_gw_hp", "blockwise"])
def test_small_transformer_trains_like_bf16_under_finer_recipes(recipe):
    out = demo_main(["--steps", "40", "--dim", "64", "--layers", "2", "--heads", "4", "--seq", "64",
                     "--batch", "8", "--lr", "4e-3", "--device", DEVICE.type, "--recipe", recipe])
    bf16, fp8 = out["bf16"], out["fp8"]
    assert fp8["losses"][-1] < 0.7 * fp8["losses"][0]
    assert abs(fp8["val_loss"] - bf16["val_loss"]) < 0.03 * bf16["val_loss"]
    for a, b in zip(bf16["losses"][::5], fp8["losses"][::5]):
        assert abs(a - b) < 0.05 * a


def test_demo_options_fuse_bf16_and_refusals(capsys):
    """--fuse-bf16 fuses the bf16 run too (the comparison is then of float8 alone, and says so);
    sizes below 1 and a float8 run that cannot train are refused before anything trains."""
    demo_main(["--steps", "2", "--dim", "32", "--layers", "1", "--heads", "2", "--seq", "16", "--batch", "2",
               "--device", DEVICE.type, "--fuse-bf16"])
    assert "bf16: the same fused norms and gates (--fuse-bf16)" in capsys.readouterr().out
    for bad in (["--heads", "0"], ["--batch", "0"], ["--recipe", "nonsense"]):
        with pytest.raises(SystemExit):
            demo_main(["--steps", "2", "--device", DEVICE.type, *bad])


@pytest.mark.parametrize("device, current", [("cuda", None), ("cuda:1", torch.device("cuda:1"))])
def test_demo_makes_an_indexed_cuda_device_current(device, current, monkeypatch):
    """--device cuda:N becomes the current device (CapturedStep's stream and graph are its); plain
    --device cuda, the README's, is the current device already and is not handed to set_device,
    which refuses a device without an index."""
    from f8tensor.demo import run

    made_current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", made_current.append)
    monkeypatch.setattr(run, "float8_reason", lambda args: None)  # no CUDA layer runs on a CPU machine
    assert run.parse_args(["--device", device]).device == device
    assert made_current == ([] if current is None else [current])
