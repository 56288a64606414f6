#!/usr/bin/env bash
# Build the lmcd image and run it for real: health (HTTP and Docker's HEALTHCHECK), a store/retrieve
# bench from the host through the container's ports and shared /dev/shm, /status, /metrics and
# /clear-cache, a clean `docker stop` (exit code 0, nothing left in /dev/shm), checks inside the
# image (non-root, no torch, CuPy with NVRTC from PyPI), plain `docker run IMAGE` with its defaults
# (loopback), all interfaces refused without a token and served with a token file (the HTTP endpoints
# but /healthcheck need it), and `docker compose config` of deploy/compose.yaml. Reports the image size.
#
#   deploy/docker-smoke.sh            (as root, or as a user who can use docker)
#
# As root on Debian it installs what is missing (docker.io, docker-compose, debootstrap) and starts
# a dockerd of its own (vfs storage, no bridge, no iptables: containers use --network host), which it
# stops again at the end. When the base image cannot be pulled it builds it with debootstrap and
# `docker import`. Re-running reuses the installed docker, the base image and the build cache.
#
# Environment: LMCD_PYTHON (a Python with lmcd installed, for the bench; default: the repository's
# .venv, else python3), LMCD_IMAGE (default lmcd:smoke), BASE_IMAGE (default: the Dockerfile's),
# DEBIAN_MIRROR (for debootstrap), LMCD_SMOKE_RMI=1 (remove the built image afterwards).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
IMAGE=${LMCD_IMAGE:-lmcd:smoke}
CONTAINER=lmcd-smoke-$$
BASE_IMAGE=${BASE_IMAGE:-$(sed -n 's/^ARG BASE_IMAGE=//p' "$ROOT/Dockerfile")}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
WORK=$(mktemp -d /tmp/lmcd-smoke.XXXXXX)
DOCKERD_PID=""
COPIED_CERTS=()
T0=$SECONDS
export DOCKER_BUILDKIT=0  # the legacy builder is in every dockerd; BuildKit needs the buildx plugin

if [[ -n ${LMCD_PYTHON:-} ]]; then PYTHON=$LMCD_PYTHON
elif [[ -x $ROOT/.venv/bin/python ]]; then PYTHON=$ROOT/.venv/bin/python
else PYTHON=python3; fi

APT_UPDATED=0
POLICY_RC_D=""
# every docker command is bounded (`timeout` runs the docker binary, not this function); the long
# ones (build, import, pull) are called as `timeout N docker ...` with their own limit
docker() { timeout 120 docker "$@"; }

log() { printf '[docker-smoke %4ds] %s\n' $((SECONDS - T0)) "$*"; }
die() { printf '[docker-smoke] FAILED: %s\n' "$*" >&2; exit 1; }

cleanup() {
  local rc=$?
  set +e
  local name
  for name in "$CONTAINER" "$CONTAINER-default" "$CONTAINER-auth"; do
    docker container inspect "$name" >/dev/null 2>&1 || continue
    [[ $rc -ne 0 ]] && { echo "--- log of $name (last 40 lines)"; docker logs --tail 40 "$name" 2>&1; }
    timeout 60 docker rm -f "$name" >/dev/null 2>&1
  done
  [[ ${LMCD_SMOKE_RMI:-0} == 1 ]] && timeout 120 docker rmi -f "$IMAGE" >/dev/null 2>&1
  for cert in "${COPIED_CERTS[@]}"; do rm -f "$cert"; done
  [[ -n $POLICY_RC_D ]] && rm -f "$POLICY_RC_D"
  if [[ -n $DOCKERD_PID ]]; then
    log "stopping the dockerd this script started (pid $DOCKERD_PID)"
    kill -TERM "$DOCKERD_PID" 2>/dev/null
    for _ in $(seq 1 60); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 0.5; done
    kill -0 "$DOCKERD_PID" 2>/dev/null && { log "dockerd did not stop in 30 s: killing it"; kill -KILL "$DOCKERD_PID"; }
    umount /run/docker/netns/default 2>/dev/null  # the one mount dockerd leaves behind
  fi
  rm -rf "$WORK"
  [[ $rc -ne 0 ]] && echo "[docker-smoke] exit code $rc after $((SECONDS - T0)) s" >&2
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

apt_install() {  # apt_install PACKAGE...: Debian packages, without starting any service
  command -v apt-get >/dev/null || die "$* missing and this is not a Debian/Ubuntu machine (no apt-get): install $* yourself"
  log "installing $* (apt-get)"
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then  # no service starts from a package's install script
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
    POLICY_RC_D=/usr/sbin/policy-rc.d
  fi
  export DEBIAN_FRONTEND=noninteractive
  { [[ $APT_UPDATED == 1 ]] || timeout 300 apt-get update -qq; } > "$WORK/apt.log" 2>&1 && APT_UPDATED=1
  { [[ $APT_UPDATED == 1 ]] && timeout 600 apt-get install -y -qq --no-install-recommends "$@"; } \
    >> "$WORK/apt.log" 2>&1 || { tail -20 "$WORK/apt.log" >&2; \
      die "apt-get install $* failed (log above): check the network to the Debian mirror"; }
  if [[ -n $POLICY_RC_D ]]; then rm -f "$POLICY_RC_D"; POLICY_RC_D=""; fi
}

ensure_docker() {
  if timeout 20 docker info >/dev/null 2>&1; then
    log "using the running docker ($(docker info -f '{{.ServerVersion}}, storage {{.Driver}}'))"
    return
  fi
  [[ $(id -u) == 0 ]] || die "docker is not usable here (docker info failed) and this script is not root, so it \
cannot start a dockerd: run it as root, or start docker and give this user access to it"
  # debootstrap too (small): one apt-get run, in case the base image has to be built
  command -v dockerd >/dev/null || apt_install docker.io docker-compose debootstrap
  command -v docker >/dev/null || die "docker.io is installed but there is no docker command on PATH"
  if pgrep -x dockerd >/dev/null; then
    die "a dockerd is running but 'docker info' fails: check /var/run/docker.sock, or stop that dockerd"
  fi
  log "starting dockerd (vfs storage, no bridge, no iptables; log $WORK/dockerd.log)"
  mkdir -p /var/lib/docker
  # in a session of its own: a signal to this script's process group must not reach it before cleanup
  setsid dockerd --storage-driver vfs --bridge=none --iptables=false --ip-masq=false \
    --host unix:///var/run/docker.sock --pidfile "$WORK/dockerd.pid" > "$WORK/dockerd.log" 2>&1 &
  DOCKERD_PID=$!
  for _ in $(seq 1 60); do
    timeout 5 docker info >/dev/null 2>&1 && { log "dockerd is up ($(docker info -f '{{.ServerVersion}}'))"; return; }
    kill -0 "$DOCKERD_PID" 2>/dev/null || { tail -20 "$WORK/dockerd.log" >&2; DOCKERD_PID=""; \
      die "dockerd exited at start (log above)"; }
    sleep 0.5
  done
  tail -20 "$WORK/dockerd.log" >&2
  die "dockerd did not answer within 30 s (log above)"
}

ensure_base_image() {
  if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then log "base image $BASE_IMAGE is present"; return; fi
  if timeout 90 docker pull -q "$BASE_IMAGE" > "$WORK/pull.log" 2>&1; then log "pulled $BASE_IMAGE"; return; fi
  log "cannot pull $BASE_IMAGE ($(tail -1 "$WORK/pull.log")): building it with debootstrap"
  [[ $(id -u) == 0 ]] || die "$BASE_IMAGE cannot be pulled and building it with debootstrap needs root"
  [[ $BASE_IMAGE == debian:bookworm* ]] || die "$BASE_IMAGE cannot be pulled and only debian:bookworm* \
can be built here: pull it or set BASE_IMAGE=debian:bookworm-slim"
  command -v debootstrap >/dev/null || apt_install debootstrap
  local rootfs=$WORK/rootfs
  timeout 900 debootstrap --variant=minbase bookworm "$rootfs" "$DEBIAN_MIRROR" > "$WORK/debootstrap.log" 2>&1 \
    || { tail -20 "$WORK/debootstrap.log" >&2; die "debootstrap from $DEBIAN_MIRROR failed (log above)"; }
  # like the official slim image: no docs, man pages or package lists; updates and security sources
  rm -rf "$rootfs"/usr/share/{doc,man,info}/* "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin \
    "$rootfs"/var/log/*.log "$rootfs"/var/cache/debconf/*-old
  printf '%s\n' "deb $DEBIAN_MIRROR bookworm main" "deb $DEBIAN_MIRROR bookworm-updates main" \
    "deb http://deb.debian.org/debian-security bookworm-security main" > "$rootfs/etc/apt/sources.list"
  timeout 300 tar -C "$rootfs" -c . | timeout 300 docker import --change 'CMD ["bash"]' - "$BASE_IMAGE" >/dev/null \
    || die "docker import of the debootstrap root file system failed"
  rm -rf "$rootfs"
  log "built $BASE_IMAGE with debootstrap"
}

build_args() {  # proxies and a reachable package index, as the host uses them
  local name
  for name in HTTP_PROXY HTTPS_PROXY NO_PROXY http_proxy https_proxy no_proxy PIP_INDEX_URL PIP_EXTRA_INDEX_URL; do
    # only network URLs: a host's file:// index does not exist inside the build
    [[ -n ${!name:-} && ${!name} != *file:* ]] && printf -- '--build-arg\n%s=%s\n' "$name" "${!name}"
  done
  return 0
}

build_image() {
  local cert
  for cert in /usr/local/share/ca-certificates/*.crt; do
    [[ -f $cert ]] || continue
    local dest=$ROOT/deploy/certs/$(basename "$cert")
    [[ -e $dest ]] && continue
    cp "$cert" "$dest" && COPIED_CERTS+=("$dest")
  done
  [[ ${#COPIED_CERTS[@]} -gt 0 ]] && log "extra CA certificates for the build: ${COPIED_CERTS[*]##*/}"
  local args
  mapfile -t args < <(build_args)
  log "building $IMAGE from $BASE_IMAGE (log $WORK/build.log)"
  local started=$SECONDS
  timeout 1200 docker build --network host --build-arg BASE_IMAGE="$BASE_IMAGE" "${args[@]}" -t "$IMAGE" "$ROOT" \
    > "$WORK/build.log" 2>&1 \
    || { tail -30 "$WORK/build.log" >&2; die "docker build failed (log above); behind a TLS-inspecting proxy put \
its CA in deploy/certs/, and set HTTPS_PROXY or PIP_INDEX_URL when PyPI is reached through them"; }
  log "built $IMAGE in $((SECONDS - started)) s"
}

check_image() {
  local size
  size=$(docker image inspect -f '{{.Size}}' "$IMAGE")
  IMAGE_MB=$((size / 1000000))
  IMAGE_USER=$(docker image inspect -f '{{.Config.User}}' "$IMAGE")
  [[ -n $IMAGE_USER && ${IMAGE_USER%%:*} != 0 && ${IMAGE_USER%%:*} != root ]] \
    || die "the image's default user is '$IMAGE_USER', not a non-root user"
  log "image: $IMAGE_MB MB, default user $IMAGE_USER"
}

check_inside() {
  # In the running (read-only) container, as the image's default user, so that no second copy of the
  # file system is made (vfs): no torch, CuPy imports, the CUDA runtime and NVRTC come from the pip
  # wheels, NVRTC compiles the copy kernel (no GPU needed to compile), CuPy's cache dir is writable.
  timeout 120 docker exec -i --user "$IMAGE_USER" -e EXPECT_UID="${IMAGE_USER%%:*}" "$CONTAINER" /opt/venv/bin/python - \
    > "$WORK/image-check.log" 2>&1 <<'EOF' || { cat "$WORK/image-check.log" >&2; die "the checks inside the image failed (output above)"; }
import importlib.util, os, sys
assert os.getuid() == int(os.environ["EXPECT_UID"]) != 0, f"running as uid {os.getuid()}"
assert importlib.util.find_spec("torch") is None, "torch is installed in the image"
os.makedirs(os.environ["CUPY_CACHE_DIR"], exist_ok=True)  # writable with a read-only root file system
import cupy
from cuda.pathfinder import load_nvidia_dynamic_lib
from cupy_backends.cuda.libs import nvrtc
import lmcd.kernels
libs = {name: load_nvidia_dynamic_lib(name).abs_path for name in ("cudart", "nvrtc")}
assert all(path.startswith("/opt/venv/") for path in libs.values()), f"CUDA libraries not from the venv: {libs}"
program = nvrtc.createProgram(lmcd.kernels.source(), "page_copy.cu", [], [])
nvrtc.compileProgram(program, ["--std=c++17", "-arch=compute_80"])
ptx = nvrtc.getPTX(program)
assert b"lmcd_page_copy_v16" in (ptx if isinstance(ptx, bytes) else ptx.encode()), "kernel missing from the PTX"
print(f"uid {os.getuid()}, no torch, cupy {cupy.__version__}, NVRTC {'.'.join(map(str, nvrtc.getVersion()))} "
      f"compiled page_copy.cu ({len(ptx)} bytes of PTX), CUDA libraries from {os.path.commonpath(list(libs.values()))}")
EOF
  log "in the image: $(tail -1 "$WORK/image-check.log")"
}

validate_compose() {  # docker compose's own reading of deploy/compose.yaml (no daemon needed)
  local compose=()
  if timeout 20 docker compose version >/dev/null 2>&1; then compose=(docker compose)
  elif command -v docker-compose >/dev/null; then compose=(docker-compose)
  elif [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then apt_install docker-compose; compose=(docker-compose)
  else log "no docker compose here: deploy/compose.yaml is only checked as YAML (tests/deploy)"; return; fi
  HOME=${HOME:-/root} timeout 60 "${compose[@]}" -f "$ROOT/deploy/compose.yaml" config > "$WORK/compose.yaml" \
    2> "$WORK/compose.err" || { cat "$WORK/compose.err" >&2; die "${compose[*]} rejects deploy/compose.yaml"; }
  "$PYTHON" - "$WORK/compose.yaml" <<'EOF' || die "${compose[*]} config lost a required setting (above)"
import sys, yaml
services = yaml.safe_load(open(sys.argv[1]))["services"]
assert services["vllm"]["depends_on"]["lmcd"]["condition"] == "service_healthy", services["vllm"].get("depends_on")
for name, service in services.items():
    assert service["network_mode"] == "host" and service["ipc"] == "host", (name, service)
EOF
  log "${compose[*]} config: deploy/compose.yaml is valid (host network and IPC, vLLM waits for a healthy server)"
}

free_port() { "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

http() {  # http METHOD PATH: the body on stdout; fails unless 200
  "$PYTHON" - "$1" "http://127.0.0.1:$HTTP_PORT$2" <<'EOF'
import sys, urllib.request
with urllib.request.urlopen(urllib.request.Request(sys.argv[2], method=sys.argv[1]), timeout=10) as reply:
    sys.stdout.write(reply.read().decode())
EOF
}

run_server() {
  PORT=$(free_port); HTTP_PORT=$(free_port)
  [[ $PORT != "$HTTP_PORT" ]] || HTTP_PORT=$(free_port)
  ls /dev/shm > "$WORK/shm-before"
  # root in the container, but with no capabilities: the bench on the host runs as root, and a CPU
  # worker's SHM segments (mode 0600) can only be opened by the same user. A read-only root file
  # system, as in deploy/k8s/. A health check every second instead of the image's 15 s.
  log "docker run --network host --ipc host $IMAGE (ZMQ 127.0.0.1:$PORT, HTTP 127.0.0.1:$HTTP_PORT)"
  timeout 120 docker run -d --name "$CONTAINER" --network host --ipc host --user 0:0 --cap-drop ALL \
    --read-only --tmpfs /tmp --health-interval 1s --health-start-period 60s "$IMAGE" \
    /opt/venv/bin/lmcache server --host 127.0.0.1 --http-host 127.0.0.1 --port "$PORT" --http-port "$HTTP_PORT" \
    --l1-size-gb 1 --eviction-policy LRU --max-workers 2 >/dev/null || die "docker run failed"
  local started=$SECONDS
  until http GET /healthcheck > "$WORK/health.json" 2>/dev/null; do
    [[ $(docker inspect -f '{{.State.Running}}' "$CONTAINER") == true ]] \
      || die "the server container exited with $(docker inspect -f '{{.State.ExitCode}}' "$CONTAINER") at start"
    (( SECONDS - started < 90 )) || die "/healthcheck did not answer 200 within 90 s"
    sleep 0.5
  done
  grep -q '"healthy"' "$WORK/health.json" || die "/healthcheck answered $(cat "$WORK/health.json")"
  log "/healthcheck: $(cat "$WORK/health.json") after $((SECONDS - started)) s"
  until [[ $(docker inspect -f '{{.State.Health.Status}}' "$CONTAINER") == healthy ]]; do
    (( SECONDS - started < 60 )) || die "docker's HEALTHCHECK did not report healthy within 60 s: \
$(docker inspect -f '{{json .State.Health}}' "$CONTAINER")"
    sleep 0.5
  done
  log "docker HEALTHCHECK: healthy"
  docker logs "$CONTAINER" > "$WORK/server.log" 2>&1
  grep -q "LMCache cache server is running" "$WORK/server.log" || die "no 'cache server is running' line in the log"
  grep -q "GPU workers: off (CUDA is not usable\|GPU workers: on" "$WORK/server.log" \
    || die "the server did not find CuPy: $(grep 'GPU workers' "$WORK/server.log")"
  log "$(grep -o 'GPU workers: .*' "$WORK/server.log" | head -1)"
}

bench() {
  log "lmcache bench from the host ($PYTHON) against 127.0.0.1:$PORT"
  timeout 300 "$PYTHON" -m lmcd bench --host 127.0.0.1 --port "$PORT" --tokens 256,4096 --repeats 3 --layers 4 \
    --lookup-tokens 4096 --lookup-iters 50 --json > "$WORK/bench.log" 2>&1 \
    || { cat "$WORK/bench.log" >&2; die "lmcache bench against the container failed (output above)"; }
  grep -v '^{' "$WORK/bench.log" | grep -v INFO | sed 's/^/    /'
  tail -1 "$WORK/bench.log" | "$PYTHON" -c '
import json, sys
result = json.load(sys.stdin)
assert [r["tokens"] for r in result["results"]] == [256, 4096], result
assert all(r["store_gbps"] > 0 and r["retrieve_gbps"] > 0 for r in result["results"]), result
' || die "unexpected bench result: $(tail -1 "$WORK/bench.log")"
}

check_http() {
  http GET /status > "$WORK/status.json" || die "GET /status failed"
  local summary
  summary=$("$PYTHON" - "$WORK/status.json" <<'EOF'
import json, sys
status = json.load(open(sys.argv[1]))
counters, pool = status["counters"], status["pool"]
assert counters["stored_chunks"] > 0 and counters["retrieved_chunks"] > 0, counters
assert counters["stored_bytes"] > 0 and counters["retrieved_bytes"] > 0, counters
assert pool["capacity_bytes"] == 2**30 and 0 < pool["used_bytes"] <= pool["capacity_bytes"], pool
assert status["workers"] == [], status["workers"]  # the bench unregistered its workers
print(f"/status: {counters['stored_chunks']} chunks stored, {counters['retrieved_chunks']} retrieved, "
      f"{pool['num_chunks']} in the pool ({pool['used_bytes'] / 2**20:.0f} MiB of {pool['capacity_bytes'] / 2**20:.0f})")
EOF
) || die "unexpected /status: $(head -c 600 "$WORK/status.json")"
  log "$summary"
  http GET /metrics > "$WORK/metrics.txt" || die "GET /metrics failed"
  local name
  for name in lmcd_stored_bytes_total lmcd_retrieved_bytes_total lmcd_pool_used_bytes lmcd_request_seconds_count; do
    grep -Eq "^$name(\{[^}]*\})? [1-9]" "$WORK/metrics.txt" || die "/metrics has no positive $name"
  done
  log "/metrics: stored/retrieved bytes, pool usage and request latency exported"
  http POST /clear-cache > "$WORK/clear.json" || die "POST /clear-cache failed"
  grep -Eq '"num_chunks":[1-9]' "$WORK/clear.json" || die "POST /clear-cache answered $(cat "$WORK/clear.json")"
  log "POST /clear-cache: $(cat "$WORK/clear.json")"
}

orphaned_shm() {
  # lmcd segments that appeared during the run and that no live process holds (an owner keeps a
  # shared flock on its segment for as long as it lives): segments of other lmcd processes on this
  # machine are not this run's leftovers
  "$PYTHON" - "$WORK/shm-before" <<'EOF'
import fcntl, os, sys
before = set(open(sys.argv[1]).read().split())
for name in sorted(set(os.listdir("/dev/shm")) - before):
    if not name.startswith("lmcache_"):
        continue
    try:
        fd = os.open(os.path.join("/dev/shm", name), os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        continue  # removed meanwhile
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # only possible when no owner holds it
        print(name)
    except BlockingIOError:
        pass
    finally:
        os.close(fd)
EOF
}

stop_server() {
  local started=$SECONDS
  timeout 60 docker stop -t 30 "$CONTAINER" >/dev/null || die "docker stop failed"
  local code
  code=$(docker inspect -f '{{.State.ExitCode}}' "$CONTAINER")
  docker logs "$CONTAINER" > "$WORK/server.log" 2>&1
  [[ $code == 0 ]] || { tail -20 "$WORK/server.log" >&2; die "the server exited with $code on docker stop, not 0"; }
  grep -q "Received SIGTERM" "$WORK/server.log" || die "the server did not log the SIGTERM of docker stop"
  local left
  left=$(orphaned_shm) || die "cannot list /dev/shm"
  [[ -z $left ]] || die "SHM segments left in /dev/shm after the run: $left"
  log "docker stop: exit code 0 after $((SECONDS - started)) s, no SHM segments left"
}

check_default_run() {
  # plain `docker run IMAGE`: the image's CMD serves with the defaults on loopback, which needs no token
  # (here in a network namespace of its own), Docker's HEALTHCHECK finds the default HTTP port, stop exits 0
  local name=$CONTAINER-default started=$SECONDS
  timeout 120 docker run -d --name "$name" --network none --health-interval 1s "$IMAGE" >/dev/null \
    || die "plain docker run $IMAGE failed"
  until [[ $(docker inspect -f '{{.State.Health.Status}}' "$name") == healthy ]]; do
    [[ $(docker inspect -f '{{.State.Running}}' "$name") == true ]] \
      || die "plain docker run $IMAGE exited with $(docker inspect -f '{{.State.ExitCode}}' "$name")"
    (( SECONDS - started < 120 )) || die "plain docker run $IMAGE: not healthy within 120 s: \
$(docker inspect -f '{{json .State.Health}}' "$name")"
    sleep 0.5
  done
  docker logs "$name" > "$WORK/default.log" 2>&1
  grep -q "cache server is running on tcp://127.0.0.1:5555 .*HTTP http://127.0.0.1:8080" "$WORK/default.log" \
    || die "plain docker run $IMAGE does not serve on 127.0.0.1:5555 and :8080: $(grep 'is running' "$WORK/default.log")"
  timeout 60 docker stop -t 30 "$name" >/dev/null || die "docker stop $name failed"
  [[ $(docker inspect -f '{{.State.ExitCode}}' "$name") == 0 ]] || die "plain docker run $IMAGE: exit code \
$(docker inspect -f '{{.State.ExitCode}}' "$name") on docker stop"
  timeout 60 docker rm "$name" >/dev/null
  log "plain docker run $IMAGE: healthy on 127.0.0.1:5555 and :8080 after $((SECONDS - started)) s, exit code 0 on stop"
}

check_auth_beyond_loopback() {
  # all interfaces without a token: refused before anything binds (exit code 2, the flags named); with a
  # token file of mode 0400 (this user's, and the container runs as this user): healthy, /healthcheck
  # answers without the token, /status, /metrics and /clear-cache answer 401 without it and 200 with it
  local name=$CONTAINER-auth started=$SECONDS code=0 out
  local server=(/opt/venv/bin/lmcache server --host 0.0.0.0 --http-host 0.0.0.0 --l1-size-gb 0.25 --touch-pool false)
  out=$(timeout 120 docker run --rm --network none "$IMAGE" "${server[@]}" 2>&1) || code=$?
  [[ $code == 2 ]] || die "docker run $IMAGE --host 0.0.0.0 without a token exited with $code, not 2: $out"
  grep -q -- "--host 0.0.0.0 and --http-host 0.0.0.0: not a loopback address, and no auth token is set" <<<"$out" \
    || die "docker run $IMAGE --host 0.0.0.0 without a token: unexpected message: $out"
  log "docker run $IMAGE --host 0.0.0.0 --http-host 0.0.0.0 without a token: refused (exit code 2)"
  (umask 077 && "$PYTHON" -c 'import secrets; print(secrets.token_hex(32))' > "$WORK/token") && chmod 0400 "$WORK/token"
  timeout 120 docker run -d --name "$name" --network none --user "$(id -u):$(id -g)" --health-interval 1s \
    -v "$WORK/token:/run/lmcd/token:ro" -e LMCD_AUTH_TOKEN_FILE=/run/lmcd/token "$IMAGE" "${server[@]}" >/dev/null \
    || die "docker run $IMAGE with a token file failed"
  until [[ $(docker inspect -f '{{.State.Health.Status}}' "$name") == healthy ]]; do
    [[ $(docker inspect -f '{{.State.Running}}' "$name") == true ]] || die "docker run $IMAGE with a token file \
exited with $(docker inspect -f '{{.State.ExitCode}}' "$name"): $(docker logs --tail 5 "$name" 2>&1)"
    (( SECONDS - started < 120 )) || die "docker run $IMAGE with a token file: not healthy within 120 s"
    sleep 0.5
  done
  timeout 60 docker exec -i --user "$(id -u):$(id -g)" "$name" /opt/venv/bin/python - > "$WORK/auth.log" 2>&1 <<'EOF' \
    || { cat "$WORK/auth.log" >&2; die "the HTTP endpoints of the server with a token file (output above)"; }
import urllib.error, urllib.request
token = open("/run/lmcd/token").read().strip()
def code(method, path, headers):
    request = urllib.request.Request(f"http://127.0.0.1:8080{path}", method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.status
    except urllib.error.HTTPError as exc:
        return exc.code
routes = [("GET", "/healthcheck"), ("GET", "/status"), ("GET", "/metrics"), ("POST", "/clear-cache")]
got = {path: (code(method, path, {}), code(method, path, {"Authorization": f"Bearer {token}"})) for method, path in routes}
assert got == {"/healthcheck": (200, 200), "/status": (401, 200), "/metrics": (401, 200), "/clear-cache": (401, 200)}, got
print(", ".join(f"{path} {a}/{b}" for path, (a, b) in got.items()))
EOF
  docker logs "$name" > "$WORK/auth-server.log" 2>&1
  grep -q "Auth: token required (from --auth-token-file /run/lmcd/token)" "$WORK/auth-server.log" \
    || die "no 'Auth: token required' line in the log: $(grep -i auth "$WORK/auth-server.log")"
  if grep -qF -- "$(cat "$WORK/token")" "$WORK/auth-server.log"; then die "the server's log shows its token"; fi
  timeout 60 docker stop -t 30 "$name" >/dev/null || die "docker stop $name failed"
  [[ $(docker inspect -f '{{.State.ExitCode}}' "$name") == 0 ]] || die "the server with a token file: exit code \
$(docker inspect -f '{{.State.ExitCode}}' "$name") on docker stop"
  timeout 60 docker rm "$name" >/dev/null
  log "docker run $IMAGE with a token file on 0.0.0.0: healthy; without/with the token: $(tail -1 "$WORK/auth.log")"
}

"$PYTHON" -c 'import lmcd' 2>/dev/null || die "$PYTHON cannot import lmcd: set LMCD_PYTHON to a Python with lmcd installed"
ensure_docker
validate_compose
ensure_base_image
build_image
check_image
run_server
check_inside
bench
check_http
stop_server
check_default_run
check_auth_beyond_loopback
log "docker smoke test passed: image $IMAGE is $IMAGE_MB MB; total $((SECONDS - T0)) s"
