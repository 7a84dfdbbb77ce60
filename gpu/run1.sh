#!/usr/bin/env bash
# GPU call 1 (session 2026-12-03): real-model throughput at HEAD, profiles of torchtitan's model.
export TORCHINDUCTOR_COMPILE_THREADS=1 F8TENSOR_COMMIT=${F8TENSOR_COMMIT:?}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl > $OUT/install.log 2>&1 && export PYTHONPATH=/tmp/site || { cat $OUT/install.log; exit 1; }
python3 -m pip install -q --no-build-isolation --no-deps --no-index -e . >> $OUT/install.log 2>&1 || { cat $OUT/install.log; exit 1; }
python3 -c "import torchtitan.models.llama3.model.model, transformers, torchao; print('imports ok', transformers.__version__, torchao.__version__)" > $OUT/imports.log 2>&1
cat $OUT/imports.log
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,power.limit --format=csv > $OUT/gpu.txt
for m in torchtitan hf_llama hf_qwen2; do
  extra=""; [ $m = torchtitan ] && extra="--profile"
  start=$(date +%s)
  timeout 190 python3 benchmarks/train.py --model $m --configs bf16 f8tensor torchao_compiled --rounds 2 $extra --out $OUT/$m.jsonl > $OUT/$m.log 2>&1
  echo "$m rc=$? $(( $(date +%s) - start )) s"
  tail -6 $OUT/$m.log
done
