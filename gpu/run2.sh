#!/usr/bin/env bash
# GPU call 2 (session 2026-12-03): torchtitan's model in three AC modes and the handwritten model,
# then peak memory one configuration per process.
export TORCHINDUCTOR_COMPILE_THREADS=1 F8TENSOR_COMMIT=${F8TENSOR_COMMIT:?}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl > $OUT/install.log 2>&1 && export PYTHONPATH=/tmp/site || { cat $OUT/install.log; exit 1; }
python3 -m pip install -q --no-build-isolation --no-deps --no-index -e . >> $OUT/install.log 2>&1 || { cat $OUT/install.log; exit 1; }
run() {  # name timeout args...
  local name=$1 t=$2; shift 2; local start=$(date +%s)
  timeout $t python3 benchmarks/train.py "$@" --out $OUT/$name.jsonl > $OUT/$name.log 2>&1
  echo "== $name rc=$? $(( $(date +%s) - start )) s: $*"; grep -A8 "^ac " $OUT/$name.log | grep -v "^--"
}
C="--configs bf16 f8tensor f8tensor_compiled torchao_compiled --rounds 2"
run torchtitan 340 --model torchtitan --ac-modes none every2 full $C
run handwritten 150 --model handwritten $C
P="--steps 2 --warmup 1 --rounds 1"
for m in torchtitan handwritten; do for c in bf16 f8tensor; do
  run peak_${m}_$c 55 --model $m --configs $c $P
done; done
cd $OUT && tar czf results.tgz *.jsonl *.log && rm -f *.jsonl *.log
