"""A Triton kernel's resources on sm_90 (H100 / H200), compiled on a machine without a GPU.

    python benchmarks/tools/sm90_compile.py    (the blockwise casts as block_cast_triton launches them, and candidates:
                                                the sweep's, the both-layouts word store's col_vec / loads_ahead)

`sm90_resources(kernel, args, num_warps, **constexprs)` compiles `kernel` for compute capability
9.0 with the installed Triton and its bundled ptxas, the arguments specialized as Triton 3.6
specializes them at a launch (a tensor: its element type, and its data pointer 16-byte aligned; an
int: 1 becomes a constant, a multiple of 16 is marked divisible by 16, i32 or i64 by range), and
returns what decides a memory-bound kernel's occupancy: registers per thread, local-memory spills,
shared memory, and how many programs of it fit one SM by each; and the SASS instructions per warp
(`instructions`; `rcp`, the reciprocals each fp32 division starts from), what it issues. It also counts the PTX's
asynchronous copies (`cp.async`, Triton's software pipelining of loads into shared memory) and
tensor-memory-accelerator copies (`cp.async.bulk.tensor`), which show whether a `tl.range(...,
num_stages=)` loop was pipelined.

What it cannot give is time: these numbers screen variants before a GPU run, they do not replace it
(docs/benchmarks.md, "Blockwise scaling", compares them with what the GPU reported).
"""

import collections
import os
import re
import subprocess
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
# Triton's names for the element types of the pointers our kernels take.
_POINTER = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32", torch.uint8: "*u8",
            torch.int32: "*i32", torch.int64: "*i64", torch.float8_e4m3fn: "*fp8e4nv", torch.float8_e5m2: "*fp8e5"}
# sm_90 limits per SM: registers, shared memory for programs (bytes), resident warps and programs.
SM90_REGISTERS, SM90_SHARED, SM90_WARPS, SM90_PROGRAMS = 65536, 227 * 1024, 64, 32


def _specialize(name: str, value):
    """(signature entry, constant or None, divisible by 16) of one runtime argument, as Triton 3.6's
    launch specializes it."""
    if isinstance(value, torch.Tensor):
        if value.dtype not in _POINTER:
            raise TypeError(f"sm90_resources: argument {name} has dtype {value.dtype}, not one of {list(_POINTER)}")
        return _POINTER[value.dtype], None, value.data_ptr() % 16 == 0
    if type(value).__name__ == "TensorDescriptor":  # made on the host: its element type and block shape
        from triton.runtime.jit import mangle_type
        return mangle_type(value), None, False
    if isinstance(value, bool):
        return "i1", None, False
    if isinstance(value, int):
        if value == 1:
            return "constexpr", 1, False
        return ("i32" if -2 ** 31 <= value < 2 ** 31 else "i64"), None, value % 16 == 0
    if isinstance(value, float):
        return "fp32", None, False
    raise TypeError(f"sm90_resources: argument {name} is a {type(value).__name__}; pass tensors, tensor "
                    "descriptors, ints, floats")


def compile_sm90(kernel, args: tuple, num_warps: int, num_stages: int = 3, maxnreg: int | None = None,
                 **constexprs):
    """`kernel(*args, **constexprs)` compiled for sm_90 as a launch would specialize it (the
    module docstring; parameters the kernel's `triton.jit` exempts, do_not_specialize or
    do_not_specialize_on_alignment, are not marked divisible by 16). `args` are the runtime
    arguments in signature order (tensors may be on the CPU: only their dtype and alignment count);
    maxnreg, Triton's cap on registers per thread (None: ptxas chooses). Triton's compiled kernel: its `asm` holds the TTGIR, PTX and cubin."""
    unaligned = {p.name for p in kernel.params if p.do_not_specialize or p.do_not_specialize_on_alignment}
    names = list(kernel.arg_names)
    runtime = names[:len(args)]
    defaults = {p.name for p in kernel.params if p.has_default}
    missing = [n for n in names[len(args):] if n not in constexprs and n not in defaults]
    if missing:
        raise TypeError(f"compile_sm90: no value for {missing}")
    signature, constants, attrs = {}, dict(constexprs), {}
    for name, value in zip(runtime, args):
        entry, constant, divisible = _specialize(name, value)
        signature[name] = entry
        if constant is not None:
            constants[name] = constant
        if divisible and name not in unaligned:
            attrs[(names.index(name),)] = [["tt.divisibility", 16]]
    for name in names[len(args):]:
        signature[name] = "constexpr"
    src = ASTSource(kernel, signature, constexprs={(names.index(k),): v for k, v in constants.items()},
                    attrs=attrs)
    options = dict(num_warps=num_warps, num_stages=num_stages, **({} if maxnreg is None else dict(maxnreg=maxnreg)))
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def sm90_resources(kernel, args: tuple, num_warps: int, num_stages: int = 3, maxnreg: int | None = None,
                   **constexprs) -> dict:
    """Registers, spills and shared memory of `kernel(*args, **constexprs)` compiled for sm_90,
    and the programs per SM each allows; see the module docstring and `compile_sm90`."""
    compiled = compile_sm90(kernel, args, num_warps, num_stages, maxnreg, **constexprs)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = subprocess.run([os.path.join(_BIN, "cuobjdump"), "-res-usage", path], capture_output=True,
                               text=True, check=True).stdout
        sass = subprocess.run([os.path.join(_BIN, "cuobjdump"), "-sass", path], capture_output=True,
                              text=True, check=True).stdout
    opcodes = _opcodes(sass)
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    regs, local = int(fields["REG"]), int(fields["LOCAL"])
    shared = compiled.metadata.shared + int(fields["SHARED"])
    ptx = compiled.asm["ptx"]
    # Registers are allocated per warp in units of 256: regs rounded up to a multiple of 8.
    regs_per_warp = -(-regs * 32 // 256) * 256
    by_regs = SM90_REGISTERS // (regs_per_warp * num_warps)
    by_shared = SM90_SHARED // shared if shared else SM90_PROGRAMS
    programs = min(by_regs, by_shared, SM90_WARPS // num_warps, SM90_PROGRAMS)
    return dict(regs=regs, spill_bytes=local, stack=int(fields["STACK"]), shared=shared,
                programs_by_regs=by_regs, programs_by_shared=by_shared, programs_per_sm=programs,
                warps_per_sm=programs * num_warps,
                cp_async=len(re.findall(r"\bcp\.async\.(?:ca|cg)\.shared", ptx)),
                tma=len(re.findall(r"\bcp\.async\.bulk\.tensor", ptx)),
                instructions=sum(opcodes.values()), rcp=opcodes["MUFU.RCP"])


def _opcodes(sass: str) -> collections.Counter:
    """SASS opcodes (with their first modifier: MUFU.RCP, not MUFU) of cuobjdump -sass output, each
    instruction line once. The kernels timed here are unrolled (tl.static_range), so per program
    this is the count executed, less branches not taken."""
    ops = collections.Counter()
    for line in sass.splitlines():
        m = re.match(r"\s+/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Z0-9_]+)?)", line)
        if m:
            ops[m.group(1)] += 1
    return ops


def main():
    from f8tensor.kernels.blockwise import (BLOCK, COL_STRIPS_BLOCK_N, COL_STRIPS_SUB_N, COL_VEC, COLUMNS_FIRST, LOADS_AHEAD,
                                            LOADS_AHEAD_MAX_REGISTERS, PACKED_COLUMNS, SUB_M, SUB_N,
                                            _default_warps, block_kernel)
    from f8tensor.kernels.rowwise import _format

    M, N = 16384, 4096
    x = torch.empty(M, N, dtype=torch.bfloat16)
    row = torch.empty(M, N, dtype=torch.float8_e4m3fn)
    col_bytes, col_words = torch.empty(N, M, dtype=torch.uint8), torch.empty(N, M // 4, dtype=torch.int32)
    scale = torch.empty(M * N // BLOCK, dtype=torch.float32)
    fmt = _format(torch.float8_e4m3fn, False, False, x)
    packed = PACKED_COLUMNS
    # name: (write_row, write_col, square, sub_m, sub_n, even, offsets_32, packed, num_warps | None)
    cases = {
        "act_both": (True, True, False, SUB_M, SUB_N, packed, packed, packed, None),
        "act_col": (False, True, False, SUB_M, min(COL_STRIPS_SUB_N, COL_STRIPS_BLOCK_N), True, True, packed, None),
        "weight_row": (True, False, True, BLOCK, BLOCK, False, False, False, None),
        "weight_col": (False, True, True, BLOCK, BLOCK, False, False, False, None),
        # the column strips' bytes stored four rows to a word, or one by one: whichever is not the default
        f"act_both {'bytes' if packed else 'packed'}": (True, True, False, SUB_M, SUB_N, not packed, not packed,
                                                        not packed, None),
        f"act_col {'bytes' if packed else 'packed'}": (False, True, False, SUB_M, min(COL_STRIPS_SUB_N, COL_STRIPS_BLOCK_N),
                                                       True, True, not packed, None),
        # candidates (benchmarks/kernels_blockwise.py --sweep)
        "act_col block_n=32": (False, True, False, SUB_M, 32, True, True, packed, 2),
        "act_col block_n=128": (False, True, False, SUB_M, 128, True, True, packed, 4),
    }
    # the both-layouts word store's own options (col_vec, loads_ahead) at 4 and 8 warps, registers as ptxas
    # chooses; loads_ahead with registers capped (max_registers) for more programs per SM
    both_options = {f"act_both col_vec={vec}{' loads_ahead' if ahead else ''} w{warps}": (vec, ahead, warps, None)
                    for warps in (4, 8) for ahead in (False, True) for vec in (4, 2)}
    both_options |= {f"act_both loads_ahead w{warps} max_registers={cap}": (COL_VEC, True, warps, cap)
                     for warps, cap in ((4, 128), (8, 80), (8, 64))}
    for name in both_options:
        cases[name] = (True, True, False, SUB_M, SUB_N, True, True, True, both_options[name][2])
    for name, (write_row, write_col, square, sub_m, sub_n, even, off32, words, warps) in cases.items():
        col_alone = write_col and not write_row and not square
        block_n = (sub_n if "block_n" in name else COL_STRIPS_BLOCK_N) if col_alone else BLOCK  # one slice per program
        warps = warps or _default_warps(square, write_row, write_col, block_n=block_n)
        ahead = (both_options[name][1] if name in both_options
                 else LOADS_AHEAD and write_row and words and sub_m == sub_n == 64)
        cap = (both_options[name][3] if name in both_options  # as launched by default otherwise
               else LOADS_AHEAD_MAX_REGISTERS if ahead else None)
        res = sm90_resources(block_kernel, (x, row, scale, col_words if words else col_bytes, scale, M, N, N, 1),
                             warps, maxnreg=cap, **fmt, SQUARE=square, WRITE_ROW=write_row, WRITE_COL=write_col, BLOCK_M=BLOCK,
                             BLOCK_N=block_n, SUB_M=sub_m, SUB_N=sub_n, EVEN=even, OFFSETS_32=off32, PACKED=words,
                             COL_VEC=both_options[name][0] if name in both_options else COL_VEC,
                             LOADS_AHEAD=ahead, COLUMNS_FIRST=COLUMNS_FIRST and ahead and name not in both_options)
        print(f"{name:<28} {warps:>2} warps {res}", flush=True)


if __name__ == "__main__":
    main()
