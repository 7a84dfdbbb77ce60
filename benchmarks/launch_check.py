"""GPU check of the direct relaunch (kernels/launch.py, plans in kernels/quantize.py): bit-exact
vs Triton's own launch path on every case, and host time per call.

    python benchmarks/launch_check.py       # rerun after any Triton upgrade
"""
import importlib
import time

import torch
import triton

Q = importlib.import_module("f8tensor.kernels.quantize")
quantize_triton = Q.quantize_triton
assert torch.cuda.is_available() and Q.relaunch_possible()
_possible = Q.relaunch_possible
replays = {"n": 0}
_call = Q._Plan.__call__
def counted(self, *a):
    replays["n"] += 1
    return _call(self, *a)
Q._Plan.__call__ = counted

def set_fast(on):
    Q.relaunch_possible = _possible if on else (lambda: False)

def bits(t):
    return None if t is None else t.view(torch.uint8 if t.element_size() == 1 else torch.int32).clone()

def same(a, b):
    return all((x is None and y is None) or (x is not None and y is not None and x.shape == y.shape
               and x.stride() == y.stride() and torch.equal(x, y)) for x, y in zip(a, b))

def run(x, f8, layout, p2, mode):
    out = quantize_triton(x, f8, layout, p2, amax_mode=mode)
    torch.cuda.synchronize()
    return tuple(bits(t) for t in out)

def check(x, label, f8=torch.float8_e4m3fn, layout="both", p2=False, mode="staged"):
    set_fast(False); ref = run(x, f8, layout, p2, mode)  # Triton's launch path
    set_fast(True); first = run(x, f8, layout, p2, mode)  # records a plan (or replays one)
    n = replays["n"]; second = run(x, f8, layout, p2, mode)  # must replay
    ok = same(ref, first) and same(ref, second) and replays["n"] == n + 1
    print(f"{'OK ' if ok else 'BAD'} {label}")
    assert ok, label

dev = "cuda"
torch.manual_seed(0)
def rnd(shape, dt, scale=3.0):
    return (torch.randn(shape, device=dev, dtype=torch.float32) * scale).to(dt)

# (a) bit-exact: shapes incl. ints == 1 and not multiples of 16, all dtypes/formats/layouts.
shapes = [(1, 16), (17, 48), (64, 1), (1, 1), (128, 256), (144, 272), (1000, 1000), (333, 4097), (4096, 4096)]
for dt in (torch.bfloat16, torch.float16, torch.float32):
    for shape in shapes:
        for f8 in (torch.float8_e4m3fn, torch.float8_e5m2):
            for layout in ("row", "col", "both"):
                check(rnd(shape, dt), f"{dt} {shape} {f8} {layout}", f8, layout)
        check(rnd(shape, dt), f"{dt} {shape} power_of_2 atomic", p2=True, mode="atomic")
        check(rnd(shape, dt).t(), f"{dt} {shape} column-major input")
        # Misaligned data pointer: a flat buffer offset by one element, reshaped.
        M, N = shape
        buf = rnd(M * N + 1, dt)
        check(buf[1:].view(M, N), f"{dt} {shape} misaligned x (data_ptr % 16 = {buf[1:].data_ptr() % 16})")
        # Same shape class, other values: a hit that reuses a kernel compiled for another shape.
        check(rnd((M + 16, N + 32), dt), f"{dt} {(M + 16, N + 32)} (other values)")
# A given amax record (Float8Linear's weight in backward): only the cast is replayed.
for shape in [(17, 48), (1000, 1000), (4096, 4096)]:
    x = rnd(shape, torch.bfloat16)
    record = Q.quantize_with_amax(x * 3, torch.float8_e4m3fn)[3]
    outs = []
    for fast in (False, True, True):
        set_fast(fast)
        outs.append(tuple(bits(t) for t in Q.quantize_with_amax(x, torch.float8_e4m3fn, "both", amax=record)[:3]))
    ok = same(outs[0], outs[1]) and same(outs[0], outs[2])
    print(f"{'OK ' if ok else 'BAD'} {shape} with a given amax record")
    assert ok
# Non-finite inputs.
x = rnd((64, 128), torch.bfloat16); x[3, 5] = float("inf"); check(x, "inf")
x = rnd((64, 128), torch.bfloat16); x[7, 9] = float("nan"); check(x, "nan")
# Alternating shapes: each launch must pick the kernel for ITS key, not the last one used.
for i in range(4):
    for shape in [(1, 16), (17, 48), (128, 256), (64, 1)]:
        check(rnd(shape, torch.bfloat16), f"alternating {shape} round {i}")

# An int argument beyond int32 (triton switches that arg to i64): row stride 2**31 + 16 / + 17.
for extra in (16, 17):
    try:
        big = torch.empty((2, 2**31 + extra), device=dev, dtype=torch.bfloat16)
        big[:, :192].copy_(rnd((2, 192), torch.bfloat16))
        check(big[:, :192], f"stride(0) = 2**31 + {extra} (i64 int arg)")
        del big
    except torch.OutOfMemoryError:
        print("skip i64-stride case: out of memory")
    torch.cuda.empty_cache()
# More than 2**31 elements (4.3 GB bf16 input).
try:
    x = rnd((65536 + 64, 32768 + 128), torch.bfloat16, 1.0)
    check(x, f"{tuple(x.shape)}: {x.numel()} > 2**31 elements")
    del x
except torch.OutOfMemoryError:
    print("skip > 2**31 elements case: out of memory")
torch.cuda.empty_cache()

# A launch_enter_hook must force the plain path (and be called).
seen = []
hook = lambda md: seen.append(md)
triton.knobs.runtime.launch_enter_hook.add(hook)
x = rnd((128, 256), torch.bfloat16)
n0 = replays["n"]; quantize_triton(x, torch.float8_e4m3fn, "both"); torch.cuda.synchronize()
triton.knobs.runtime.launch_enter_hook.remove(hook)
assert replays["n"] == n0 and len(seen) == 2, (replays["n"] - n0, len(seen))
print("OK  launch_enter_hook set -> plain path, hook called")

# Second GPU, if any: the key includes the current device.
if torch.cuda.device_count() > 1:
    with torch.cuda.device(1):
        dev = "cuda:1"
        for shape in [(17, 48), (128, 256)]:
            check(rnd(shape, torch.bfloat16), f"cuda:1 {shape}")
    dev = "cuda"
print("plans:", len(Q._PLANS), "replays:", replays["n"])
Q._Plan.__call__ = _call

# (b) host time per call, GPU work kept tiny so the host is the bottleneck.
def host_us(fn, n=2000):
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()  # before the sync: host time only
    torch.cuda.synchronize()
    return (t1 - t0) / n * 1e6

x = rnd((256, 512), torch.bfloat16)
for layout in ("row", "both"):
    fn = lambda: quantize_triton(x, torch.float8_e4m3fn, layout)
    set_fast(False); plain = host_us(fn)
    set_fast(True); fast = host_us(fn)
    set_fast(False); plain2 = host_us(fn)
    set_fast(True); fast2 = host_us(fn)
    print(f"quantize_triton(x, e4m3, {layout!r}):  Triton launch path {min(plain, plain2):6.1f} us   "
          f"replayed plan {min(fast, fast2):6.1f} us per call (host)")
print("all checks passed")
