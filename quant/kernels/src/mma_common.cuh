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

