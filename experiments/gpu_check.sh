#!/usr/bin/env bash
# One-shot GPU check, run from anywhere in the repo on a CUDA machine without network:
#     bash experiments/gpu_check.sh          # ~3 minutes on an H100; bounded at ~7.5
# 1. installs the wheels in .whl/ (hydra-core, omegaconf, antlr4) into /tmp/site;
# 2. prints the GPU and the torch/CUDA versions;
# 3. runs the GPU tests (tests/test_gpu.py)        -> $OUT/gpu_tests.log;
# 4. measures training/inference pairs/s           -> $OUT/gpu_throughput.md.
# Each part runs even if an earlier one failed; the exit status is non-zero if any did.
# Without CUDA (a dry run) the tests skip and the throughput part is left out.
set -o pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-$PWD/outputs/gpu_check}
mkdir -p "$OUT"
SITE=${SITE:-/tmp/site}
failed=()
part() { echo; echo "=== $* ($(date +%T))"; }

part "install wheels into $SITE"
if compgen -G ".whl/*.whl" >/dev/null; then
    ls .whl
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" .whl/*.whl 2>&1 | { grep -v "Running pip as the 'root' user" || true; } \
        || failed+=(install)
else
    echo "no .whl/*.whl here: relying on what is installed"
fi
export PYTHONPATH="$SITE:$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

part "machine"
nvidia-smi -L 2>/dev/null || echo "nvidia-smi: not available"
python3 - <<'EOF' 2>&1 | tee "$OUT/env.txt" || failed+=(imports)
import platform, torch, lightning, hydra, omegaconf, air_reg
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"lightning {lightning.__version__}, hydra {hydra.__version__}, omegaconf {omegaconf.__version__}")
print("cuda available:", torch.cuda.is_available(),
      "|", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
print("air_reg from", air_reg.__file__)
EOF
has_cuda=$(python3 -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)

part "GPU tests"
timeout_opt=()
python3 -c "import pytest_timeout" 2>/dev/null && timeout_opt=(--timeout 240)
timeout 270 python3 -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider -rs \
    --durations=8 "${timeout_opt[@]}" 2>&1 | tee "$OUT/gpu_tests.log" || failed+=(tests)

part "throughput"
if [ "$has_cuda" = 1 ]; then
    timeout 150 python3 experiments/gpu_throughput.py --out "$OUT/gpu_throughput.md" 2>&1 \
        | tee "$OUT/gpu_throughput.log" || failed+=(throughput)
else
    echo "skipped: no CUDA device"
fi

part "done"
if [ ${#failed[@]} -eq 0 ]; then echo "all parts passed"; else echo "FAILED: ${failed[*]}"; fi
ls -la "$OUT"
[ ${#failed[@]} -eq 0 ]
