#!/usr/bin/env bash
# The CUDA path, proven in one prepared run on one GPU (about 5 minutes on an H200).
#
#   bash benchmarks/gpu_check.sh            # on a machine with a GPU
#   bash benchmarks/gpu_check.sh --dry-run  # the same steps on the CPU, on a small scene (CI runs it)
#
# 1. tests/test_cuda.py: AMP against the CPU, the automatic batch size, votes added on the device;
# 2. benchmarks/bench_pipeline.py with model.device=cuda: AMP on, AMP off, and torch.compile
#    with AMP (end-to-end Mpix/s, model-bound Mpix/s on the GPU, their ratio);
# 3. benchmarks/bench_reads.py: the readers' Mpix/s with one thread and a GPU worker's threads;
# 4. benchmarks/bench_vectorize.py: the vectorize stage's Mpix/s with one and two workers.
#
# Each step runs under its own time limit, and a step that fails does not stop the others. The
# summary at the end gathers each step's figures; the exit status is that of the first failed
# step (0 when all passed). Logs go to $GPU_CHECK_LOGS (default bench_out/gpu_check).
set -uo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
logs=${GPU_CHECK_LOGS:-bench_out/gpu_check}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # a checkout runs without being installed
export PYTHONUNBUFFERED=1
mkdir -p "$logs"

if [[ "${1:-}" == "--dry-run" ]]; then
    device=cpu size=512 block=256 batch=4 workers=1 threads_per_worker=1 repeat=1 readers=2
else
    # One worker holds the GPU; two task threads let one block be read while another runs.
    device=cuda size=8192 block=2048 batch=32 workers=1 threads_per_worker=2 repeat=2 readers=8
fi

status=0
step() {  # step NAME SECONDS COMMAND...: run under a time limit, log, remember the first failure
    local name=$1 seconds=$2
    shift 2
    echo "=== $name"
    timeout "$seconds" "$@" 2>&1 | tee "$logs/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc"
    [[ $rc -ne 0 && $status -eq 0 ]] && status=$rc
    return 0
}

echo "=== machine"
nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"
$python -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda,
    torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device")'

step test_cuda 150 $python -m pytest -q -p no:cacheprovider --noconftest tests/test_cuda.py
pipeline=(benchmarks/bench_pipeline.py --device "$device" --size "$size" --block "$block" --batch "$batch"
    --workers "$workers" --threads-per-worker "$threads_per_worker" --repeat "$repeat")
step pipeline_amp 150 $python "${pipeline[@]}" --amp
step pipeline_fp32 120 $python "${pipeline[@]}" --no-amp
step pipeline_compile 240 $python "${pipeline[@]}" --amp --compile
step reads 90 $python benchmarks/bench_reads.py --size "$size" --block "$block" --threads 1 "$readers" --repeat 2
step vectorize 120 $python benchmarks/bench_vectorize.py --size "$((size / 2))" --block "$((block / 2))" --format parquet --repeat 1 --memory-sizes

echo "=== summary ($device)"
for name in pipeline_amp pipeline_fp32 pipeline_compile; do
    echo "$name:"
    grep -E "^scene |pipeline \(read|model-bound:|ratio=" "$logs/$name.log" | sed 's/^/    /'
done
echo "reads:" && grep -E "thread|speedup=" "$logs/reads.log" | sed 's/^/    /'
echo "vectorize:" && grep -E "Mpix/s|ratio=" "$logs/vectorize.log" | sed 's/^/    /'
echo "gpu_check: exit $status"
exit "$status"
