#!/bin/bash
# The CUDA tests on a device machine (the `device` tool), from the repository root:
#
#   bash tests/gpu/run_on_device.sh [PYTEST ARGS...]
#
# Without arguments it runs the four GPU files: kernel_cases.py and quant_cases.py natively, then
# test_cuda.py and test_quant_cuda.py. Arguments replace that list; paths are relative to the
# repository root, e.g. `bash tests/gpu/run_on_device.sh tests/gpu/test_cuda.py -k mixed`.
# It imports this checkout through bench/device_setup.sh.
#
# One line per test goes to $OUT/pytest-gpu.txt as the tests run, so a run cut at the tool's time
# limit still returns what passed. The summary goes there too and to the tail of the output.
# Budget: 336 s on a machine whose Triton cache was warm (fourteenth session). A fresh machine
# compiles every kernel variant first and took over 560 s (fifteenth session, cut there); split
# over two calls on fresh machines (sixteenth session): test_cuda.py + test_quant_cuda.py 237 s,
# kernel_cases.py + quant_cases.py 247-251 s.
set -o pipefail
# shellcheck source=bench/device_setup.sh
source bench/device_setup.sh  # extends a PYTHONPATH that may be unset: before `set -u`
set -u
R=$PWD
OUT=${OUT:-$PWD}
args=("$@")
if [ ${#args[@]} -eq 0 ]; then
    args=(tests/gpu/kernel_cases.py tests/gpu/quant_cases.py tests/gpu/test_cuda.py tests/gpu/test_quant_cuda.py)
fi
for i in "${!args[@]}"; do  # paths relative to the root -> absolute (pytest runs in /tmp)
    [ -e "${args[$i]}" ] && args[i]="$R/${args[$i]}"
done
cd /tmp || exit 2
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$OUT/pytest-gpu.txt"
python3 -m pytest "${args[@]}" -v -rs -p no:cacheprovider --timeout 300 2>&1 \
    | grep --line-buffered -E "PASSED|FAILED|ERROR|SKIPPED|passed|failed|skipped|error|Error" \
    | tee -a "$OUT/pytest-gpu.txt" | tail -20
exit "${PIPESTATUS[0]}"
