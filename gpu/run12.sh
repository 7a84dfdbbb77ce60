#!/usr/bin/env bash
# GPU call 12: torchtitan end to end under rowwise, the amax-pass sweep, the rowwise tests.
export TORCHINDUCTOR_COMPILE_THREADS=1 F8TENSOR_COMMIT=fd89a36
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl > $OUT/install.log 2>&1 && export PYTHONPATH=/tmp/site || { cat $OUT/install.log; exit 1; }
python3 -m pip install -q --no-build-isolation --no-deps --no-index -e . >> $OUT/install.log 2>&1 || { cat $OUT/install.log; exit 1; }
start=$(date +%s)
timeout 180 python3 benchmarks/train.py --model torchtitan --recipe rowwise --configs bf16 f8tensor torchao_compiled --rounds 2 --out $OUT/train_rowwise_torchtitan.jsonl > $OUT/train_rowwise_torchtitan.log 2>&1
echo "train torchtitan rc=$? $(( $(date +%s) - start )) s"
tail -5 $OUT/train_rowwise_torchtitan.log
start=$(date +%s)
timeout 50 python3 benchmarks/kernels_rowwise.py --sweep --no-compile --shapes 16384x4096 16384x14336 --out $OUT/kernels_rowwise.jsonl > $OUT/kernels_rowwise.log 2>&1; echo "kernels rc=$? $(( $(date +%s) - start )) s"
grep -v "^{" $OUT/kernels_rowwise.log | cut -c1-60
grep "kernel" $OUT/kernels_rowwise.log
start=$(date +%s)
timeout 150 python3 -m pytest tests/test_rowwise.py -q -p no:cacheprovider -n 12 --dist load > $OUT/test_rowwise.txt 2>&1; echo "tests rc=$? $(( $(date +%s) - start )) s"
tail -3 $OUT/test_rowwise.txt
