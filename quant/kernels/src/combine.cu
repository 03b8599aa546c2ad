  __shared__ float so[D];
  __shared__ float sw[NT];
  __shared__ float red[NT / 32];
  const int tid = threadIdx.x;
  const KvsMergeRow row = kvs_merge_row<NT, R>(part_ml, q_shape[2], part_ml_shape[2], red);
  const int r = row.r, h = row.h, b = row.b, H = row.H, S = row.S, hq = row.hq, pos = row.pos;
  const int64_t split0 = row.split0;
  const float mx_ = row.top, ms = kvs_finite_or_zero(row.top), lsum = row.total;
  const float NEG_INF = -cuda::std::numeric_limits<float>::infinity();
  const float inv = lsum > 0.0f ? 1.0f / lsum : 0.0f;
  // Each output coordinate sums S partials: the splits' weights go to shared memory a chunk at a time, so
  // the loads of a thread are independent (no exp on their path) and the loop unrolls.
  constexpr int PER_THREAD = (D + NT - 1) / NT;
  float acc_d[PER_THREAD];
#pragma unroll
  for (int j = 0; j < PER_THREAD; ++j) acc_d[j] = 0.0f;
  for (int s0 = 0; s0 < S; s0 += NT) {
    const int chunk = min(NT, S - s0);
    if (tid < chunk) sw[tid] = __expf(part_ml[((split0 + s0 + tid) * R + r) * 2] - ms);
    __syncthreads();
#pragma unroll
    for (int j = 0; j < PER_THREAD; ++j) {
      const int d = tid + j * NT;
      if (d < D) {
        const float* po = part_o + ((split0 + s0) * R + r) * D + d;
        float v = 0.0f;
#pragma unroll 8
        for (int k = 0; k < chunk; ++k) v += po[static_cast<int64_t>(k) * R * D] * sw[k];
        acc_d[j] += v;
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int j = 0; j < PER_THREAD; ++j)
    if (tid + j * NT < D) so[tid + j * NT] = acc_d[j] * inv;
  __syncthreads();
  // Un-rotate with the value rotation's inverse: rounds in reverse, each a Hadamard then its ±1 diagonal.
  for (int rd = ROUNDS - 1; rd >= 0; --rd) {
    for (int len = 1; len < D; len <<= 1) {
      for (int k = tid; k < D / 2; k += NT) {
        const int lo = (k / len) * 2 * len + (k % len);
        const float a = so[lo], c = so[lo + len];
        so[lo] = a + c;
        so[lo + len] = a - c;
      }
      __syncthreads();
    }
    for (int d = tid; d < D; d += NT) so[d] *= signs[rd * D + d];
    __syncthreads();
  }
  const float hnorm = powf(static_cast<float>(D), -0.5f * ROUNDS);
  const int64_t out0 = (static_cast<int64_t>(b * H + h) * R + r) * D;
  for (int d = tid; d < D; d += NT) out[out0 + d] = static_cast<OutT>(so[d] * hnorm);

  float qm = 0.0f;
  if constexpr (HAS_MEAN) {
    // Keys were encoded as k − μ: q·μ is added back to every score of the segment, i.e. to its lse.
    for (int d = tid; d < D; d += NT)
      qm += static_cast<float>(q[b * q_strides[0] + hq * q_strides[1] + pos * q_strides[2] + d * q_strides[3]]) *
            static_cast<float>(kmean[b * kmean_strides[0] + h * kmean_strides[1] + d * kmean_strides[3]]);
    qm = kvs_block_sum<NT>(qm, red) * params[0];
  }
  if (tid == 0) lse[(b * H + h) * R + r] = lsum > 0.0f ? mx_ + logf(lsum) + qm : NEG_INF;
