// lmcd page copy: moves the KV pages of ONE chunk between a worker's paged KV cache and a
// staging buffer in GPU memory, inside GPU memory. The staging buffer crosses PCIe as one
// contiguous copy (lmcd.kernels.staged); this kernel only gathers (to_pool) or scatters pages.
//
// A launch covers up to MAX_LAUNCH_BLOCKS consecutive blocks of the chunk (a chunk of more
// blocks takes several launches), every plane. Page (plane l, block k of this launch):
//
//   KV side     : planes[l] + pages.words[1 + k] * block_stride
//   buffer side : pages.words[0] + (l * chunk_blocks + k) * page_bytes     (a chunk is plane-major)
//
// ``pages`` travels inside the launch (a __grid_constant__ struct: the buffer address of this
// launch's first block, then its block ids), so no argument upload comes before a kernel. The
// first ``skip`` blocks of the launch are left alone (the engine has them already). A page is
// copied by one CTA with 16-byte accesses (the _v16 entry; _v1 for unaligned pages, rare: odd
// head sizes in fp8), UNROLL loads in flight per thread before their stores. The host checks
// every block id and the alignment before it launches.

#ifndef MAX_LAUNCH_BLOCKS
#define MAX_LAUNCH_BLOCKS 64
#endif
struct Pages {
  long long words[1 + MAX_LAUNCH_BLOCKS];
};

#define UNROLL 4

template <typename V>
__device__ __forceinline__ void copy_pages(
    const long long* __restrict__ planes, const Pages& pages, int num_planes, int chunk_blocks,
    int num_blocks, long long page_bytes, long long block_stride, int skip, int to_pool) {
  const long long total = (long long)num_planes * num_blocks;
  const long long vecs = page_bytes / (long long)sizeof(V);
  const long long step = (long long)blockDim.x * UNROLL;
  for (long long p = blockIdx.x; p < total; p += gridDim.x) {
    const int k = (int)(p % num_blocks);
    const int l = (int)(p / num_blocks);
    if (k < skip) continue;
    char* kv = (char*)(planes[l] + pages.words[1 + k] * block_stride);
    char* buf = (char*)(pages.words[0] + ((long long)l * chunk_blocks + k) * page_bytes);
    const V* __restrict__ src = (const V*)(to_pool ? kv : buf);
    V* __restrict__ dst = (V*)(to_pool ? buf : kv);
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
    const long long* __restrict__ planes, const __grid_constant__ Pages pages, int num_planes,
    int chunk_blocks, int num_blocks, long long page_bytes, long long block_stride, int skip,
    int to_pool) {
  copy_pages<uint4>(planes, pages, num_planes, chunk_blocks, num_blocks, page_bytes, block_stride,
                    skip, to_pool);
}

extern "C" __global__ void lmcd_page_copy_v1(
    const long long* __restrict__ planes, const __grid_constant__ Pages pages, int num_planes,
    int chunk_blocks, int num_blocks, long long page_bytes, long long block_stride, int skip,
    int to_pool) {
  copy_pages<unsigned char>(planes, pages, num_planes, chunk_blocks, num_blocks, page_bytes,
                            block_stride, skip, to_pool);
}
