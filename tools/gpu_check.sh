#!/usr/bin/env bash
# The CUDA checks in one go, for a machine with an NVIDIA GPU (CI has none):
#   1. the CUDA tests (tests/test_cuda.py) and the repair tests, on the GPU;
#   2. tools/bench_backend.py --device cuda: parity with onnxruntime and tracing speed;
#   3. the Fashion-MNIST fine-tune sweep (F=1) of both benchmark nets, the torch side
#      (scoring, repair, fine-tuning) on the GPU, the two nets side by side.
#
#   tools/gpu_check.sh OUT_DIR VGG_MODEL INCEPTION_MODEL [SECONDS_FOR_THE_SWEEPS] [EPOCHS]
#
# EPOCHS: comma-separated fine-tune budgets for the sweep (default 1); SKIP_BENCH=1 skips
# step 2.
# Everything it measures lands in OUT_DIR (logs, JSON). Each step has its own time limit,
# so a slow step leaves the others their share; the sweeps save after every run.
set -u
out=${1:?OUT_DIR}; vgg=${2:?VGG_MODEL}; inc=${3:?INCEPTION_MODEL}; sweep_s=${4:-300}; budgets=${5:-1}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 - <<'EOF' | tee -a "$out/gpu.txt"
import onnx, onnxruntime, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name())
print("onnx", onnx.__version__, "onnxruntime", onnxruntime.__version__,
      onnxruntime.get_available_providers())
EOF

timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_repair.py \
    2>&1 | tee "$out/pytest_cuda.log" | tail -5

[ "${SKIP_BENCH:-0}" = 1 ] || timeout 120 python3 tools/bench_backend.py --device cuda --threads 8 \
    --models resnet18,mobilenet_v2,googlenet,resnet50 --json "$out/backend_cuda.json" \
    > "$out/backend_cuda.txt" 2> "$out/backend_cuda.err"
cat "$out/backend_cuda.txt" 2>/dev/null

for pair in "vgg:$vgg" "inception:$inc"; do
    name=${pair%%:*}; model=${pair#*:}
    timeout "$sweep_s" python3 tools/fmnist_bench.py sweep --model "$model" \
        --criteria gpp,taylor,l1,random --removed 0.5,0.75,0.9 --finetune-epochs "$budgets" \
        --per-class 64 --threads 4 --quiet --json "$out/sweep_f1_$name.json" \
        > "$out/sweep_f1_$name.log" 2>&1 &
done
wait
tail -n 20 "$out"/sweep_f1_*.log
