  constexpr int E = D / 32;
  constexpr int NBOUNDS = (1 << BITS) - 1;
  constexpr int BYTES = E * BITS / 8;
  threadgroup float sb[NBOUNDS];
  const int lane = thread_index_in_simdgroup;
  const int warp = simdgroup_index_in_threadgroup;
  const int nt = threads_per_threadgroup.x;
  for (int i = thread_position_in_threadgroup.x; i < NBOUNDS; i += nt) sb[i] = bounds[i];
  threadgroup_barrier(mem_flags::mem_threadgroup);
  const int H = x_shape[1], T = x_shape[2];
  const int64_t row = int64_t(threadgroup_position_in_grid.x) * (nt / 32) + warp;
  if (row >= int64_t(x_shape[0]) * H * T) return;
  const int t = row % T, h = (row / T) % H, b = row / (int64_t(T) * H);
  const int64_t base = b * x_strides[0] + h * x_strides[1] + t * x_strides[2];
  float v[E];
  float ss = 0.0f;
  for (int e = 0; e < E; ++e) {
    v[e] = static_cast<float>(x[base + (lane * E + e) * x_strides[3]]);
    ss += v[e] * v[e];
  }
  ss = simd_sum(ss);
  const float nrm = metal::sqrt(ss);
  const float inv = 1.0f / metal::max(nrm, 1e-12f);
  for (int e = 0; e < E; ++e) v[e] *= inv;
  for (int rd = 0; rd < ROUNDS; ++rd) {
    for (int e = 0; e < E; ++e) v[e] *= signs[rd * D + lane * E + e];
    for (int len = 1; len < E; len <<= 1)
      for (int e = 0; e < E; ++e)
        if ((e & len) == 0) {
          const float a = v[e], c = v[e + len];
          v[e] = a + c;
          v[e + len] = a - c;
        }
    for (int len = E; len < D; len <<= 1) {
      const int partner = len / E;
      const bool upper = lane & partner;
      for (int e = 0; e < E; ++e) {
        const float other = simd_shuffle_xor(v[e], ushort(partner));
        v[e] = upper ? other - v[e] : v[e] + other;
      }
    }
    for (int e = 0; e < E; ++e) v[e] *= metal::rsqrt(static_cast<float>(D));
  }
  uint32_t packed = 0;
  for (int e = 0; e < E; ++e) {
    uint32_t code = 0;
    for (int i = 0; i < NBOUNDS; ++i) code += v[e] > sb[i] ? 1u : 0u;
    packed |= code << (e * BITS);
  }
  device uint8_t* out = idx + row * (D * BITS / 8) + lane * BYTES;
  for (int i = 0; i < BYTES; ++i) out[i] = static_cast<uint8_t>(packed >> (8 * i));
  if (lane == 0) norm[row] = static_cast<half>(nrm);
