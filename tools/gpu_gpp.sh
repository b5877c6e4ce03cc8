#!/usr/bin/env bash
# The method's training paths on a CUDA GPU in one go, for a machine with an NVIDIA GPU
# (CI has none):
#   1. the CUDA tests (tests/test_cuda.py: parity, training, mixed precision, scoring,
#      repair, prune with fine-tuning);
#   2. gpp (push -> prune -> fine-tune rounds) on CUDA, then prune with fine-tuning on
#      CUDA in float32 and with --amp, then the same prune on the CPU (every core), for
#      the time ratio; each run's held-out (validation) and test accuracy and wall time;
#   3. torchrun with two processes on a machine with one GPU: the one-line refusal.
#
#   tools/gpu_gpp.sh OUT_DIR MODEL [TARGET_MACS] [BUDGET_EPOCHS]
#
# Fashion-MNIST must be in /usr/share/datasets/fashion-mnist. DEVICE=cpu runs the same
# steps without a GPU (to try the script); EXTRA adds options to every gpp-onnx run
# (e.g. "--limit 3000"). OUT_DIR/summary.txt gets one line per run as it ends; each
# step has its own time limit, so a slow one leaves the others their share.
set -u
out=${1:?OUT_DIR}; model=${2:?MODEL}; macs=${3:-0.1}; epochs=${4:-2}
device=${DEVICE:-cuda}; extra=${EXTRA:-}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
py=${PYTHON:-python3}
summary="$out/summary.txt"
common=(--data fashion-mnist --target-macs "$macs" --val-split 0.0833333333 --no-latency
        --seed 0)

row() {  # NAME SECONDS RC OUTPUT.onnx: held-out and test accuracy of a written model
    $py - "$@" <<'EOF' | tee -a "$summary"
import json, sys
from pathlib import Path
name, secs, rc, path = sys.argv[1], float(sys.argv[2]), sys.argv[3], Path(sys.argv[4])
report = path.with_suffix(".report.json")
if rc != "0" or not report.exists():
    print(f"{name:28s} exit {rc} after {secs:.0f} s (log: {name}.log)")
    sys.exit()
import onnx
from gpp_onnx.data import DataSpec, load_dataset
from gpp_onnx.evaluation import accuracy
r = json.loads(report.read_text())
test = accuracy(onnx.load(path), load_dataset(DataSpec("fashion-mnist:test", 1, 28, 28)))
macs = r["after"]["macs"] / r["before"]["macs"]
print(f"{name:28s} val {r['after']['accuracy']:.4f}  test {test:.4f}  macs {macs:.3f}  "
      f"wall {secs:.1f} s")
EOF
}

run() {  # NAME LIMIT_S gpp-onnx ARGS...: one timed run, its row in the summary
    local name=$1 limit=$2; shift 2
    local start end rc
    start=$(date +%s.%N)
    timeout "$limit" "$@" > "$out/$name.log" 2>&1
    rc=$?
    end=$(date +%s.%N)
    row "$name" "$(awk "BEGIN{print $end - $start}")" "$rc" "$out/$name.onnx"
}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
    $py -c "import onnx, onnxruntime, torch; print('torch', torch.__version__, 'cuda', \
torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name(), '| cpus', \
torch.get_num_threads(), '| onnx', onnx.__version__, 'onnxruntime', onnxruntime.__version__)"
    echo "model $model, target $macs of the MACs, $epochs epochs, device $device $extra"
} 2>&1 | tee -a "$summary"

[ "$device" = cpu ] || timeout 150 $py -m pytest -q -p no:cacheprovider tests/test_cuda.py \
    > "$out/pytest_cuda.log" 2>&1
[ "$device" = cpu ] || tail -n 3 "$out/pytest_cuda.log" | tee -a "$summary"

gpp=($py -m gpp_onnx -q)
# shellcheck disable=SC2086
run gpp_$device 200 "${gpp[@]}" gpp "$model" "${common[@]}" --budget-epochs "$epochs" \
    --device "$device" $extra -o "$out/gpp_$device.onnx"
# shellcheck disable=SC2086
run prune_$device 120 "${gpp[@]}" prune "$model" "${common[@]}" --finetune-epochs "$epochs" \
    --device "$device" $extra -o "$out/prune_$device.onnx"
# shellcheck disable=SC2086
run prune_${device}_amp 120 "${gpp[@]}" prune "$model" "${common[@]}" \
    --finetune-epochs "$epochs" --device "$device" --amp $extra \
    -o "$out/prune_${device}_amp.onnx"
if [ "$device" != cpu ]; then
    # shellcheck disable=SC2086
    run prune_cpu 200 "${gpp[@]}" prune "$model" "${common[@]}" --finetune-epochs "$epochs" \
        --device cpu $extra -o "$out/prune_cpu.onnx"
    # two processes want two GPUs (NCCL runs one rank per GPU): a one-line error, exit 2
    timeout 60 $py -m torch.distributed.run --nproc_per_node 2 -m gpp_onnx -q prune \
        "$model" "${common[@]}" --finetune-epochs 1 --device cuda \
        -o "$out/ddp_refused.onnx" > "$out/ddp_refused.log" 2>&1
    echo "torchrun x2 on one GPU: exit $?, $(grep -m1 -i 'error' "$out/ddp_refused.log")" \
        | tee -a "$summary"
fi
