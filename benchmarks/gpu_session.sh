#!/usr/bin/env bash
# One GPU-machine session: the GPU tests, the GPU bench of both designs, and what the shared pool costs
# each GPU worker.
#
# Usage on the GPU machine, from the repository root, with .whl/ carried along holding the wheels of
# ../shared/gpu/fetch-wheels.sh plus lmcd's own (`pip wheel --no-deps . -w .whl`; it is how lmcd gets there):
#   OUT=/some/dir bash benchmarks/gpu_session.sh [tests|bench|pool|all]
#   tests  pytest -m gpu tests/gpu (kernels and pipeline bit-exact; a real server and workers end to end)
#   bench  lmcache bench --device cuda --repeats 30 --load, with its same-run pinned-copy ceiling, for worker
#          copies against a --share-pool server and server copies against a plain server, two fresh servers each
#   pool   benchmarks/pool_register.py: mapping and registering a 32-96 GiB pool from 1, 2 and 4 processes
#   vllm-tests  tests/gpu/test_vllm_gpu.py (a real vLLM: ../shared/gpu/vllm.md says how it gets there), then
#          the other GPU tests in the time left of VLLM_SESSION_S (default 540 s from the start of this script)
#   vllm-bench  benchmarks/vllm_gpu_ttft.py (TTFT and a mixed load, with and without the connector), then the
#          harness GPU tests in the time left
#   overlap  benchmarks/worker_copy_overlap.py (an engine step behind a worker-copies store), with the default
#          CUDA_DEVICE_MAX_CONNECTIONS and with 32, then tests/gpu/test_pool_copier_gpu.py
#   all    tests, bench and pool (about 20 minutes: more than one 10-minute command; run the steps one by one there)
# LMCD_WHEELS=installed: lmcd and its dependencies are in /tmp/site already (installed with vLLM's).
# Every step is bounded by `timeout`; the servers a step starts are stopped at its end (and at exit).
# Everything each run prints is saved under $OUT.
set -uo pipefail
what=${1:-all}
case $what in tests | bench | pool | all | vllm-tests | vllm-bench | overlap) ;;
  *) echo "usage: OUT=dir $0 [tests|bench|pool|vllm-tests|vllm-bench|overlap|all]" >&2; exit 2 ;;
esac
T0=$(date +%s)
left() { echo $((${VLLM_SESSION_S:-540} - ($(date +%s) - T0))); }  # seconds left of this session step
OUT=${OUT:-/tmp/lmcd-gpu}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/session-$what.log") 2>&1  # everything this session prints, kept
export OUT PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
if [[ ${LMCD_WHEELS:-.whl} != installed ]]; then
  ls .whl/lmcd-*.whl > /dev/null 2>&1 || { echo "no lmcd wheel in .whl/: pip wheel --no-deps . -w .whl" >&2; exit 1; }
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
fi
export PYTHONPATH=/tmp/site
# Run from a copy that holds no source folders (core/ is lmcd, server/, connector/, kernels/), so that the lmcd
# imported is the installed wheel, never the checkout.
RUN=/tmp/lmcd-run
rm -rf "$RUN"; mkdir -p "$RUN/benchmarks"
cp -r tests pyproject.toml "$RUN/"; cp benchmarks/pool_register.py benchmarks/vllm_gpu_ttft.py benchmarks/worker_copy_overlap.py "$RUN/benchmarks/"
cd "$RUN" || exit 1

SERVERS=()  # pids of the `timeout` wrappers of servers still running
stop_server() {  # stop_server PID: TERM (timeout passes it on to the server), then KILL both after 20 s
  local pid=$1
  kill -TERM "$pid" 2> /dev/null
  for _ in $(seq 1 40); do kill -0 "$pid" 2> /dev/null || break; sleep 0.5; done
  if kill -0 "$pid" 2> /dev/null; then
    pkill -KILL -P "$pid" 2> /dev/null  # the server, the one child of this wrapper
    kill -KILL "$pid" 2> /dev/null
  fi
  wait "$pid" 2> /dev/null
  local left=()
  for other in ${SERVERS[@]+"${SERVERS[@]}"}; do [[ $other != "$pid" ]] && left+=("$other"); done
  SERVERS=(${left[@]+"${left[@]}"})
}
stop_all() { for pid in ${SERVERS[@]+"${SERVERS[@]}"}; do stop_server "$pid"; done; }
trap stop_all EXIT

{
  nvidia-smi --query-gpu=name,pci.bus_id,memory.total,driver_version --format=csv,noheader
  python3 -c 'import lmcd, torch, cupy; print("lmcd", lmcd.__version__, "from", lmcd.__file__, "| torch",
torch.__version__, "| cupy", cupy.__version__, "| gpus", torch.cuda.device_count())'
  df -h /dev/shm | tail -1
  free -g | head -2
} 2>&1 | tee "$OUT/machine.txt"

run_tests() {  # run_tests [SECONDS [PYTEST ARGS...]]: the GPU tests (all of tests/gpu unless named)
  local limit=${1:-540} timeout_flag=()
  shift || true
  local what=("$@")
  [[ ${#what[@]} -gt 0 ]] || what=(tests/gpu)
  if ((limit < 30)); then echo "gpu tests ${what[*]}: no time left"; return; fi
  python3 -c "import pytest_timeout" 2> /dev/null && timeout_flag=(--timeout 600)
  local log="$OUT/gpu-tests-$(echo "${what[*]}" | tr -c 'a-z0-9\n' '_' | cut -c1-40).log"
  timeout -k 10 "$limit" python3 -m pytest -p no:cacheprovider -m gpu "${what[@]}" -q -ra -W ignore::UserWarning \
    -o addopts="" --basetemp "/tmp/pt-$$-${#what[@]}" ${timeout_flag[@]+"${timeout_flag[@]}"} 2>&1 | tee "$log" | tail -40
  echo "gpu tests ${what[*]}: exit ${PIPESTATUS[0]}"
}

run_vllm_tests() {
  rm -rf /tmp/pt-vllm
  timeout -k 10 "$(($(left) - 20))" python3 -m pytest -p no:cacheprovider -m gpu tests/gpu/test_vllm_gpu.py -q -ra \
    -W ignore::UserWarning -o addopts="" --basetemp /tmp/pt-vllm 2>&1 | tee "$OUT/vllm-gpu-tests.log" | tail -60
  echo "vllm gpu tests: exit ${PIPESTATUS[0]}"
  # every driver's log and result (vLLM's, the servers'), without the model configs
  tar czf "$OUT/vllm-gpu-test-logs.tgz" --exclude=llama3-8b -C /tmp pt-vllm 2> /dev/null
  run_tests "$(($(left) - 10))" tests/gpu/test_cuda_worker_gpu.py tests/gpu/test_kernels_gpu.py
}

run_vllm_bench() {
  timeout -k 10 "$(($(left) - 20))" python3 benchmarks/vllm_gpu_ttft.py --out /tmp/vllm-bench \
    --arms "${VLLM_ARMS:-none,engine_driven,lmcache_driven}" --reps "${VLLM_REPS:-3}" --arm-timeout 200 2>&1 \
    | tee "$OUT/vllm-bench.log" | grep -v '^RESULT'
  echo "vllm bench: exit ${PIPESTATUS[0]}"
  tar czf "$OUT/vllm-bench-logs.tgz" --exclude=llama3-8b -C /tmp vllm-bench 2> /dev/null
  run_tests "$(($(left) - 10))" tests/gpu/test_cuda_worker_gpu.py tests/gpu/test_kernels_gpu.py
}

run_overlap() {
  for connections in default 32; do
    local env=()
    [[ $connections != default ]] && env=(CUDA_DEVICE_MAX_CONNECTIONS=$connections)
    echo "=== worker_copy_overlap.py, CUDA_DEVICE_MAX_CONNECTIONS $connections"
    env ${env[@]+"${env[@]}"} timeout -k 10 100 python3 benchmarks/worker_copy_overlap.py \
      --json "$OUT/overlap-$connections.json" 2>&1 | tee "$OUT/overlap-$connections.log"
    echo "worker_copy_overlap: exit ${PIPESTATUS[0]}"
  done
  run_tests 90 tests/gpu/test_pool_copier_gpu.py
}

bench() {  # bench NAME TRANSFER-MODE [SERVER-FLAGS...]: one fresh server, one lmcache bench against it
  local name=$1 mode=$2
  shift 2
  local log="$OUT/server-$name.log" port=""
  timeout -k 10 600 python3 -m lmcd server --host 127.0.0.1 --port 0 --http-port 0 --l1-size-gb 12 --cuda on "$@" \
    > "$log" 2>&1 &
  local spid=$!
  SERVERS+=("$spid")
  for _ in $(seq 1 240); do
    port=$(grep -oE "cache server is running on tcp://[^ ]+" "$log" | head -1 | sed 's/.*://')
    [[ -n $port ]] && break
    kill -0 "$spid" 2> /dev/null || break
    sleep 0.5
  done
  echo "=== $name: server --cuda on --l1-size-gb 12 $*; lmcache bench --device cuda --transfer-mode $mode --repeats 30 --load"
  if [[ -n $port ]]; then
    timeout -k 10 400 python3 -m lmcd bench --device cuda --host 127.0.0.1 --port "$port" --transfer-mode "$mode" \
      --repeats 30 --load --json > "$OUT/bench-$name.log" 2>&1
    echo "bench exit $?"
    grep -v '^{' "$OUT/bench-$name.log" | grep -v "LMCache INFO"
  else
    echo "the server did not start:"; tail -20 "$log"
  fi
  stop_server "$spid"
  grep -E "GPU workers|pinned|staging buffers|Registered KV cache" "$log" | head -5
}

run_bench() {  # each design twice, alternating, on fresh servers
  bench worker lmcache_driven --share-pool true
  bench server engine_driven
  bench worker-again lmcache_driven --share-pool true
  bench server-again engine_driven
  stop_all
}

run_pool() {
  timeout -k 10 450 python3 benchmarks/pool_register.py --sizes-gib 32,64,96 --procs 1,2,4 --max-seconds 400 2>&1 \
    | tee "$OUT/pool-register.log"
  echo "pool_register: exit ${PIPESTATUS[0]}"
}

[[ $what == tests || $what == all ]] && run_tests
[[ $what == vllm-tests ]] && run_vllm_tests
[[ $what == vllm-bench ]] && run_vllm_bench
[[ $what == overlap ]] && run_overlap
[[ $what == bench || $what == all ]] && run_bench
[[ $what == pool || $what == all ]] && run_pool
exit 0
