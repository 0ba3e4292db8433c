#!/usr/bin/env bash
# One workload of the end-to-end benchmark on the GPU machine (H100 or H200), run from the repository root with
# .whl carried (../shared/gpu/fetch-wheels.sh torchao==0.17.0 cache-dit==1.5.3) and, for the shape workloads, the
# reference run's results carried at artifacts/e2e-reference/e2e.json. Results go to $OUT/e2e.json (rewritten after
# every contender) and the log to $OUT/e2e.log. See benchmarks/README.md.
#
#   bash benchmarks/gpu_e2e.sh reference|cogvideox|wan [more benchmark options]
set -euo pipefail
workload=${1:?usage: bash benchmarks/gpu_e2e.sh reference|cogvideox|wan [options]}
shift
out=${OUT:-artifacts/e2e-$workload}
# the benchmark's own budget (a contender is stopped at it); installing and loading fit in the rest of 9 minutes
budget=${BUDGET_S:-480}
case $workload in
  reference)
    args=(--workloads reference --prompts 2
          --policy policies/reference-h200-tdc.json,benchmarks/results/e2e-policy-reference-int8-tdc.json,policies/reference-tdc-fp8-extrapolate.json
          --policy-name ours-tdc,ours-int8-tdc,ours-tdc-fp8-x
          --fbc-thresholds 0.02,0.05,0.1 --dbcache-thresholds 0.02,0.05,0.1 --taylorseer-thresholds 0.05,0.1) ;;
  cogvideox)
    args=(--workloads shape:cogvideox-2b --steps-timed 10 --replay-from artifacts/e2e-reference/e2e.json) ;;
  wan)
    args=(--workloads shape:wan2.1-1.3b --steps-timed 10 --replay-from artifacts/e2e-reference/e2e.json) ;;
  *) echo "unknown workload $workload (reference, cogvideox or wan)" >&2; exit 2 ;;
esac
if [ "$workload" != reference ] && [ ! -f artifacts/e2e-reference/e2e.json ]; then
  echo "artifacts/e2e-reference/e2e.json is missing: run the reference first and carry its e2e.json there" >&2
  exit 2
fi
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . >/dev/null
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python3 -m benchmarks.e2e "${args[@]}" --budget-s "$budget" --out "$out" "$@" 2>&1 | tee "$out/e2e.log"
