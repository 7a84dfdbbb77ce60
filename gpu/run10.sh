#!/usr/bin/env bash
# GPU call 10 (session 2026-12-03, fourth): rowwise kernels and GEMMs on the H200.
export TORCHINDUCTOR_COMPILE_THREADS=1 F8TENSOR_COMMIT=${F8TENSOR_COMMIT:?}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl > $OUT/install.log 2>&1 && export PYTHONPATH=/tmp/site || { cat $OUT/install.log; exit 1; }
python3 -m pip install -q --no-build-isolation --no-deps --no-index -e . >> $OUT/install.log 2>&1 || { cat $OUT/install.log; exit 1; }
nvidia-smi --query-gpu=name,driver_version --format=csv > $OUT/gpu.txt
timeout 60 python3 benchmarks/tools/scaled_mm_support.py > $OUT/scaled_mm_support.txt 2>&1; echo "probe rc=$?"
grep rowwise $OUT/scaled_mm_support.txt
start=$(date +%s)
timeout 200 python3 -m pytest tests/test_rowwise.py -q -x -p no:cacheprovider > $OUT/test_rowwise.txt 2>&1; echo "tests rc=$? $(( $(date +%s) - start )) s"
tail -3 $OUT/test_rowwise.txt
start=$(date +%s)
timeout 150 python3 benchmarks/kernels_rowwise.py --sweep --no-compile --out $OUT/kernels_rowwise_sweep.jsonl > $OUT/kernels_rowwise_sweep.log 2>&1; echo "sweep rc=$? $(( $(date +%s) - start )) s"
tail -40 $OUT/kernels_rowwise_sweep.log
start=$(date +%s)
timeout 280 python3 benchmarks/linear.py --recipe rowwise --models llama3-8b --m 16384 --rounds 2 --out $OUT/linear_rowwise.jsonl > $OUT/linear_rowwise.log 2>&1; echo "linear rc=$? $(( $(date +%s) - start )) s"
tail -8 $OUT/linear_rowwise.log
