  threadgroup float so[D];
  threadgroup float sw[NT];
  threadgroup float red[NT / 32];
  const int tid = thread_position_in_threadgroup.x;
  const int lane = thread_index_in_simdgroup;
  const int warp = simdgroup_index_in_threadgroup;
  const int r = threadgroup_position_in_grid.x;
  const int h = threadgroup_position_in_grid.y;
  const int b = threadgroup_position_in_grid.z;
  const int H = threadgroups_per_grid.y;
  const int S = part_ml_shape[2];
  const int L = q_shape[2];
  const int G = R / L;
  const int hq = h * G + r / L, pos = r % L;
  const int64_t split0 = int64_t(b * H + h) * S;

  float mx_ = -INFINITY;
  for (int s = tid; s < S; s += NT) mx_ = metal::max(mx_, part_ml[((split0 + s) * R + r) * 2]);
  mx_ = simd_max(mx_);
  if (lane == 0) red[warp] = mx_;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  mx_ = red[0];
  for (int i = 1; i < NT / 32; ++i) mx_ = metal::max(mx_, red[i]);
  threadgroup_barrier(mem_flags::mem_threadgroup);
  const float ms = kvs_finite_or_zero(mx_);
  float lsum = 0.0f;
  for (int s = tid; s < S; s += NT)
    lsum += part_ml[((split0 + s) * R + r) * 2 + 1] * metal::exp(part_ml[((split0 + s) * R + r) * 2] - ms);
  lsum = simd_sum(lsum);
  if (lane == 0) red[warp] = lsum;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  lsum = red[0];
  for (int i = 1; i < NT / 32; ++i) lsum += red[i];
  threadgroup_barrier(mem_flags::mem_threadgroup);
  const float inv = lsum > 0.0f ? 1.0f / lsum : 0.0f;
  constexpr int PER_THREAD = (D + NT - 1) / NT;
  float acc_d[PER_THREAD];
  for (int j = 0; j < PER_THREAD; ++j) acc_d[j] = 0.0f;
  for (int s0 = 0; s0 < S; s0 += NT) {
    const int chunk = metal::min(NT, S - s0);
    if (tid < chunk) sw[tid] = metal::exp(part_ml[((split0 + s0 + tid) * R + r) * 2] - ms);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (int j = 0; j < PER_THREAD; ++j) {
      const int d = tid + j * NT;
      if (d < D) {
        float v = 0.0f;
        for (int k = 0; k < chunk; ++k) v += part_o[((split0 + s0 + k) * R + r) * D + d] * sw[k];
        acc_d[j] += v;
      }
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
  for (int j = 0; j < PER_THREAD; ++j)
    if (tid + j * NT < D) so[tid + j * NT] = acc_d[j] * inv;
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (int rd = ROUNDS - 1; rd >= 0; --rd) {
    for (int len = 1; len < D; len <<= 1) {
      for (int k = tid; k < D / 2; k += NT) {
        const int lo = (k / len) * 2 * len + (k % len);
        const float a = so[lo], c = so[lo + len];
        so[lo] = a + c;
        so[lo + len] = a - c;
      }
      threadgroup_barrier(mem_flags::mem_threadgroup);
    }
    for (int d = tid; d < D; d += NT) so[d] *= signs[rd * D + d];
    threadgroup_barrier(mem_flags::mem_threadgroup);
  }
  const float hnorm = metal::pow(static_cast<float>(D), -0.5f * ROUNDS);
  const int64_t out0 = (int64_t(b * H + h) * R + r) * D;
  for (int d = tid; d < D; d += NT) out[out0 + d] = static_cast<OutT>(so[d] * hnorm);

  float qm = 0.0f;
  if (HAS_MEAN) {
    for (int d = tid; d < D; d += NT)
      qm += static_cast<float>(q[b * q_strides[0] + hq * q_strides[1] + pos * q_strides[2] + d * q_strides[3]]) *
            static_cast<float>(kmean[b * kmean_strides[0] + h * kmean_strides[1] + d * kmean_strides[3]]);
    qm = simd_sum(qm);
    if (lane == 0) red[warp] = qm;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    qm = red[0];
    for (int i = 1; i < NT / 32; ++i) qm += red[i];
    qm *= params[0];
  }
  if (tid == 0) lse[(b * H + h) * R + r] = lsum > 0.0f ? mx_ + metal::log(lsum) + qm : -INFINITY;
