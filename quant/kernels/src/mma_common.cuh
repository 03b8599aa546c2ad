__device__ __forceinline__ uint32_t kvs_half2(float lo, float hi) {
  const __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

// The centroid pair (low nibble, high nibble) of byte k of `codes`, as fp16x2, from the calling lane's copy
// of a 256-entry table: one byte permute builds the shared-memory address (code byte in bits 8-15, the
// lane's column in bits 0-7), so a lookup is two instructions and lanes never share a bank.
__device__ __forceinline__ uint32_t kvs_lut(const unsigned char* table, uint32_t codes, uint32_t column, int k) {
  const uint32_t addr = __byte_perm(codes, column, 0x5504 | (k << 4));
  return *reinterpret_cast<const uint32_t*>(table + addr);
}

// The register table (REG_LUT): the 16 fp16 centroids as two byte planes, lo[i] / hi[i] holding the low / high
// bytes of centroids 4i..4i+3, so that a look-up is byte permutes and takes no shared memory. The shared table
// above is 64 KB a block, which allowed 3 blocks per SM (Nsight on an H200: 12 warps per SM, 75% of the cycles
// with no eligible warp).
struct KvsLut {
  uint32_t lo[4], hi[4];
};

__device__ __forceinline__ KvsLut kvs_make_lut(const float* cent) {
  KvsLut t;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint32_t a = kvs_half2(__ldg(cent + 4 * i), __ldg(cent + 4 * i + 1));
    const uint32_t b = kvs_half2(__ldg(cent + 4 * i + 2), __ldg(cent + 4 * i + 3));
    t.lo[i] = __byte_perm(a, b, 0x6420);
    t.hi[i] = __byte_perm(a, b, 0x7531);
  }
  return t;
}

// The centroid pairs (as fp16x2) of codes 0-1 and 2-3 of x's low 16 bits: a code's low 3 bits pick a byte in
// each half of a plane, its bit 3 picks the half; the planes' bytes are then interleaved into halves.
__device__ __forceinline__ void kvs_dq4(const KvsLut& t, uint32_t x, uint32_t& p01, uint32_t& p23) {
  const uint32_t sel = x & 0x7777u, pick = 0x3210u | ((x >> 1) & 0x4444u);
  const uint32_t lo = __byte_perm(__byte_perm(t.lo[0], t.lo[1], sel), __byte_perm(t.lo[2], t.lo[3], sel), pick);
  const uint32_t hi = __byte_perm(__byte_perm(t.hi[0], t.hi[1], sel), __byte_perm(t.hi[2], t.hi[3], sel), pick);
  p01 = __byte_perm(lo, hi, 0x5140);
  p23 = __byte_perm(lo, hi, 0x7362);
}

// The centroid pairs of bytes 2·half and 2·half + 1 of `codes`, from the registers (REG) or the lane's column
// of the shared table.
template <bool REG>
__device__ __forceinline__ void kvs_pairs(const KvsLut& lut, const unsigned char* table, uint32_t column,
                                          uint32_t codes, int half, uint32_t& p0, uint32_t& p1) {
  if constexpr (REG) {
    kvs_dq4(lut, codes >> (16 * half), p0, p1);
  } else {
    p0 = kvs_lut(table, codes, column, 2 * half);
    p1 = kvs_lut(table, codes, column, 2 * half + 1);
  }
}

template <int NW>
__device__ __forceinline__ void kvs_load_codes(const uint8_t* p, int64_t step, bool vec, uint32_t (&w)[NW]) {
  if (vec) {
    kvs_load<NW>(p, w);
  } else {
#pragma unroll
    for (int i = 0; i < NW; ++i)
      w[i] = uint32_t(p[(4 * i) * step]) | (uint32_t(p[(4 * i + 1) * step]) << 8) |
             (uint32_t(p[(4 * i + 2) * step]) << 16) | (uint32_t(p[(4 * i + 3) * step]) << 24);
  }
}

