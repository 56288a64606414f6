# lmcd server image: Debian slim, a venv at /opt/venv with lmcd[cuda12] (CuPy, CUDA runtime and
# NVRTC from PyPI; the driver comes from the NVIDIA container runtime), no torch, a non-root user.
#
#   docker build -t lmcd .
#   docker run --network host --ipc host lmcd                      # the defaults below, on 127.0.0.1
#   docker run --runtime nvidia --gpus all --network host --ipc host lmcd \
#     /opt/venv/bin/lmcache server --l1-size-gb 60 --eviction-policy LRU --max-workers 4 --port 6555
#   docker run -p 5555:5555 -p 8080:8080 -v /etc/lmcd/token:/run/lmcd/token:ro \
#     -e LMCD_AUTH_TOKEN_FILE=/run/lmcd/token lmcd /opt/venv/bin/lmcache server --host 0.0.0.0 --http-host 0.0.0.0
#     (beyond loopback the server needs a token: a file of mode 0600 readable by the container's user,
#     or LMCD_AUTH_TOKEN; --insecure-no-auth true is the opt-out for trusted networks)
#
# Build arguments: BASE_IMAGE (a Debian 12 image), LMCD_EXTRA (the pip extra: cuda12, cuda13, or
# empty for a CPU-only image). Extra CA certificates for builds behind a TLS-inspecting proxy go in
# deploy/certs/*.crt; HTTP(S)_PROXY and PIP_INDEX_URL pass through as build arguments.
# deploy/docker-smoke.sh builds this image and runs it for real.

ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}

ARG LMCD_EXTRA=cuda12
ARG PIP_INDEX_URL=
ARG PIP_EXTRA_INDEX_URL=

# Metadata first: with the legacy builder every instruction after the big RUN copies the whole
# file system once more on some storage drivers (vfs), so only USER comes after it.
# CuPy caches compiled kernels under /tmp, which stays writable with a read-only root file system
# (docker run --read-only --tmpfs /tmp; Kubernetes: readOnlyRootFilesystem and an emptyDir on /tmp).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    CUPY_CACHE_DIR=/tmp/cupy-kernel-cache \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
EXPOSE 5555 8080
# The HTTP sidecar's address comes from the server's own flags, environment and --config file
# (deploy/healthcheck.py reads them from PID 1). Pinning a large pool takes a while: start period.
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD ["/opt/venv/bin/python", "/opt/venv/bin/lmcd-healthcheck"]
# Loopback by default: with --network host (next to vLLM, as in LMCache's Docker quick start) the host's
# 127.0.0.1. The server refuses a non-loopback --host/--http-host without a token (see the example above).
CMD ["/opt/venv/bin/lmcache", "server", "--host", "127.0.0.1", "--http-host", "127.0.0.1"]

# Only what .dockerignore lets through: the package sources, pyproject.toml, README.md,
# deploy/certs/ and deploy/healthcheck.py.
COPY . /tmp/lmcd-src

# One layer: system Python and CA certificates, extra CAs, the venv with lmcd, a non-root user.
# Removed from NVIDIA's wheels: static libraries and NVRTC's alternative build (*.alt.so), which
# nothing loads (120 MB); pip and setuptools, which the server does not need.
RUN set -eux; \
    export DEBIAN_FRONTEND=noninteractive; \
    [ -n "$PIP_INDEX_URL" ] || unset PIP_INDEX_URL; \
    [ -n "$PIP_EXTRA_INDEX_URL" ] || unset PIP_EXTRA_INDEX_URL; \
    apt-get update; \
    apt-get install -y --no-install-recommends python3 python3-venv ca-certificates; \
    rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/apt /var/log/dpkg.log; \
    find /tmp/lmcd-src/deploy/certs -name '*.crt' -exec cp {} /usr/local/share/ca-certificates/ \; ; \
    update-ca-certificates; \
    python3 -m venv /opt/venv; \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore \
      /opt/venv/bin/pip install --no-cache-dir "/tmp/lmcd-src${LMCD_EXTRA:+[$LMCD_EXTRA]}"; \
    /opt/venv/bin/pip uninstall -y -q pip setuptools; \
    find /opt/venv/lib/python3*/site-packages/nvidia \( -name '*.a' -o -name '*.alt.so*' \) -delete 2>/dev/null || true; \
    install -m 0755 /tmp/lmcd-src/deploy/healthcheck.py /opt/venv/bin/lmcd-healthcheck; \
    rm -rf /tmp/lmcd-src; \
    useradd --system --uid 10001 --user-group --home-dir /var/lib/lmcd --create-home --shell /usr/sbin/nologin lmcd; \
    /opt/venv/bin/lmcache --version

USER 10001:10001
