#!/usr/bin/env bash
# GPU call 7 (session 2026-12-03, third): the sequence-parallel test as changed, the CUDA-graph tests, a host profile.
export TORCHINDUCTOR_COMPILE_THREADS=1 F8TENSOR_COMMIT=${F8TENSOR_COMMIT:?}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl > $OUT/install.log 2>&1 && export PYTHONPATH=/tmp/site || { cat $OUT/install.log; exit 1; }
python3 -m pip install -q --no-build-isolation --no-deps --no-index -e . >> $OUT/install.log 2>&1 || { cat $OUT/install.log; exit 1; }
s=$(date +%s)
timeout 200 python3 -m pytest tests/test_sequence_parallel.py tests/test_cuda_graph.py -q -p no:cacheprovider -rfEs -k "nccl or cuda or graph" > $OUT/tests.log 2>&1
echo "== tests rc=$? $(( $(date +%s) - s )) s"; tail -5 $OUT/tests.log
s=$(date +%s)
timeout 90 python3 benchmarks/host_overhead.py --profile > $OUT/host.log 2>&1
echo "== host rc=$? $(( $(date +%s) - s )) s"; head -60 $OUT/host.log
cd $OUT && tar czf results.tgz *.log 2>/dev/null; rm -f *.log
