#!/usr/bin/env bash
# The GPU check: the CUDA paths of harness on any CUDA machine, with no model hub.
#
#   ./scripts/gpu_check.sh [WORK_DIR]      (default: ./gpu-check-<UTC time>)
#
# SD 1.5's architecture with random weights (--model sd15-arch), fp16, 512x512: flash-lcm at 2/4/8 steps
# against the 30-step CFG baseline, plain, with --channels-last and with --compile; a request that cannot
# fit in GPU memory, which must fail cleanly; and a two-process torchrun run when two GPUs exist. Then it
# checks every record (CUDA memory fields, deterministic repeats, UNet evaluations per image) and prints
# one table. Exit code 0 when every check passed.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
work=${1:-./gpu-check-$(date -u +%Y%m%dT%H%M%SZ)}
python=${PYTHON:-python}
harness=(${HARNESS:-harness})
export HF_HUB_OFFLINE=1

if ! "$python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "Error: no CUDA device visible to PyTorch; run this on a GPU machine with a CUDA build of torch (see docs/guides/gpu.md)." >&2
  exit 2
fi
gpus=$("$python" -c 'import torch; print(torch.cuda.device_count())')
mkdir -p "$work" || exit 2
common=(--model sd15-arch --dtype float16 --device cuda --height 512 --width 512 --seed 0 -q
        --steps 2 4 8 --compare_baseline --baseline_steps 30 --warmup 2 --repeats 5)

run() {  # run NAME ARGS...: one harness command, its output kept in WORK/NAME.log
  local name=$1; shift
  echo "== $name: ${harness[*]} $*" >&2
  "${harness[@]}" "$@" >"$work/$name.log" 2>&1
  local code=$?
  echo "$code" >"$work/$name.exit"
  tail -n 3 "$work/$name.log" >&2
}

run plain bench "${common[@]}" --outdir "$work/plain"
run channels-last bench "${common[@]}" --channels-last --outdir "$work/channels-last"
run compile bench "${common[@]}" --compile --outdir "$work/compile"
run compile-channels-last bench "${common[@]}" --compile --channels-last --outdir "$work/compile-channels-last"
# 16 images of 4096x4096 in one call: the VAE decoder alone needs hundreds of GB. It must end cleanly, not
# crash: refused up front by harness's memory estimate, or as a failed record with the out-of-memory line.
run out-of-memory bench --model sd15-arch --dtype float16 --device cuda --height 4096 --width 4096 \
  --num_images 16 --steps 2 --warmup 0 --repeats 1 --seed 0 -q --outdir "$work/out-of-memory"
if [ "$gpus" -ge 2 ]; then
  echo "== two processes: torchrun --nproc_per_node 2" >&2
  "$python" -m torch.distributed.run --standalone --nproc_per_node 2 -m harness bench "${common[@]}" \
    --num_images 2 --outdir "$work/torchrun" >"$work/torchrun.log" 2>&1
  echo "$?" >"$work/torchrun.exit"
  tail -n 3 "$work/torchrun.log" >&2
fi

"$python" "$here/gpu_check_report.py" "$work"
