  // Σ over splits of weight·partial, four coordinates per load, a chunk of splits' weights in shared memory
  // at a time so that the loads of a thread are independent and many are in flight.
  constexpr int QUADS = R * D / 4;
  constexpr int TPER = (QUADS + NT - 1) / NT;
  float4 tacc[TPER];
#pragma unroll
  for (int j = 0; j < TPER; ++j) tacc[j] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  for (int s0 = 0; s0 < n_splits; s0 += 32) {
    const int chunk = min(32, n_splits - s0);
    for (int i = tid; i < 32 * R; i += NT) {
      const int k = i / R, r = i % R;
      swt[i] = k < chunk ? __expf(__ldcg(part_ml + ((split0 + s0 + k) * R + r) * 2) - kvs_finite_or_zero(srm[r])) : 0.0f;
    }
    __syncthreads();
#pragma unroll
    for (int j = 0; j < TPER; ++j) {
      const int i4 = tid + j * NT;
      if (i4 < QUADS) {
        const int r = 4 * i4 / D;
        const float4* po = reinterpret_cast<const float4*>(part_o + (split0 + s0) * R * D) + i4;
        float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll 8
        for (int k = 0; k < chunk; ++k) {
          const float4 x = __ldcg(po + k * QUADS);
          const float w = swt[k * R + r];
          v.x += w * x.x;
          v.y += w * x.y;
          v.z += w * x.z;
          v.w += w * x.w;
        }
        tacc[j].x += v.x;
        tacc[j].y += v.y;
        tacc[j].z += v.z;
        tacc[j].w += v.w;
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int j = 0; j < TPER; ++j) {
    const int i4 = tid + j * NT;
    if (i4 < QUADS) {
      const float l = srl[4 * i4 / D];
      const float inv = l > 0.0f ? 1.0f / l : 0.0f;
      sq[4 * i4] = (tacc[j].x + tail_extra[4 * i4]) * inv;
      sq[4 * i4 + 1] = (tacc[j].y + tail_extra[4 * i4 + 1]) * inv;
      sq[4 * i4 + 2] = (tacc[j].z + tail_extra[4 * i4 + 2]) * inv;
      sq[4 * i4 + 3] = (tacc[j].w + tail_extra[4 * i4 + 3]) * inv;
    }
  }
  __syncthreads();
  // One warp per row: un-rotate with the value rotation's inverse, write the output and the row's lse.
  const float onorm = powf(static_cast<float>(D), -0.5f * VROUNDS);
  const int64_t out0 = static_cast<int64_t>(b * H + h) * R * D;
  for (int r = warp; r < R; r += WARPS) {
    float v[D / 32];
#pragma unroll
    for (int e = 0; e < D / 32; ++e) v[e] = sq[r * D + lane * (D / 32) + e];
    kvs_unrotate_row<D, VROUNDS>(v, vsigns, lane);
#pragma unroll
    for (int e = 0; e < D / 32; ++e) out[out0 + r * D + lane * (D / 32) + e] = static_cast<OutT>(v[e] * onorm);
    float qm = 0.0f;
    if constexpr (HAS_MEAN) {
      const int hq = h * G + r / L, pos = r % L;
      for (int d = lane; d < D; d += 32)
        qm += static_cast<float>(q[b * q_strides[0] + hq * q_strides[1] + pos * q_strides[2] + d * q_strides[3]]) *
              static_cast<float>(kmean[b * kmean_strides[0] + h * kmean_strides[1] + d * kmean_strides[3]]);
      for (int off = 16; off > 0; off >>= 1) qm += __shfl_xor_sync(FULL, qm, off);
      qm *= scale;
    }
    if (lane == 0) lse[(b * H + h) * R + r] = srl[r] > 0.0f ? srm[r] + logf(srl[r]) + qm : NEG_INF;
  }
