  __shared__ float so[D];
  __shared__ float sw[NT];
  __shared__ float red[NT / 32];
  const int tid = threadIdx.x;
  const KvsMergeRow row = kvs_merge_row<NT, R>(part_ml, q_shape[2], part_ml_shape[2], red);
  const int r = row.r, h = row.h, b = row.b, H = row.H, hq = row.hq, pos = row.pos;
  const float mx_ = row.top, lsum = row.total;
  const float NEG_INF = -cuda::std::numeric_limits<float>::infinity();
  kvs_merge_outputs<NT, R, D>(part_o, part_ml, row, so, sw);
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
