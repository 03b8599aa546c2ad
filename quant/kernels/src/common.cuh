template <int NW>
__device__ __forceinline__ void kvs_load(const uint8_t* p, uint32_t (&w)[NW]) {
  if constexpr (NW == 4) {
    const uint4 v = __ldg(reinterpret_cast<const uint4*>(p));
    w[0] = v.x; w[1] = v.y; w[2] = v.z; w[3] = v.w;
  } else if constexpr (NW == 2) {
    const uint2 v = __ldg(reinterpret_cast<const uint2*>(p));
    w[0] = v.x; w[1] = v.y;
  } else {
    w[0] = __ldg(reinterpret_cast<const unsigned int*>(p));
  }
}

// Code c of a lane's little-endian bit stream (c and BITS are compile-time constants once unrolled).
template <int BITS, int NW>
__device__ __forceinline__ int kvs_code(const uint32_t (&w)[NW], int c) {
  return (w[(c * BITS) >> 5] >> ((c * BITS) & 31)) & ((1 << BITS) - 1);
}

__device__ __forceinline__ float kvs_finite_or_zero(float m) {
  return m == -cuda::std::numeric_limits<float>::infinity() ? 0.0f : m;
}

// One warp's Hadamard transform (Sylvester order, unnormalised) of a row held E = D / 32 coordinates per
// lane: butterflies in registers below E, shuffles above.
template <int D>
__device__ __forceinline__ void kvs_hadamard_row(float (&v)[D / 32], int lane) {
  constexpr int E = D / 32;
#pragma unroll
  for (int len = 1; len < E; len <<= 1)
#pragma unroll
    for (int e = 0; e < E; ++e)
      if ((e & len) == 0) {
        const float a = v[e], c = v[e + len];
        v[e] = a + c;
        v[e + len] = a - c;
      }
#pragma unroll
  for (int len = E; len < D; len <<= 1) {
    const int partner = len / E;
    const bool upper = lane & partner;
#pragma unroll
    for (int e = 0; e < E; ++e) {
      const float other = __shfl_xor_sync(0xffffffffu, v[e], partner);
      v[e] = upper ? other - v[e] : v[e] + other;
    }
  }
}

// TurboQuant-MSE encode of one row (vector) by one warp: lane l holds coordinates [l·E, (l+1)·E), E = D / 32.
// Norm by warp reduction; the rotation's rounds as in-register butterflies (partners closer than E) and
// shuffles (farther); then the count of boundaries below each coordinate, packed little-endian into the
// lane's E·BITS/8 bytes. Rows past the end return (whole warps, so the shuffles stay converged).
// A lane's LANE_BITS bits of a row's little-endian code stream, written to the row's bytes. Under a byte per lane
// (head_dim 64 at 2 bits: 4 bits a lane), neighbouring lanes first gather their bits into the first of them.
template <int LANE_BITS>
__device__ __forceinline__ void kvs_store_codes(uint32_t packed, uint8_t* out, int lane) {
  if constexpr (LANE_BITS % 8 == 0) {
#pragma unroll
    for (int i = 0; i < LANE_BITS / 8; ++i) out[lane * (LANE_BITS / 8) + i] = static_cast<uint8_t>(packed >> (8 * i));
  } else {
    constexpr int GROUP = 8 / LANE_BITS;
    const uint32_t mine = packed;
#pragma unroll
    for (int k = 1; k < GROUP; ++k) packed |= __shfl_down_sync(0xffffffffu, mine, k) << (k * LANE_BITS);
    if (lane % GROUP == 0) out[lane / GROUP] = static_cast<uint8_t>(packed);
  }
}

// TurboQuant-MSE codes of a warp's row of norm nrm (lane l holds coordinates [l·E, (l+1)·E)): the unit vector
// rotated (the rounds as in-register butterflies and shuffles), then the count of boundaries below each
// coordinate, packed little-endian; v is left holding the rotated unit vector.
template <int D, int BITS, int ROUNDS>
__device__ __forceinline__ uint32_t kvs_quantize_lane(float (&v)[D / 32], float nrm, const float* signs,
                                                      const float* sb, int lane) {
  constexpr int E = D / 32;
  const float inv = 1.0f / fmaxf(nrm, 1e-12f);
#pragma unroll
  for (int e = 0; e < E; ++e) v[e] *= inv;
#pragma unroll
  for (int rd = 0; rd < ROUNDS; ++rd) {
#pragma unroll
    for (int e = 0; e < E; ++e) v[e] *= signs[rd * D + lane * E + e];
    kvs_hadamard_row<D>(v, lane);
#pragma unroll
    for (int e = 0; e < E; ++e) v[e] *= rsqrtf(static_cast<float>(D));
  }
  uint32_t packed = 0;
#pragma unroll
  for (int e = 0; e < E; ++e) {
    uint32_t code = 0;
#pragma unroll
    for (int i = 0; i < (1 << BITS) - 1; ++i) code += v[e] > sb[i] ? 1u : 0u;
    packed |= code << (e * BITS);
  }
  return packed;
}

// REFIT (klt): x is already in the coded domain (no rotation); the scale kept is not ‖x‖ but the least-squares
// gain g = Σ x·ĉ / Σ ĉ² of the chosen centroids ĉ (sc), and the codes are chosen again for x / g and g refitted,
// as KLT.encode does for a single run of equal bits.
template <int D, int BITS, int ROUNDS, bool REFIT, typename T, typename S, typename St>
__device__ __forceinline__ void kvs_encode_row(const T* x, const S& shape, const St& strides, const float* signs,
                                               const float* sb, const float* sc, uint8_t* idx, __half* norm,
                                               int64_t row, int lane) {
  constexpr int E = D / 32;
  const int H = shape[1], T_ = shape[2];
  if (row >= static_cast<int64_t>(shape[0]) * H * T_) return;
  const int t = row % T_, h = (row / T_) % H;
  const int64_t b = row / (static_cast<int64_t>(T_) * H);
  const int64_t base = b * strides[0] + h * strides[1] + t * strides[2];
  float v[E];
  float ss = 0.0f;
#pragma unroll
  for (int e = 0; e < E; ++e) {
    v[e] = static_cast<float>(x[base + (lane * E + e) * strides[3]]);
    ss += v[e] * v[e];
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, off);
  float nrm = sqrtf(ss);
  if constexpr (REFIT) {
    uint32_t packed = 0;
    for (int round = 0; round < 2; ++round) {
      const float inv = 1.0f / fmaxf(nrm, 1e-30f);
      float num = 0.0f, den = 0.0f;
      packed = 0;
#pragma unroll
      for (int e = 0; e < E; ++e) {
        uint32_t code = 0;
#pragma unroll
        for (int i = 0; i < (1 << BITS) - 1; ++i) code += v[e] * inv > sb[i] ? 1u : 0u;
        const float c = sc[code];
        num += v[e] * c;
        den += c * c;
        packed |= code << (e * BITS);
      }
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) {
        num += __shfl_xor_sync(0xffffffffu, num, off);
        den += __shfl_xor_sync(0xffffffffu, den, off);
      }
      nrm = num / fmaxf(den, 1e-30f);
    }
    kvs_store_codes<E * BITS>(packed, idx + row * (D * BITS / 8), lane);
    if (lane == 0) norm[row] = static_cast<__half>(nrm);
    return;
  }
  const uint32_t packed = kvs_quantize_lane<D, BITS, ROUNDS>(v, nrm, signs, sb, lane);
  kvs_store_codes<E * BITS>(packed, idx + row * (D * BITS / 8), lane);
  if (lane == 0) norm[row] = static_cast<__half>(nrm);
}

// The rotation's rounds (±1 diagonal, then Hadamard; unnormalised) on a warp's row, the signs already in
// registers (sg[round][e]).
template <int D, int ROUNDS, int N>
__device__ __forceinline__ void kvs_rotate_row(float (&v)[D / 32], const float (&sg)[N][D / 32], int lane) {
#pragma unroll
  for (int rd = 0; rd < ROUNDS; ++rd) {
#pragma unroll
    for (int e = 0; e < D / 32; ++e) v[e] *= sg[rd][e];
    kvs_hadamard_row<D>(v, lane);
  }
}

// The inverse: rounds in reverse, each a Hadamard then its ±1 diagonal (unnormalised).
template <int D, int ROUNDS>
__device__ __forceinline__ void kvs_unrotate_row(float (&v)[D / 32], const float* signs, int lane) {
#pragma unroll
  for (int rd = ROUNDS - 1; rd >= 0; --rd) {
    kvs_hadamard_row<D>(v, lane);
#pragma unroll
    for (int e = 0; e < D / 32; ++e) v[e] *= signs[rd * D + lane * (D / 32) + e];
  }
}

// A split block's result from its warps' (Σ p·v̂ per row and coordinate, (m, l) per row) in shared memory:
// (m, l, Σ p·v̂) of the block's slice. BASE2: the warps' m are in base 2; written in natural-log units.
template <int R, int D, int WARPS, int NT, bool BASE2>
__device__ __forceinline__ void kvs_merge_warps(const float* wacc, const float* wml, float* part_o, float* part_ml,
                                                int64_t row0, int tid) {
  const float NEG_INF = -cuda::std::numeric_limits<float>::infinity();
  auto weight = [](float m, float base) { return BASE2 ? exp2f(m - base) : __expf(m - base); };
  for (int i = tid; i < R * D; i += NT) {
    const int r = i / D;
    float mb = NEG_INF;
    for (int w = 0; w < WARPS; ++w) mb = fmaxf(mb, wml[(w * R + r) * 2]);
    const float ms = kvs_finite_or_zero(mb);
    float v = 0.0f;
    for (int w = 0; w < WARPS; ++w) v += wacc[(w * R + r) * D + i % D] * weight(wml[(w * R + r) * 2], ms);
    part_o[row0 * D + i] = v;
  }
  if (tid < R) {
    float mb = NEG_INF;
    for (int w = 0; w < WARPS; ++w) mb = fmaxf(mb, wml[(w * R + tid) * 2]);
    const float ms = kvs_finite_or_zero(mb);
    float lb = 0.0f;
    for (int w = 0; w < WARPS; ++w) lb += wml[(w * R + tid) * 2 + 1] * weight(wml[(w * R + tid) * 2], ms);
    part_ml[(row0 + tid) * 2] = BASE2 ? mb * 0.6931471805599453f : mb;
    part_ml[(row0 + tid) * 2 + 1] = lb;
  }
}

template <int NT>
__device__ __forceinline__ float kvs_block_max(float v, float* red) {
  for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
  __syncthreads();
  v = red[0];
  for (int i = 1; i < NT / 32; ++i) v = fmaxf(v, red[i]);
  __syncthreads();
  return v;
}

template <int NT>
__device__ __forceinline__ float kvs_block_sum(float v, float* red) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = v;
  __syncthreads();
  v = red[0];
  for (int i = 1; i < NT / 32; ++i) v += red[i];
  __syncthreads();
  return v;
}

// One query row of a merge launch (combine.cu, coded_merge.cu: one block per (row, kv head, batch row)) and its
// splits' merged maximum and weight sum: the split outputs of the row weigh exp(m_s - finite max) each.
struct KvsMergeRow {
  int r, h, b, H, S, hq, pos;
  int64_t split0;
  float top, total;
};

template <int NT, int R>
__device__ __forceinline__ KvsMergeRow kvs_merge_row(const float* part_ml, int L, int S, float* red) {
  KvsMergeRow row;
  row.r = blockIdx.x;
  row.h = blockIdx.y;
  row.b = blockIdx.z;
  row.H = gridDim.y;
  row.S = S;
  row.hq = row.h * (R / L) + row.r / L;
  row.pos = row.r % L;
  row.split0 = static_cast<int64_t>(row.b * row.H + row.h) * S;
  float top = -cuda::std::numeric_limits<float>::infinity();
  for (int s = threadIdx.x; s < S; s += NT) top = fmaxf(top, part_ml[((row.split0 + s) * R + row.r) * 2]);
  row.top = kvs_block_max<NT>(top, red);
  const float ms = kvs_finite_or_zero(row.top);
  float total = 0.0f;
  for (int s = threadIdx.x; s < S; s += NT)
    total += part_ml[((row.split0 + s) * R + row.r) * 2 + 1] * __expf(part_ml[((row.split0 + s) * R + row.r) * 2] - ms);
  row.total = kvs_block_sum<NT>(total, red);
  return row;
}

// The row's normalised output, so[w] = Σ_s exp(m_s − max) · part_o[s][w] / total (0 for a row without tokens), W
// coordinates: the splits' weights go to shared memory (sw, NT floats) a chunk at a time, so that a thread's loads
// are independent (no exp on their path) and the loop unrolls. Ends with so[] visible to the whole block.
template <int NT, int R, int W>
__device__ __forceinline__ void kvs_merge_outputs(const float* part_o, const float* part_ml, const KvsMergeRow& row,
                                                  float* so, float* sw) {
  const int tid = threadIdx.x;
  const float ms = kvs_finite_or_zero(row.top);
  const float inv = row.total > 0.0f ? 1.0f / row.total : 0.0f;
  constexpr int PER_THREAD = (W + NT - 1) / NT;
  float acc[PER_THREAD];
#pragma unroll
  for (int j = 0; j < PER_THREAD; ++j) acc[j] = 0.0f;
  for (int s0 = 0; s0 < row.S; s0 += NT) {
    const int chunk = min(NT, row.S - s0);
    if (tid < chunk) sw[tid] = __expf(part_ml[((row.split0 + s0 + tid) * R + row.r) * 2] - ms);
    __syncthreads();
#pragma unroll
    for (int j = 0; j < PER_THREAD; ++j) {
      const int w = tid + j * NT;
      if (w < W) {
        const float* po = part_o + ((row.split0 + s0) * R + row.r) * W + w;
        float v = 0.0f;
#pragma unroll 8
        for (int k = 0; k < chunk; ++k) v += po[static_cast<int64_t>(k) * R * W] * sw[k];
        acc[j] += v;
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int j = 0; j < PER_THREAD; ++j)
    if (tid + j * NT < W) so[tid + j * NT] = acc[j] * inv;
  __syncthreads();
}

// Append one token of one (batch, kv head) in place, by one warp: x (the token, minus the key mean when MEAN)
// TurboQuant-coded into row `pos` of the cache's preallocated code and norm buffers (inputs that the kernel
// writes: no block of the launch reads row `pos`), and its decoded rotated vector (centroids · fp16 norm, as
// the codes will be read later) left in `decoded` (shared memory, D floats).
template <int D, int BITS, int ROUNDS, bool MEAN, typename T, typename XS, typename M, typename MS, typename IS,
          typename N, typename NS>
__device__ __forceinline__ void kvs_append_token(const T* x, const XS& xs, const M* mean, const MS& ms,
                                                 const float* signs, const float* bounds, const float* cent,
                                                 const uint8_t* idx, const IS& is, const N* norm, const NS& ns,
                                                 int b, int h, int pos, int lane, float* decoded) {
  constexpr int E = D / 32;
  float v[E];
  float ss = 0.0f;
#pragma unroll
  for (int e = 0; e < E; ++e) {
    const int d = lane * E + e;
    v[e] = static_cast<float>(x[b * xs[0] + h * xs[1] + d * xs[3]]);
    if constexpr (MEAN) v[e] -= static_cast<float>(mean[b * ms[0] + h * ms[1] + d * ms[3]]);
    ss += v[e] * v[e];
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, off);
  const float nrm = sqrtf(ss);
  const uint32_t packed = kvs_quantize_lane<D, BITS, ROUNDS>(v, nrm, signs, bounds, lane);
  kvs_store_codes<E * BITS>(packed, const_cast<uint8_t*>(idx) + b * is[0] + h * is[1] + pos * is[2], lane);
  const N stored = static_cast<N>(nrm);
  if (lane == 0) const_cast<N*>(norm)[b * ns[0] + h * ns[1] + pos * ns[2]] = stored;
#pragma unroll
  for (int e = 0; e < E; ++e)
    decoded[lane * E + e] = cent[(packed >> (e * BITS)) & ((1u << BITS) - 1)] * static_cast<float>(stored);
}

// A token the tail coded (append_token.cu, append_ring.cu) joins each row's merged (m, l) and, weighted, the
// rotated-domain value sum `extra` (R x D): its score from the rotated query (sq · k̂ · qnat: natural-log
// units), its decoded value dv. A warp per row; (m, l) are read before the reduction's shuffles, written after.
template <int R, int D, int WARPS>
__device__ __forceinline__ void kvs_merge_coded(const float* sq, const float* dk, const float* dv, float qnat,
                                                float* srm, float* srl, float* extra, int warp, int lane) {
  for (int r = warp; r < R; r += WARPS) {
    const float m0 = srm[r], l0 = srl[r];
    float s = 0.0f;
    for (int d = lane; d < D; d += 32) s += sq[r * D + d] * dk[d];
    for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
    s *= qnat;
    const float mn = fmaxf(m0, s);
    const float a = __expf(m0 - mn), w = __expf(s - mn);
    for (int d = lane; d < D; d += 32) extra[r * D + d] = extra[r * D + d] * a + w * dv[d];
    if (lane == 0) {
      srl[r] = l0 * a + w;
      srm[r] = mn;
    }
  }
}

// The fp16 window (a ring of W tokens, the step's new one already in it) joins each row exactly, a warp per
// row: scores q·k·scale less q·μ·scale (code scores leave the key mean to the lse), an online softmax over
// the ring, the weighted value sum taken in the values' original domain and rotated into their coded domain
// once (the tail un-rotates everything together). Ring reads go through L2: this block just wrote a slot.
template <int R, int D, int W, int WARPS, int VROUNDS, bool MEAN, typename Q, typename QS, typename M, typename MS,
          typename K, typename KS>
__device__ __forceinline__ void kvs_merge_window(const Q* q, const QS& qs, const M* mean, const MS& ms, const K* wk,
                                                 const KS& ks, const K* wv, const KS& vs, const float* vsigns,
                                                 float scale, int b, int h, int G, int L, float* srm, float* srl,
                                                 float* extra, int warp, int lane) {
  constexpr int E = D / 32;
  const float NEG_INF = -cuda::std::numeric_limits<float>::infinity();
  for (int r = warp; r < R; r += WARPS) {
    const int hq = h * G + r / L, pos = r % L;
    float qv[E], acc[E];
    float qm = 0.0f;
#pragma unroll
    for (int e = 0; e < E; ++e) {
      const int d = lane * E + e;
      qv[e] = static_cast<float>(q[b * qs[0] + hq * qs[1] + pos * qs[2] + d * qs[3]]) * scale;
      if constexpr (MEAN) qm += qv[e] * static_cast<float>(mean[b * ms[0] + h * ms[1] + d * ms[3]]);
      acc[e] = 0.0f;
    }
    for (int off = 16; off > 0; off >>= 1) qm += __shfl_xor_sync(0xffffffffu, qm, off);
    const float m0 = srm[r], l0 = srl[r];
    float m = NEG_INF, l = 0.0f;
#pragma unroll 8
    for (int j = 0; j < W; ++j) {  // unrolled: the ring's loads of several tokens are in flight together
      const int64_t kj = b * ks[0] + h * ks[1] + j * ks[2], vj = b * vs[0] + h * vs[1] + j * vs[2];
      float s = 0.0f;
#pragma unroll
      for (int e = 0; e < E; ++e) s += qv[e] * static_cast<float>(__ldcg(wk + kj + (lane * E + e) * ks[3]));
      for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
      s -= qm;
      const float mn = fmaxf(m, s);
      const float a = __expf(m - mn), w = __expf(s - mn);
      l = l * a + w;
#pragma unroll
      for (int e = 0; e < E; ++e) acc[e] = acc[e] * a + w * static_cast<float>(__ldcg(wv + vj + (lane * E + e) * vs[3]));
      m = mn;
    }
    float sg[VROUNDS > 0 ? VROUNDS : 1][E];
#pragma unroll
    for (int rd = 0; rd < VROUNDS; ++rd)
#pragma unroll
      for (int e = 0; e < E; ++e) sg[rd][e] = vsigns[rd * D + lane * E + e];
    kvs_rotate_row<D, VROUNDS>(acc, sg, lane);
    const float mn = fmaxf(m0, m);
    const float a0 = __expf(m0 - mn), a1 = __expf(m - mn) * powf(static_cast<float>(D), -0.5f * VROUNDS);
#pragma unroll
    for (int e = 0; e < E; ++e) extra[r * D + lane * E + e] = extra[r * D + lane * E + e] * a0 + acc[e] * a1;
    if (lane == 0) {
      srl[r] = l0 * a0 + l * __expf(m - mn);
      srm[r] = mn;
    }
  }
}

// Row `slot` of one (batch, kv head) of a ring buffer (an input the kernel writes) takes one token.
template <int D, int NT, typename T, typename S, typename X, typename XS>
__device__ __forceinline__ void kvs_put_token(const T* ring, const S& rs, const X* x, const XS& xs, int b, int h,
                                              int slot, int tid) {
  for (int d = tid; d < D; d += NT)
    const_cast<T*>(ring)[b * rs[0] + h * rs[1] + slot * rs[2] + d * rs[3]] =
        static_cast<T>(x[b * xs[0] + h * xs[1] + d * xs[3]]);
}
