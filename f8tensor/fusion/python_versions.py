"""The Python versions whose bytecode the proofs (gate, RoPE, norm) were written and tested for.

The proofs (gate_proof.py, rope_proof.py, norm_proof.py) accept code instruction by instruction against
lists of opcodes. Each Python release renames, splits or adds opcodes (3.11 CALL, 3.12
LOAD_FAST_CHECK, 3.13 LOAD_FAST_LOAD_FAST and CALL_KW, 3.14 LOAD_FAST_BORROW and LOAD_SMALL_INT),
so a version the lists were not written for would reject every forward and fusion would quietly
do nothing. On such a version the proofs are not attempted: `fuse_model_ops` warns once
(FusionWarning), reports every gate, RoPE and norm candidate as not fused with the reason, and
raises in strict mode. The swap of nn.RMSNorm modules reads no bytecode and runs on every version.
"""

import sys
import warnings

# (major, minor) of each version the fusion tests passed on (docs/design.md lists the runs).
CHECKED_VERSIONS = ((3, 10), (3, 11), (3, 12), (3, 13))


class FusionWarning(UserWarning):
    """A fusion that fuse_model_ops was asked for cannot run here."""


# Whether this process has warned about its Python version (state.py lists it).
warned = [False]


def unsupported_reason(version: tuple = None) -> str | None:
    """Why the bytecode proofs cannot run on this Python (or `version`), or None where they can."""
    major, minor = (version or sys.version_info)[:2]
    if (major, minor) in CHECKED_VERSIONS:
        return None
    checked = ", ".join(f"{a}.{b}" for a, b in CHECKED_VERSIONS)
    return (f"the gate, RoPE and norm proofs read Python bytecode and were checked on Python {checked}; "
            f"this is Python {major}.{minor}, whose opcodes they were not written for")


def warn_once(reason: str) -> None:
    """Warn, once per process, that the fusions by proof do not run on this Python."""
    if warned[0]:
        return
    warned[0] = True
    warnings.warn(f"f8tensor.fuse_model_ops: the fusions by proof (SwiGLU gate, RoPE, norms other than "
                  f"nn.RMSNorm) are off: {reason}. The model runs as written (correct, slower in eager "
                  "mode); use a checked Python version for the fused speed, or write f8tensor.swiglu / "
                  "f8tensor.rope into the model code.", FusionWarning, stacklevel=3)
