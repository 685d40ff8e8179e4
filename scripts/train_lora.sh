#!/usr/bin/env bash
# The seed's train_lora.sh: distil a few-step LoRA student with `harness train --plugin distill`.
#
#   ./scripts/train_lora.sh --dataset_name lambdalabs/naruto-blip-captions --max_steps 1000 --batch_size 1 --grad_accum 4
#
# Takes every option of `harness train --plugin distill --help`, in either spelling; a quoted list such as
# --student_steps "2 4 8" is split into its values.
set -euo pipefail
. "$(dirname "$0")/harness_args.sh"
expand_lists "--student_steps --student-steps" "$@"
exec "${HARNESS[@]}" train --plugin distill "${EXPANDED[@]}"
