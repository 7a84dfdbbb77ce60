#!/usr/bin/env bash
# GPU call 11: rowwise kernels reworked: tests, demos per recipe and SQNR (concurrently: losses do
# not depend on timing), then alone on the GPU: kernel sweep, linear, our model end to end.
export TORCHINDUCTOR_COMPILE_THREADS=1 F8TENSOR_COMMIT=${F8TENSOR_COMMIT:-9d4b445}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl > $OUT/install.log 2>&1 && export PYTHONPATH=/tmp/site || { cat $OUT/install.log; exit 1; }
python3 -m pip install -q --no-build-isolation --no-deps --no-index -e . >> $OUT/install.log 2>&1 || { cat $OUT/install.log; exit 1; }
timeout 60 python3 benchmarks/tools/scaled_mm_support.py > $OUT/scaled_mm_support.txt 2>&1; echo "probe rc=$?"
grep "rowwise.*->" $OUT/scaled_mm_support.txt
start=$(date +%s)
for r in rowwise rowwise_with_gw_hp; do
  timeout 150 python3 -m f8tensor.demo --recipe $r --out $OUT/demo_$r.json > $OUT/demo_$r.log 2>&1 &
done
timeout 150 python3 benchmarks/sqnr.py --recipes tensorwise rowwise rowwise_with_gw_hp --out $OUT/sqnr_recipes.jsonl > $OUT/sqnr_recipes.log 2>&1 &
timeout 120 python3 -m pytest tests/test_rowwise.py -q -x -p no:cacheprovider -n 6 --dist load > $OUT/test_rowwise.txt 2>&1; echo "tests rc=$? $(( $(date +%s) - start )) s"
tail -3 $OUT/test_rowwise.txt
wait
echo "demos, sqnr done $(( $(date +%s) - start )) s"
for r in rowwise rowwise_with_gw_hp; do tail -4 $OUT/demo_$r.log; done
start=$(date +%s)
timeout 100 python3 benchmarks/kernels_rowwise.py --sweep --no-compile --shapes 16384x4096 16384x14336 14336x4096 16384x1024 1024x4096 --out $OUT/kernels_rowwise_sweep.jsonl > $OUT/kernels_rowwise_sweep.log 2>&1; echo "sweep rc=$? $(( $(date +%s) - start )) s"
cut -c1-150 $OUT/kernels_rowwise_sweep.log
start=$(date +%s)
timeout 80 python3 benchmarks/linear.py --recipe rowwise --models llama3-8b --m 16384 --rounds 2 --out $OUT/linear_rowwise.jsonl > $OUT/linear_rowwise.log 2>&1; echo "linear rc=$? $(( $(date +%s) - start )) s"
grep llama3 $OUT/linear_rowwise.log
start=$(date +%s)
timeout 170 python3 benchmarks/train.py --recipe rowwise --configs bf16 f8tensor torchao_compiled --rounds 2 --out $OUT/train_rowwise_ours.jsonl > $OUT/train_rowwise_ours.log 2>&1; echo "train ours rc=$? $(( $(date +%s) - start )) s"
tail -5 $OUT/train_rowwise_ours.log
