#!/usr/bin/env bash
# GPU call 6 (session 2026-12-03, third): the whole test suite, then the README's demo command as written.
export TORCHINDUCTOR_COMPILE_THREADS=1 F8TENSOR_COMMIT=${F8TENSOR_COMMIT:?}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl > $OUT/install.log 2>&1 && export PYTHONPATH=/tmp/site || { cat $OUT/install.log; exit 1; }
python3 -m pip install -q --no-build-isolation --no-deps --no-index -e . >> $OUT/install.log 2>&1 || { cat $OUT/install.log; exit 1; }
s=$(date +%s)
timeout 100 python3 -m f8tensor.demo > $OUT/demo.log 2>&1
echo "== demo rc=$? $(( $(date +%s) - s )) s"; head -1 $OUT/demo.log; grep -A3 "^run " $OUT/demo.log
start=$(date +%s)
timeout 420 python3 -m pytest tests -q -p no:cacheprovider -n 4 --dist loadfile --durations=15 -rfEs > $OUT/suite.log 2>&1
echo "== suite rc=$? $(( $(date +%s) - start )) s"; tail -30 $OUT/suite.log
cd $OUT && tar czf results.tgz *.log 2>/dev/null; rm -f *.log
