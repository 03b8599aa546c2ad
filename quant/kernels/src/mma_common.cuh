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

// Centroid pair j of a lane's codes `words` from its table column: at 4 bits byte j (two codes) of the words,
// looked up in a 256-row table; at 2 bits nibble j (two codes), in a 16-row table (rows 256 bytes apart in both).
template <int BITS>
__device__ __forceinline__ uint32_t kvs_pair(const unsigned char* table, const uint32_t* words, uint32_t column,
                                             int j) {
  if constexpr (BITS == 4) {
    return kvs_lut(table, words[j / 4], column, j % 4);
  } else {
    const uint32_t w = words[j / 8];
    const int at = 4 * (j % 8);  // the nibble's first bit, moved to bit 8
    const uint32_t row = at >= 8 ? w >> (at - 8) : w << (8 - at);
    return *reinterpret_cast<const uint32_t*>(table + ((row & 0xF00u) | column));
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

// A lane's BYTES bytes of one token's codes: BYTES / 4 words, or under a word (2-bit values at head_dim 64) the
// low half of one.
template <int BYTES>
__device__ __forceinline__ void kvs_load_bytes(const uint8_t* p, int64_t step, bool vec,
                                               uint32_t (&w)[BYTES >= 4 ? BYTES / 4 : 1]) {
  if constexpr (BYTES >= 4) {
    kvs_load_codes<BYTES / 4>(p, step, vec, w);
  } else if (vec) {
    static_assert(BYTES == 2, "whole words, or half of one");
    w[0] = __ldg(reinterpret_cast<const unsigned short*>(p));
  } else {
    w[0] = uint32_t(p[0]) | (uint32_t(p[step]) << 8);
  }
}

