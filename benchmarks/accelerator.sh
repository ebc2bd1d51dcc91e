#!/usr/bin/env bash
# The accelerator benchmark in one command, from the repository root, with no network:
#
#   bash benchmarks/accelerator.sh                 # GPU/TPU host, at most 8 min: results/<utc>/
#   bash benchmarks/accelerator.sh --smoke         # this CPU, tiny sizes: proves the script works
#   bash benchmarks/accelerator.sh --fetch-wheels  # here, with the package index: the wheels a
#                                                  # host without grain etc. installs offline
#
# The sweep is benchmarks/accelerator.py (B/32, L/14 and the density model's train steps;
# results.json + results.md). A host that has jax, flax, optax, orbax-checkpoint, transformers
# but not grain, ml_collections, array_record or tensorboardX installs them from
# benchmarks/wheels/ (made by --fetch-wheels) with pip --no-index; nothing is downloaded there.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
WHEELS=benchmarks/wheels
OUT=benchmarks/results/$(date -u +%Y%m%dT%H%M%SZ)
LIMIT_S=480  # the hard limit; the sweep plans for less (--budget_s)
ARGS=()
while (($#)); do
  case "$1" in
    --smoke) ARGS+=(--smoke); OUT=${OUT}-smoke; LIMIT_S=300; shift ;;
    --out) OUT=$2; shift 2 ;;
    --limit_s) LIMIT_OVERRIDE=$2; shift 2 ;;  # e.g. a smoke run on a loaded CPU (the tests)
    --fetch-wheels) FETCH=1; shift ;;
    *) ARGS+=("$1"); shift ;;
  esac
done
LIMIT_S=${LIMIT_OVERRIDE:-$LIMIT_S}

# What accelerator.py imports beyond a plain jax/flax/transformers GPU image, and what those
# need that such an image may lack (pure Python but for array_record and dm-tree).
MISSING_OK="grain array_record ml_collections tensorboardX dm-tree cloudpickle more-itertools
            etils PyYAML absl-py protobuf tqdm"
if [[ ${FETCH:-0} == 1 ]]; then
  mkdir -p "$WHEELS"
  for py in 3.10 3.11 3.12 3.13; do
    # shellcheck disable=SC2086
    "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$py" \
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux_2_28_x86_64 -d "$WHEELS" $MISSING_OK \
      || echo "note: some wheels have no build for Python $py"
  done
  ls "$WHEELS"
  exit 0
fi

modules_missing() {  # $@: module names
  "$PYTHON" -c 'import importlib.util, sys
print(" ".join(n for n in sys.argv[1:] if importlib.util.find_spec(n) is None))' "$@"
}
required=$(modules_missing jax flax optax orbax transformers numpy PIL)
if [[ -n $required ]]; then
  echo "error: $PYTHON lacks $required: this script needs a host with the JAX stack" >&2
  exit 2
fi
missing=$(modules_missing grain array_record ml_collections tensorboardX tree etils yaml absl \
          tqdm)
if [[ -n $missing ]]; then
  if [[ ! -d $WHEELS ]]; then
    echo "error: missing Python modules ($missing) and no $WHEELS/ to install them from" \
         "(make it with: bash benchmarks/accelerator.sh --fetch-wheels)" >&2
    exit 2
  fi
  echo "# installing from $WHEELS: $missing"
  # shellcheck disable=SC2086
  "$PYTHON" -m pip install --quiet --no-index --find-links "$WHEELS" $MISSING_OK
fi

mkdir -p "$OUT"
echo "# $("$PYTHON" -c 'import jax; print(jax.__version__, jax.devices())' 2>/dev/null)"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version \
    --format=csv,noheader | tee "$OUT/nvidia-smi.txt" || true
# Leave XLA most of the device memory and keep the sweep's own runs out of each other's way.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
timeout --signal=INT "$LIMIT_S" "$PYTHON" benchmarks/accelerator.py --out "$OUT" \
    --budget_s $((LIMIT_S - 80)) "${ARGS[@]}" 2>&1 | tee "$OUT/log.txt"
status=${PIPESTATUS[0]}
echo "# results: $OUT/results.json, $OUT/results.md (exit $status)"
exit "$status"
