#!/usr/bin/env bash
# GPU call 8 (session 2026-12-03, third): the sequence-parallel test after the amax fix.
export TORCHINDUCTOR_COMPILE_THREADS=1 F8TENSOR_COMMIT=${F8TENSOR_COMMIT:?}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl > $OUT/install.log 2>&1 && export PYTHONPATH=/tmp/site || { cat $OUT/install.log; exit 1; }
python3 -m pip install -q --no-build-isolation --no-deps --no-index -e . >> $OUT/install.log 2>&1 || { cat $OUT/install.log; exit 1; }
s=$(date +%s)
timeout 200 python3 -m pytest tests/test_sequence_parallel.py -q -p no:cacheprovider -rfEs -k "nccl" > $OUT/tests.log 2>&1
echo "== tests rc=$? $(( $(date +%s) - s )) s"; tail -25 $OUT/tests.log
