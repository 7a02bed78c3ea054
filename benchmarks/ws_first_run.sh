#!/usr/bin/env bash
# Do the warp-specialised Gluon dK/dV kernels (`templates.nsa_bwd_ws`) run correctly, and are
# they faster than the tuned Triton ones? Their GPU validation, as one device call on a
# Hopper GPU (the device tool: `bash benchmarks/ws_first_run.sh`; the step limits add up to
# 570 s, inside one 600 s call). On 2026-12-07 the commands of steps 1 and 3 ran on an H100,
# as two calls, and passed (benchmarks/RESULTS.md); step 2 has not run yet.
#
# Gluon has no interpreter, so these kernels run only on a GPU. A wrong mbarrier
# phase or count hangs the kernel rather than failing it: every step runs under `timeout`, so
# a hang costs that step's limit, not the call's, and the steps after a failed one are skipped.
# Logs go to $OUT (default out/); the last lines printed are the summary. `--quick` leaves out
# the whole sweep (step 2): 340 s, for a call with less device time left.
set -u
quick=0
case "${1:-}" in
    "") ;;
    --quick) quick=1 ;;
    *) echo "usage: $0 [--quick]" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD NSA_COMPILE_AUTOTUNE=0
logs=${OUT:-out}
mkdir -p "$logs"
rm -f "$logs"/ws_*.log
summary=()

step() {  # step NAME LIMIT_S COMMAND...: runs it, logs it, records how it ended; rc 0 if passed
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    timeout -s KILL "$limit" "$@" >"$logs/ws_$name.log" 2>&1
    local rc=$?
    local how="rc $rc"
    [ $rc -eq 137 ] && how="killed after ${limit} s (a hang: an mbarrier wait never completes?)"
    summary+=("$name: $how, $((SECONDS - start)) s; $(tail -n 1 "$logs/ws_$name.log")")
    return $rc
}

tests=tests/gpu/test_nsa_bwd_gpu.py
# 0. A Hopper GPU, else every case below would skip and the steps would "pass".
step gpu 30 python -c "import torch; cap = torch.cuda.get_device_capability(); \
print(torch.cuda.get_device_name(), cap); assert cap == (9, 0), 'needs sm_90'" &&
# 1. One shape per group size class, both selected-dQ ways: the first launch of every kernel.
step smoke 150 python -m pytest -x -q "$tests" \
    -k "ws and (T1000-G4-D128 or T1000-G16-D128 or T17-G1-D64)" &&
# 2. The whole bf16-vs-fp64 sweep of both orders (D 64/128) and determinism.
{ [ $quick = 1 ] || step sweep 230 python -m pytest -q "$tests" -k "ws"; } &&
# 3. Each step's time against the shipped Triton picks, and the gradients' difference.
step bench 160 python benchmarks/dkdv_ws.py --ts 8192,65536 --groups 64/4,32/8 --stages 4,6
bench_rc=$?
printf '%s\n' "${summary[@]}"
[ -s "$logs/ws_bench.log" ] && tail -n 30 "$logs/ws_bench.log"
exit $bench_rc
