#!/usr/bin/env bash
# One GPU-machine session: GPU tests, then the GPU bench variants (idle and under matmul load).
# Usage on the GPU machine, from the repository root, with the wheels from
# ../shared/gpu/fetch-wheels.sh plus `pip wheel --no-deps . -w .whl` carried in .whl/:
#   OUT=/some/dir bash benchmarks/gpu_session.sh [tests|bench|all|final|one|quick|debug|trace|timeline|probe|latency|worker|worker-bench|worker-profile]
set -uo pipefail
what=${1:-all}
OUT=${OUT:-/tmp/lmcd-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
export PYTHONPATH=/tmp/site
# run from a copy without the source folders, so that the installed lmcd is the one imported
cp benchmarks/gpu_trace.py /tmp/lmcd-trace.py; cp benchmarks/gpu_probe.py /tmp/lmcd-probe.py; cp benchmarks/request_path.py /tmp/lmcd-request-path.py; cp benchmarks/worker_profile.py /tmp/lmcd-worker-profile.py
RUN=/tmp/lmcd-run; rm -rf $RUN; mkdir -p $RUN; cp -r tests pyproject.toml $RUN/; cd $RUN
nvidia-smi --query-gpu=name,pci.bus_id,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c 'import torch, cupy; print("torch", torch.__version__, "cupy", cupy.__version__, "gpus", torch.cuda.device_count())'
grep -n "cuMemcpyBatchAsync" /usr/local/cuda/include/cuda.h 2>/dev/null | head -5

if [[ $what == tests || $what == all || $what == quick || $what == final ]]; then
  timeout 420 python3 -m pytest -p no:cacheprovider -m gpu tests/gpu/test_kernels_gpu.py tests/gpu/test_cuda_worker_gpu.py -q -W ignore::UserWarning \
    -o addopts="" --timeout 200 2>&1 | tee "$OUT/gpu-tests.log" | tail -40
fi

bench() {  # bench NAME SERVER-FLAGS... -- BENCH-FLAGS...
  local name=$1; shift
  local sflags=() bflags=()
  while [[ $# -gt 0 && $1 != -- ]]; do sflags+=("$1"); shift; done
  shift || true
  bflags=("$@")
  local port=$((5600 + RANDOM % 300))
  python3 -m lmcd server --host 127.0.0.1 --port $port --http-port 0 --l1-size-gb 12 --cuda on "${sflags[@]}" \
    > "$OUT/server-$name.log" 2>&1 &
  local spid=$!
  for _ in $(seq 1 120); do grep -q "cache server is running" "$OUT/server-$name.log" && break; sleep 0.5; done
  echo "=== $name: server ${sflags[*]}; bench ${bflags[*]}"
  timeout 240 python3 -m lmcd bench --device cuda --host 127.0.0.1 --port $port --json "${bflags[@]}" \
    2>&1 | tee "$OUT/bench-$name.log" | grep -v '^{' | grep -v "LMCache INFO"
  kill -TERM $spid; wait $spid
  grep -E "Pinning|pinned|GPU workers" "$OUT/server-$name.log" | head -3
}

if [[ $what == one ]]; then
  bench staged -- --repeats 20 --load
fi
if [[ $what == debug ]]; then
  bench debug --log-level DEBUG -- --repeats 10 --tokens 256,4096
  grep -E "launched|Replied to (store|retrieve)|submit us" "$OUT/server-debug.log" | tail -12
fi
if [[ $what == quick ]]; then
  bench staged -- --repeats 10 --load --in-process --in-process-ctas 16
fi
if [[ $what == bench || $what == all ]]; then
  bench staged -- --repeats 20 --load --in-process --in-process-ctas 16
  bench kernel16 --copy-engine kernel --copy-ctas 16 -- --repeats 20 --load
  bench kernel132 --copy-engine kernel --copy-ctas 132 -- --repeats 10 --tokens 4096,16384 --load --in-process \
    --in-process-ctas 132
  bench dma --copy-engine dma -- --repeats 20 --load
fi
if [[ $what == trace ]]; then
  timeout 400 python3 /tmp/lmcd-trace.py --tokens ${TRACE_TOKENS:-256,4096,16384} --repeats 20 2>&1 | grep -v "LMCache INFO" | tee "$OUT/trace.log"
fi
if [[ $what == final ]]; then  # the default twice (two servers), then the other engines
  bench staged -- --repeats 30 --load
  bench staged-again -- --repeats 30 --load
  bench kernel16 --copy-engine kernel --copy-ctas 16 -- --repeats 20 --load
  bench dma --copy-engine dma -- --repeats 20 --load
  timeout 120 python3 /tmp/lmcd-trace.py --timeline --tokens 256,4096 --repeats 30 2>&1 | grep -v "LMCache INFO" \
    | tee "$OUT/timeline.log"
fi
if [[ $what == worker ]]; then  # the worker copying itself through the shared pool, then the server copying
  df -h /dev/shm | tail -1
  timeout 300 python3 -m pytest -p no:cacheprovider -m gpu tests/gpu/test_cuda_worker_gpu.py -q -W ignore::UserWarning \
    -o addopts="" --timeout 200 2>&1 | tee "$OUT/gpu-tests.log" | tail -25
  bench worker --share-pool true -- --transfer-mode lmcache_driven --repeats 30 --load
  bench staged -- --repeats 30 --load
fi
if [[ $what == worker-bench ]]; then  # worker copies twice (two servers), the server's staged copies once
  bench worker --share-pool true -- --transfer-mode lmcache_driven --repeats 30 --load
  bench worker-again --share-pool true -- --transfer-mode lmcache_driven --repeats 30 --load
  bench staged -- --repeats 30 --load
fi
if [[ $what == worker-profile ]]; then  # where the self-copying worker's host time goes
  port=$((5600 + RANDOM % 300))
  python3 -m lmcd server --host 127.0.0.1 --port $port --http-port 0 --l1-size-gb 4 --cuda on --share-pool true \
    > "$OUT/server-profile.log" 2>&1 &
  spid=$!
  for _ in $(seq 1 120); do grep -q "cache server is running" "$OUT/server-profile.log" && break; sleep 0.5; done
  timeout 200 python3 /tmp/lmcd-worker-profile.py --host 127.0.0.1 --port $port --tokens ${TRACE_TOKENS:-256} \
    --rounds 200 2>&1 | grep -v "LMCache INFO" | tee "$OUT/worker-profile.log" | head -60
  kill -TERM $spid; wait $spid
fi
if [[ $what == probe ]]; then
  timeout 150 python3 /tmp/lmcd-probe.py staged 2>&1 | tee "$OUT/probe-staged.log"
  timeout 120 python3 /tmp/lmcd-probe.py pool 2>&1 | tee "$OUT/probe-pool.log"
fi
if [[ $what == timeline ]]; then  # TRACE_FLAGS: server flags; LMCD_TRACE_SPIN / LMCD_TRACE_CPU_WAIT: experiments
  timeout 200 python3 /tmp/lmcd-trace.py --timeline --tokens ${TRACE_TOKENS:-256,4096} --repeats 30 ${TRACE_FLAGS:-} 2>&1 \
    | grep -v "LMCache INFO" | tee "$OUT/timeline.log"
fi
if [[ $what == latency ]]; then
  timeout 120 python3 /tmp/lmcd-request-path.py --requests 2000 2>&1 | tail -30 | tee "$OUT/request-path.log"
fi
