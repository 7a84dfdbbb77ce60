#!/usr/bin/env bash
# GPU call 3 (session 2026-12-03): the whole test suite at HEAD, then Hugging Face models' peak
# memory one configuration per process.
export TORCHINDUCTOR_COMPILE_THREADS=1 F8TENSOR_COMMIT=${F8TENSOR_COMMIT:?}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl > $OUT/install.log 2>&1 && export PYTHONPATH=/tmp/site || { cat $OUT/install.log; exit 1; }
python3 -m pip install -q --no-build-isolation --no-deps --no-index -e . >> $OUT/install.log 2>&1 || { cat $OUT/install.log; exit 1; }
start=$(date +%s)
timeout 430 python3 -m pytest tests -q -p no:cacheprovider -n 4 --dist loadfile --durations=15 -rfEs > $OUT/suite.log 2>&1
echo "== suite rc=$? $(( $(date +%s) - start )) s"; grep -E "passed|failed|error" $OUT/suite.log | tail -5; grep -E "^(FAILED|ERROR)" $OUT/suite.log | head -30
run() {  # name timeout args...
  local name=$1 t=$2; shift 2; local start=$(date +%s)
  timeout $t python3 benchmarks/train.py "$@" --out $OUT/$name.jsonl > $OUT/$name.log 2>&1
  echo "== $name rc=$? $(( $(date +%s) - start )) s: $*"; grep -A3 "^ac " $OUT/$name.log
}
P="--steps 2 --warmup 1 --rounds 1"
for m in hf_llama hf_qwen2; do for c in bf16 f8tensor; do
  [ $(( $(date +%s) - start )) -lt 540 ] && run peak_${m}_$c 40 --model $m --configs $c $P
done; done
cd $OUT && tar czf results.tgz *.jsonl *.log 2>/dev/null; rm -f *.jsonl *.log
