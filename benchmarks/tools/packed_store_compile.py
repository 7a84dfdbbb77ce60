"""How Triton compiles the blockwise cast's word (packed) column store for sm_90, with and without
M's divisibility by 16, at the shapes the GPU found it wrong or exact (docs/benchmarks.md,
"Blockwise scaling"). No GPU needed:

    python benchmarks/tools/packed_store_compile.py

Per case, `block_kernel` (M's divisibility by 16 known where M has it) and `block_kernel_m_unaligned`
(never known; kernels/blockwise.py launches it for the masked word store, tiles not whole): the
blocked layouts' sizePerThread in the TTGIR, and the PTX's ldmatrix instructions and 32-bit global
stores (vector `st.global.v4.b32`, scalar `st.global.b32`).
"""

import re

import torch

from sm90_compile import compile_sm90
from f8tensor.kernels.blockwise import (BLOCK, COL_STRIPS_BLOCK_N, COL_STRIPS_SUB_N, COL_VEC, COLUMNS_FIRST, LOADS_AHEAD,
                                        LOADS_AHEAD_MAX_REGISTERS, SUB_M, SUB_N, _default_warps,
                                        block_kernel, block_kernel_m_unaligned)
from f8tensor.kernels.rowwise import _format

# (M, N, input dtype, column strips alone, what the GPU gave with M's divisibility known: for the kernel before
# 7bf23ff, whose word store packed through Triton's own cast; not rerun on a GPU since for the specialized compile,
# which is launched only for whole tiles)
CASES = [(256, 300, torch.bfloat16, False, "wrong"), (4096, 4100, torch.bfloat16, False, "wrong"),
         (256, 272, torch.float32, True, "wrong"), (132, 300, torch.bfloat16, False, "exact (M not a multiple of 16)"),
         (256, 272, torch.bfloat16, True, "exact"), (256, 256, torch.float32, True, "exact (whole tiles)")]


KERNELS = {"block_kernel": block_kernel, "block_kernel_m_unaligned": block_kernel_m_unaligned}
PTX_COUNTS = {"ldmatrix": r"ldmatrix", "st.global.v4.b32": r"st\.global[.\w]*\.v4\.b32",
              "st.global.b32": r"st\.global[.\w]*\.b32 "}


def compiled_word_store(kernel, M: int, N: int, dtype: torch.dtype, col_alone: bool):
    x = torch.empty(M, N, dtype=dtype)
    row = torch.empty(M, N, dtype=torch.float8_e4m3fn)
    words = torch.empty(N, M // 4, dtype=torch.int32)
    scale = torch.empty(M * N // 16, dtype=torch.float32)
    block_n = COL_STRIPS_BLOCK_N if col_alone else BLOCK
    even = M % BLOCK == 0 and N % block_n == 0
    ahead = LOADS_AHEAD and not col_alone  # compiled as block_cast_triton launches it by default
    return compile_sm90(
        kernel, (x, row, scale, words, scale, M, N, N, 1), _default_warps(False, not col_alone, True, block_n=block_n),
        maxnreg=LOADS_AHEAD_MAX_REGISTERS if ahead else None,
        **_format(torch.float8_e4m3fn, False, False, x), SQUARE=False, WRITE_ROW=not col_alone, WRITE_COL=True,
        BLOCK_M=BLOCK, BLOCK_N=block_n, SUB_M=SUB_M, SUB_N=min(COL_STRIPS_SUB_N, block_n) if col_alone else SUB_N,
        EVEN=even, OFFSETS_32=True, PACKED=True, COL_VEC=COL_VEC, LOADS_AHEAD=ahead, COLUMNS_FIRST=COLUMNS_FIRST and ahead)


def main():
    for M, N, dtype, col_alone, gpu in CASES:
        for name, kernel in KERNELS.items():
            asm = compiled_word_store(kernel, M, N, dtype, col_alone).asm
            layouts = sorted(set(re.findall(r"sizePerThread = \[([\d, ]+)\]", asm["ttgir"])))
            ptx = asm["ptx"]
            counts = {what: len(re.findall(pattern, ptx)) for what, pattern in PTX_COUNTS.items()}
            print(f"{M} x {N} {str(dtype).removeprefix('torch.')} {'col alone' if col_alone else 'both'}, "
                  f"{name} (GPU, block_kernel: {gpu}): "
                  f"sizePerThread {layouts}, {counts}", flush=True)


if __name__ == "__main__":
    main()
