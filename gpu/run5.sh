#!/usr/bin/env bash
# GPU call 5 (session 2026-12-03, third): new tests (CUDA graphs, sequence-parallel and FSDP2 float8 on NCCL
# world 1), host overhead, the demo with and without --cuda-graph at two sizes, train.py --cuda-graph small.
export TORCHINDUCTOR_COMPILE_THREADS=1 F8TENSOR_COMMIT=${F8TENSOR_COMMIT:?}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl > $OUT/install.log 2>&1 && export PYTHONPATH=/tmp/site || { cat $OUT/install.log; exit 1; }
python3 -m pip install -q --no-build-isolation --no-deps --no-index -e . >> $OUT/install.log 2>&1 || { cat $OUT/install.log; exit 1; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
start=$(date +%s)
timeout 200 python3 -m pytest tests/test_cuda_graph.py tests/test_sequence_parallel.py tests/test_fsdp_float8.py tests/test_tensor_parallel.py -q -p no:cacheprovider -rfEs -x > $OUT/tests.log 2>&1
echo "== tests rc=$? $(( $(date +%s) - start )) s"; tail -6 $OUT/tests.log
s=$(date +%s)
timeout 90 python3 benchmarks/host_overhead.py > $OUT/host.log 2>&1
echo "== host rc=$? $(( $(date +%s) - s )) s"; cat $OUT/host.log | tail -15
for args in "" "--dim 2048 --layers 8 --batch 16" ; do
  for g in "" "--cuda-graph"; do
    s=$(date +%s)
    timeout 100 python3 -m f8tensor.demo --steps 40 $args $g > "$OUT/demo_${args// /_}${g}.log" 2>&1
    echo "== demo [$args $g] rc=$? $(( $(date +%s) - s )) s"; grep -A3 "^run " "$OUT/demo_${args// /_}${g}.log"
  done
done
for g in "" "--cuda-graph"; do
  s=$(date +%s)
  timeout 150 python3 benchmarks/train.py --layers 4 --dim 1024 --ffn 2816 --heads 8 --kv-heads 8 --vocab 32000 --seq 1024 --batch 4 --rounds 2 --configs bf16 f8tensor f8tensor_compiled torchao_compiled $g --out $OUT/small.jsonl > $OUT/small$g.log 2>&1
  echo "== train small [$g] rc=$? $(( $(date +%s) - s )) s"; grep -A6 "^ac " $OUT/small$g.log
done
cd $OUT && tar czf results.tgz *.log *.jsonl 2>/dev/null; rm -f *.jsonl *.log
