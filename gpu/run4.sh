#!/usr/bin/env bash
# GPU call 4 (session 2026-12-03): the tests changed or added since call 3, then one profiled step
# per configuration of torchtitan's and Hugging Face Llama's models.
export TORCHINDUCTOR_COMPILE_THREADS=1 F8TENSOR_COMMIT=${F8TENSOR_COMMIT:?}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl > $OUT/install.log 2>&1 && export PYTHONPATH=/tmp/site || { cat $OUT/install.log; exit 1; }
python3 -m pip install -q --no-build-isolation --no-deps --no-index -e . >> $OUT/install.log 2>&1 || { cat $OUT/install.log; exit 1; }
python3 -c "import hypothesis; print('hypothesis', hypothesis.__version__)"
start=$(date +%s)
timeout 120 python3 -m pytest tests/test_rope_complex.py tests/test_quantize_properties.py tests/test_trust.py -q -p no:cacheprovider -rfEs > $OUT/tests.log 2>&1
echo "== tests rc=$? $(( $(date +%s) - start )) s"; tail -4 $OUT/tests.log
s=$(date +%s)
(cd benchmarks && timeout 60 python3 sqnr.py --tokens 8192 --out $OUT/sqnr.jsonl > $OUT/sqnr.log 2>&1)
echo "== sqnr rc=$? $(( $(date +%s) - s )) s"; tail -9 $OUT/sqnr.log
for m in torchtitan; do
  s=$(date +%s)
  timeout 200 python3 benchmarks/train.py --model $m --configs bf16 f8tensor f8tensor_compiled torchao_compiled --rounds 1 --profile --out $OUT/profile_$m.jsonl > $OUT/profile_$m.log 2>&1
  echo "== profile $m rc=$? $(( $(date +%s) - s )) s"; grep -A5 "^ac " $OUT/profile_$m.log
done
cd $OUT && tar czf results.tgz *.log *.jsonl *.txt 2>/dev/null; rm -f *.jsonl *.log *.txt
