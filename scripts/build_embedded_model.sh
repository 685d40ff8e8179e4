#!/usr/bin/env bash
# The embedded model's whole recipe: data, VAE + UNet + text encoder (pretrain), the few-step LoRA
# (distill), the evaluation table, and the export into harness/weights/ (what --model embedded loads).
#
#   nohup ./scripts/build_embedded_model.sh WORK_DIR > build.log 2>&1 &    # ~1.5 h on a 2-core CPU
#
# Every stage resumes from its newest checkpoint, so running the same command again after a stop
# continues where it left off. Nothing is written into the repository before the export step.
set -euo pipefail
WORK=${1:?usage: build_embedded_model.sh WORK_DIR}
HERE=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$WORK"
log() { echo "[$(date +%H:%M:%S)] $*" >&2; }

if [ ! -d "$WORK/shapes" ]; then
  log "data: 12,000 captioned shapes"
  harness data shapes --out "$WORK/shapes" --n 12000 --seed 0 --resolution 64
fi

log "pretrain: VAE, then UNet + text encoder"
harness train --plugin pretrain --data_dir "$WORK/shapes" --output_dir "$WORK" --run_name embedded \
  --vae_steps 1500 --max_steps 6000 --seed 0 --eval_every 1000 --resume_from_checkpoint latest
TEACHER="$WORK/embedded/model/final"

log "distill: the few-step LoRA (trajectory distillation from the 30-step CFG-7.5 teacher)"
harness train --plugin distill --model "$TEACHER" --data_dir "$WORK/shapes" --output_dir "$WORK" \
  --run_name flash_lora --max_steps 400 --batch_size 8 --grad_accum 1 --learning_rate 1e-3 \
  --teacher_steps 30 --student_steps 2 4 8 --lora_rank 8 --lora_alpha 8 --cache_latents --seed 0 \
  --checkpointing_steps 100 --resume_from_checkpoint latest

log "lcm: the consistency-distilled LoRA, for comparison (teacher guidance fixed at the teacher's 7.5)"
harness train --plugin lcm --model "$TEACHER" --data_dir "$WORK/shapes" --output_dir "$WORK" \
  --run_name lcm_lora --max_steps 400 --batch_size 8 --grad_accum 1 --learning_rate 1e-3 \
  --w_min 6.5 --w_max 6.5 --lora_rank 8 --lora_alpha 8 --cache_latents --seed 0 \
  --checkpointing_steps 100 --resume_from_checkpoint latest

log "evaluation on the 64 held-out prompts: undistilled, distill (flash-lcm) and lcm (local-student)"
harness eval --model "$TEACHER" --sampler undistilled flash-lcm local-student \
  --lora_id "$WORK/flash_lora/lora/final" --lora_path "$WORK/lcm_lora/lora/final" --steps 2 4 8 \
  --prompts held-out --seed 0 --metric fidelity psnr --warmup 0 --repeats 1 --outdir "$WORK/eval" --quiet

# The winner at 4 steps (fidelity, then PSNR against the teacher) ships; pass its folder as WINNER.
WINNER=${WINNER:-$WORK/flash_lora/lora/final}
log "export the teacher and $WINNER into harness/weights/"
python "$HERE/scripts/export_embedded.py" "$TEACHER" "$WINNER"
