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


// Coordinate `word` of a token's code row (mma_coded.cu): bit offset (bits 0-11), width (12-15), first entry of
// its run's codebook in `table` (16-31); a width of 0 is a padding coordinate. A code of up to 8 bits spans at
// most two bytes of the row (rows are padded by a byte).
__device__ __forceinline__ float kvs_coded(const uint8_t* row, int word, const float* table) {
  const int bits = (word >> 12) & 15;
  if (bits == 0) return 0.0f;
  const int off = word & 4095;
  const int v = (row[off >> 3] | (row[(off >> 3) + 1] << 8)) >> (off & 7);
  return table[(word >> 16) + (v & ((1 << bits) - 1))];
}

// Lane `lane`'s words of a 16-token tile's code rows (rb bytes a row, 4·rb words a tile, at most 32·C; rows of
// tokens tau.., one span when `full`: the rows are rb bytes apart and word-aligned), bytes past token `end` zero.
template <int C, typename S>
__device__ __forceinline__ void kvs_load_span(const uint8_t* p, int rb, S token_stride, S byte_stride, int tau,
                                              int end, bool full, int lane, uint32_t (&w)[C]) {
#pragma unroll
  for (int j = 0; j < C; ++j) {
    const int i = lane + 32 * j;
    w[j] = 0u;
    if (i < 4 * rb) {
      if (full) {
        w[j] = __ldg(reinterpret_cast<const unsigned int*>(p + tau * rb) + i);
      } else {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int tok = (4 * i + e) / rb, byte = 4 * i + e - tok * rb;
          if (tau + tok < end) w[j] |= uint32_t(p[(tau + tok) * token_stride + byte * byte_stride]) << (8 * e);
        }
      }
    }
  }
}

// sin and cos of an angle of up to ~1e6 radians, reduced to [-π, π] first (two-part 2π, exact products in the
// FMAs) so that the fast hardware functions stay accurate: RoPE angles reach 1.3e5 at 128K positions.
__device__ __forceinline__ void kvs_sincos(float x, float& s, float& c) {
  const float k = rintf(x * 0.15915494309189535f);
  float r = fmaf(-k, 6.28318548202514648f, x);  // 2π rounded up to fp32
  r = fmaf(k, 1.7484556000744883e-07f, r);  // what that rounding added
  s = __sinf(r);
  c = __cosf(r);
}

// A step of the online softmax (base 2) of a warp's rows 2t and 2t+1 (tokens over lanes g): the lane's new maxima
// mx0 / mx1 reduced over the lanes that share its rows, the running sums l and the accumulators o (MT tiles of
// m16n8 fragments holding rows 2t, 2t+1) scaled to the new maxima m; base0 / base1: what this step's scores are
// exponentiated against.
template <int MT>
__device__ __forceinline__ void kvs_softmax_rescale(float mx0, float mx1, float (&m)[2], float (&l)[2],
                                                    float (&o)[MT][4], float& base0, float& base1) {
#pragma unroll
  for (int off = 4; off < 32; off <<= 1) {
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, off));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, off));
  }
  base0 = kvs_finite_or_zero(mx0);
  base1 = kvs_finite_or_zero(mx1);
  const float c0 = kvs_exp2(m[0] - base0), c1 = kvs_exp2(m[1] - base1);
  m[0] = mx0;
  m[1] = mx1;
  l[0] *= c0;
  l[1] *= c1;
  if (__any_sync(0xffffffffu, c0 != 1.0f || c1 != 1.0f)) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      o[mt][0] *= c0;
      o[mt][1] *= c1;
      o[mt][2] *= c0;
      o[mt][3] *= c1;
    }
  }
}
