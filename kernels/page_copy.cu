// lmcd page gather/scatter: copies whole KV pages between a worker's paged KV cache (GPU
// memory, opened through CUDA IPC) and pool slots (pinned host memory, used in place).
//
// One launch covers a whole request: every chunk, every plane (layer, or K/V plane of a
// layer) and every block of the chunk. Page (chunk c, plane l, block k of the chunk):
//
//   KV side   : layer_base[l] + block_ids[c * bpc + k] * block_stride
//   pool side : slots[c] + (l * bpc + k) * page_bytes        (a slot is plane-major)
//
// ``req`` packs the request's int64 arguments: ``num_chunks`` slot addresses, then
// ``num_chunks * bpc`` block ids. A page is copied by one CTA with 16-byte accesses, UNROLL
// loads in flight per thread before their stores (PCIe latency is hidden by many
// outstanding reads, not by many CTAs: a bounded grid of 16-32 CTAs saturates the link).
// The first ``skip_blocks`` blocks of chunk 0 are left alone (the engine already has them).
// The host validates every block id and the 16-byte alignment before it launches.
//
// The ``_one`` entries copy ONE chunk whose arguments travel inside the launch itself (a
// __grid_constant__ struct: the slot address, then the chunk's block ids), so a small request
// needs no argument upload before its kernel: one driver call from request to copy.

#ifndef MAX_INLINE_BLOCKS
#define MAX_INLINE_BLOCKS 64
#endif
struct OneChunk {
  long long words[1 + MAX_INLINE_BLOCKS];
};

#define UNROLL 4

template <typename V>
__device__ __forceinline__ void copy_pages(
    const long long* __restrict__ layer_base, const long long* __restrict__ req, int num_chunks,
    int num_planes, int bpc, long long page_bytes, long long block_stride, int skip_blocks,
    int to_pool) {
  const long long* slots = req;
  const long long* blocks = req + num_chunks;
  const long long total = (long long)num_chunks * num_planes * bpc;
  const long long vecs = page_bytes / (long long)sizeof(V);
  const long long step = (long long)blockDim.x * UNROLL;
  for (long long p = blockIdx.x; p < total; p += gridDim.x) {
    const int k = (int)(p % bpc);
    const long long t = p / bpc;
    const int l = (int)(t % num_planes);
    const int c = (int)(t / num_planes);
    if (c == 0 && k < skip_blocks) continue;
    char* kv = (char*)(layer_base[l] + blocks[(long long)c * bpc + k] * block_stride);
    char* pool = (char*)(slots[c] + ((long long)l * bpc + k) * page_bytes);
    const V* __restrict__ src = (const V*)(to_pool ? kv : pool);
    V* __restrict__ dst = (V*)(to_pool ? pool : kv);
    for (long long base = threadIdx.x; base < vecs; base += step) {
      V v[UNROLL];
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) {
        const long long i = base + (long long)u * blockDim.x;
        if (i < vecs) v[u] = src[i];
      }
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) {
        const long long i = base + (long long)u * blockDim.x;
        if (i < vecs) dst[i] = v[u];
      }
    }
  }
}

extern "C" __global__ void lmcd_page_copy_v16(
    const long long* __restrict__ layer_base, const long long* __restrict__ req, int num_chunks,
    int num_planes, int bpc, long long page_bytes, long long block_stride, int skip_blocks,
    int to_pool) {
  copy_pages<uint4>(layer_base, req, num_chunks, num_planes, bpc, page_bytes, block_stride,
                    skip_blocks, to_pool);
}

// Pages whose size or addresses are not 16-byte aligned (rare: odd head sizes in fp8).
extern "C" __global__ void lmcd_page_copy_v1(
    const long long* __restrict__ layer_base, const long long* __restrict__ req, int num_chunks,
    int num_planes, int bpc, long long page_bytes, long long block_stride, int skip_blocks,
    int to_pool) {
  copy_pages<unsigned char>(layer_base, req, num_chunks, num_planes, bpc, page_bytes,
                            block_stride, skip_blocks, to_pool);
}

extern "C" __global__ void lmcd_page_copy_one_v16(
    const long long* __restrict__ layer_base, const __grid_constant__ OneChunk chunk, int num_planes,
    int bpc, long long page_bytes, long long block_stride, int skip_blocks, int to_pool) {
  copy_pages<uint4>(layer_base, chunk.words, 1, num_planes, bpc, page_bytes, block_stride,
                    skip_blocks, to_pool);
}

extern "C" __global__ void lmcd_page_copy_one_v1(
    const long long* __restrict__ layer_base, const __grid_constant__ OneChunk chunk, int num_planes,
    int bpc, long long page_bytes, long long block_stride, int skip_blocks, int to_pool) {
  copy_pages<unsigned char>(layer_base, chunk.words, 1, num_planes, bpc, page_bytes, block_stride,
                            skip_blocks, to_pool);
}
