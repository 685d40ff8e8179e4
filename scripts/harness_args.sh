# Sourced by train_lora.sh and eval_lora.sh: how to run harness, and the seed's quoted number lists.

if command -v harness >/dev/null 2>&1; then
  HARNESS=(harness)
else
  HARNESS=("${PYTHON:-python3}" -m harness)
fi

# expand_lists "FLAG ..." ARG...: sets EXPANDED to the arguments with the value after each named flag split
# on spaces, so the seed's --steps "2 4 8" reaches harness as --steps 2 4 8.
expand_lists() {
  local flags=" $1 " split_next=0 arg values
  shift
  EXPANDED=()
  for arg in "$@"; do
    if ((split_next)); then
      read -r -a values <<<"$arg"
      EXPANDED+=("${values[@]}")
      split_next=0
    else
      EXPANDED+=("$arg")
      if [[ "$flags" == *" $arg "* ]]; then split_next=1; fi
    fi
  done
}
