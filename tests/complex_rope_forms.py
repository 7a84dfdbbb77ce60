"""Rotary functions in the complex form for tests/test_rope_complex.py, our own code in the style of
Meta's Llama 3 and torchtitan (asserts included: this module is not rewritten by pytest, as a
model's code is not), and look-alikes that must not be fused."""

import torch
from torch import nn

B, S, H, KV, HEAD = 2, 16, 4, 2, 16
SCALE = 1.0


# --- the written forms (our own code, in the style of Meta's and torchtitan's) -------------------

def broadcast_table(freqs, x):
    """freqs [>= S, D/2] sliced to x's S and viewed to broadcast over x [B, S, H, D/2]."""
    ndim = x.ndim
    assert ndim > 1
    freqs = freqs[: x.shape[1]]
    assert freqs.shape == (x.shape[1], x.shape[-1])
    return freqs.view(*[n if i in (1, ndim - 1) else 1 for i, n in enumerate(x.shape)])


def rotate_pairs(q, k, freqs):
    qc = torch.view_as_complex(q.float().reshape(*q.shape[:-1], -1, 2))
    kc = torch.view_as_complex(k.float().reshape(*k.shape[:-1], -1, 2))
    f = broadcast_table(freqs, qc)
    return torch.view_as_real(qc * f).flatten(3).type_as(q), torch.view_as_real(kc * f).flatten(3).type_as(k)


def rotate_one(x, freqs):
    """One tensor; freqs already [S, 1, D/2]; the table first in the product; .to instead of type_as."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(freqs * xc).flatten(-2).to(x.dtype)


def rotate_returned_twice(x, freqs):  # one rotation, one tensor returned twice
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    out = torch.view_as_real(xc * freqs).flatten(-2).type_as(x)
    return out, out


def deepseek_v2_apply_rotary_emb(xq, xk, freqs_cis):  # DeepSeek-V2's (transformers 5.24), verbatim
    xq_ = torch.view_as_complex(xq.float().reshape(*xq.shape[:-1], -1, 2))
    xk_ = torch.view_as_complex(xk.float().reshape(*xk.shape[:-1], -1, 2))

    # Broadcast to [1, 1, seq_len, dim // 2]
    freqs_cis = freqs_cis.unsqueeze(1).to(xq_.device)

    xq_out = torch.view_as_real(xq_ * freqs_cis).flatten(3).type_as(xq)
    xk_out = torch.view_as_real(xk_ * freqs_cis).flatten(3).type_as(xk)
    return xq_out, xk_out


# --- look-alikes ---------------------------------------------------------------------------------

def rotate_conjugate(x, freqs):  # reads .conj: not in the walk's attributes
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * freqs.conj()).flatten(-2).type_as(x)


def rotate_scaled(x, freqs):  # reads a global that is not a function
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return (torch.view_as_real(xc * freqs).flatten(-2) * SCALE).type_as(x)


def rotate_marked(x, freqs):  # writes an attribute
    x.rotated = True
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * freqs).flatten(-2).type_as(x)


def rotate_and_add(x, freqs):  # passes the walk; its trace is not a rotation alone
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * freqs + xc).flatten(-2).type_as(x)


class PairAttention(nn.Module):
    def __init__(self, dim=H * HEAD):
        super().__init__()
        self.wq = nn.Linear(dim, H * HEAD, bias=False)
        self.wk = nn.Linear(dim, KV * HEAD, bias=False)

    def forward(self, x, freqs_cis):
        b, s, _ = x.shape
        q, k = self.wq(x).view(b, s, -1, HEAD), self.wk(x).view(b, s, -1, HEAD)
        q, k = rotate_pairs(q, k, freqs_cis)
        return torch.cat([q.flatten(2), k.flatten(2)], dim=-1)


class DeepSeekAttention(PairAttention):
    """q and k [B, heads, S, D] (transposed, contiguous, as DeepSeek-V2's rotary part is), the table
    [B, S, D/2] per sequence."""

    def forward(self, x, freqs_cis):
        b, s, _ = x.shape
        q = self.wq(x).view(b, s, -1, HEAD).transpose(1, 2).contiguous()
        k = self.wk(x).view(b, s, -1, HEAD).transpose(1, 2).contiguous()
        q, k = deepseek_v2_apply_rotary_emb(q, k, freqs_cis.expand(b, *freqs_cis.shape[-2:]))
        return torch.cat([q.transpose(1, 2).flatten(2), k.transpose(1, 2).flatten(2)], dim=-1)


def one_tensor_class(fn):
    namespace = {"fn": fn, "HEAD": HEAD}
    exec(f"def forward(self, x, freqs_cis):\n"
         f"    b, s, _ = x.shape\n"
         f"    return {fn.__name__}(self.wq(x).view(b, s, -1, HEAD), freqs_cis).flatten(2)\n",
         {**globals(), **namespace}, namespace)
    return type("OneAttention", (PairAttention,), {"forward": namespace["forward"]})




def rotate_to_list(q, k, freqs):  # returns a list
    qc = torch.view_as_complex(q.float().reshape(*q.shape[:-1], -1, 2))
    kc = torch.view_as_complex(k.float().reshape(*k.shape[:-1], -1, 2))
    return [torch.view_as_real(qc * freqs).flatten(3).type_as(q), torch.view_as_real(kc * freqs).flatten(3).type_as(k)]
