"""lmcd.server: the cache server daemon (config, request loop, pool, index, workers, HTTP sidecar).

Never imports torch: the server image stays small and starts fast.
"""
