#!/usr/bin/env bash
# GPU call 9 (session 2026-12-03, third): host overhead with the GEMM floors.
export F8TENSOR_COMMIT=${F8TENSOR_COMMIT:?}
python3 -m pip install -q --no-build-isolation --no-deps --no-index -e . > $OUT/install.log 2>&1 || { cat $OUT/install.log; exit 1; }
for i in 1 2; do timeout 60 python3 benchmarks/host_overhead.py; echo; done
