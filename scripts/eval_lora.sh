#!/usr/bin/env bash
# The seed's eval_lora.sh: the baseline (30 steps, CFG 7.5) against a trained LoRA with `harness eval`.
#
#   ./scripts/eval_lora.sh --lora_path ./checkpoints/my_lora_student/lora/final --prompt "a pokemon character" --steps "2 4 8" --seed 42
#
# Takes every option of `harness eval --help`; a quoted list such as --steps "2 4 8" is split into its values.
set -euo pipefail
. "$(dirname "$0")/harness_args.sh"
expand_lists "--steps" "$@"
exec "${HARNESS[@]}" eval "${EXPANDED[@]}"
