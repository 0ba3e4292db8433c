#!/usr/bin/env bash
# Issue 18's precision measurements on the GPU machine (H100 or H200), run from the repository root with .whl
# carried (../shared/gpu/fetch-wheels.sh torchao==0.17.0 cache-dit==1.5.3). Stages, each with its own time limit:
#   tests  the gpu-marked tests of the runtime, kernels and profiling   -> $OUT/gpu-tests.log
#   menu   benchmarks/route_menu.py on the Wan2.1-1.3B and CogVideoX-2B shapes -> $OUT/menu/
#   e2e:<workload>:<contenders>  python -m benchmarks.e2e on one shape workload (blocks compiled, the compiled bf16
#          baseline first and again last) -> $OUT/e2e-<workload>/
#
#   bash benchmarks/gpu_precision.sh tests menu e2e:cogvideox-2b:ours-fp8-fast-accum,ours-nvfp4-fp8-fast-accum
set -uo pipefail
out=${OUT:-artifacts/precision}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >/dev/null || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
for stage in "$@"; do
  echo "=== $stage ($(date -u +%H:%M:%S))"
  case $stage in
    tests)
      timeout "${TESTS_S:-200}" python3 -m pytest -q -rfEs -m gpu ${TEST_PATHS:-tests/runtime tests/kernels tests/profiling} \
        -p no:cacheprovider > "$out/gpu-tests.log" 2>&1
      echo "tests rc=$?"; tail -15 "$out/gpu-tests.log" ;;
    menu)
      timeout "${MENU_S:-200}" python3 benchmarks/route_menu.py --out "$out/menu" --repeats 10 --workloads "${MENU_WORKLOADS:-shape:wan2.1-1.3b,shape:cogvideox-2b}" 2>&1 | tail -60 ;;
    e2e:*)
      IFS=: read -r _ wl contenders <<< "$stage"
      mkdir -p "$out/e2e-$wl"
      timeout "${E2E_S:-560}" python3 -m benchmarks.e2e --workloads "shape:$wl" --steps-timed "${STEPS_TIMED:-5}" \
        --contenders "$contenders" --repeat-baseline --budget-s "${BUDGET_S:-480}" --out "$out/e2e-$wl" \
        > "$out/e2e-$wl/e2e.log" 2>&1
      echo "e2e rc=$?"; grep -E "^\| |not run|Error|error" "$out/e2e-$wl/e2e.log" | tail -25 ;;
    *) echo "unknown stage $stage" ;;
  esac
done
echo "=== done ($(date -u +%H:%M:%S))"
