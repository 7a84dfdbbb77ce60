#!/usr/bin/env bash
# GPU call 14: blockwise probe (ragged sizes), kernels (sliced tiles), linear.
export TORCHINDUCTOR_COMPILE_THREADS=1 F8TENSOR_COMMIT=a57e493
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl > $OUT/install.log 2>&1 && export PYTHONPATH=/tmp/site || { cat $OUT/install.log; exit 1; }
python3 -m pip install -q --no-build-isolation --no-deps --no-index -e . >> $OUT/install.log 2>&1 || { cat $OUT/install.log; exit 1; }
t() { echo "== $1 rc=$2 $(( $(date +%s) - start )) s"; }
start=$(date +%s)
timeout 60 python3 benchmarks/tools/scaled_mm_support.py > $OUT/scaled_mm_support.txt 2>&1; t probe $?
grep "1x128 x 128x128: _scaled_mm \[" $OUT/scaled_mm_support.txt | cut -c1-60,100-180
start=$(date +%s)
timeout 130 python3 benchmarks/kernels_blockwise.py --sweep --shapes 16384x4096 16384x14336 --out $OUT/kernels_blockwise.jsonl > $OUT/kernels_blockwise.log 2>&1; t kernels $?
grep -v "^{" $OUT/kernels_blockwise.log | grep -v Warning | cut -c1-330
start=$(date +%s)
timeout 330 python3 benchmarks/linear.py --recipe blockwise --models llama3-8b --shapes 4096x14336 14336x4096 4096x4096 --m 16384 --rounds 2 --out $OUT/linear_blockwise.jsonl > $OUT/linear_blockwise.log 2>&1; t linear $?
grep -v "^{" $OUT/linear_blockwise.log | grep -v Warning | cut -c1-250 | tail -8
