# vLLM with lmcd's connector (module lmcd.connector.vllm): the vllm/vllm-openai image plus this
# package, without dependencies (vLLM already has pyzmq, msgspec, numpy, fastapi, pyyaml, ...).
#   docker build -f deploy/vllm.Dockerfile -t lmcd-vllm .        (from the repository root)
# deploy/compose.yaml builds it; deploy/k8s/vllm-deployment.yaml runs it.
ARG VLLM_IMAGE=vllm/vllm-openai:latest
FROM ${VLLM_IMAGE}
COPY . /tmp/lmcd-src
RUN python3 -m pip install --no-cache-dir --no-deps /tmp/lmcd-src && rm -rf /tmp/lmcd-src \
    && python3 -c "import importlib.util as u; assert u.find_spec('lmcd.connector.vllm'), 'lmcd missing'"
