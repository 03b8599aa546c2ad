  // mma_coded's splits merged, mapped back to model space through the value synthesis and merged with attention
  // over up to two fp16 segments (the sinks and the recent window): a decode step's whole attention after the
  // split launch, in one block per (query row, kv head, batch row) instead of ~15 small MLX launches.
  __shared__ float so[MPV];
  __shared__ float sq[D];
  __shared__ float sw[NT];
  __shared__ float red[NT / 32];
  const int tid = threadIdx.x;
  const KvsMergeRow row = kvs_merge_row<NT, R>(part_ml, q_shape[2], part_ml_shape[2], red);
  const int r = row.r, h = row.h, b = row.b;
  const float scale = params[0];
  // The coded tokens' log-sum-exp and normalised coded-domain output, as combine.cu merges them.
  const float csum = row.total;
  const float coded_lse = csum > 0.0f ? kvs_finite_or_zero(row.top) + logf(csum)
                                      : -cuda::std::numeric_limits<float>::infinity();
  kvs_merge_outputs<NT, R, MPV>(part_o, part_ml, row, so, sw);
  for (int d = tid; d < D; d += NT)
    sq[d] = static_cast<float>(q[b * q_strides[0] + row.hq * q_strides[1] + row.pos * q_strides[2] + d * q_strides[3]]) *
            scale;
  __syncthreads();

  // fp16 tokens: sinks first, then the window; their count comes from the arrays' shapes.
  const int NSK = HAS_SINKS ? sk_shape[2] : 0;
  const int NEX = NSK + (HAS_WINDOW ? wk_shape[2] : 0);
  auto key = [&](int t, int d) -> float {
    if (t < NSK) return static_cast<float>(sk[b * sk_strides[0] + h * sk_strides[1] + t * sk_strides[2] + d * sk_strides[3]]);
    t -= NSK;
    return static_cast<float>(wk[b * wk_strides[0] + h * wk_strides[1] + t * wk_strides[2] + d * wk_strides[3]]);
  };
  auto value = [&](int t, int d) -> float {
    if (t < NSK) return static_cast<float>(sv[b * sv_strides[0] + h * sv_strides[1] + t * sv_strides[2] + d * sv_strides[3]]);
    t -= NSK;
    return static_cast<float>(wv[b * wv_strides[0] + h * wv_strides[1] + t * wv_strides[2] + d * wv_strides[3]]);
  };
  auto score = [&](int t) {
    float s = 0.0f;
#pragma unroll 8
    for (int d = 0; d < D; ++d) s += sq[d] * key(t, d);
    return s;
  };
  float top = coded_lse;
  for (int t = tid; t < NEX; t += NT) top = fmaxf(top, score(t));
  top = kvs_finite_or_zero(kvs_block_max<NT>(top, red));

  // Each thread owns output coordinates d: the coded part through the synthesis, then the fp16 tokens' values a
  // chunk of weights at a time.
  const int hs = vsynth_t_shape[0] == 1 ? 0 : h;  // Sᵀ, (H or 1, MV, D): a warp's threads read consecutive d
  const float coded_weight = csum > 0.0f ? __expf(coded_lse - top) : 0.0f;
  constexpr int PER_THREAD = (D + NT - 1) / NT;
  float acc[PER_THREAD];
#pragma unroll
  for (int j = 0; j < PER_THREAD; ++j) {
    const int d = tid + j * NT;
    float v = 0.0f;
    if (d < D)
#pragma unroll 8
      for (int m = 0; m < MV; ++m) v += vsynth_t[(static_cast<int64_t>(hs) * MV + m) * D + d] * so[m];
    acc[j] = v * coded_weight;
  }
  float total = 0.0f;
  for (int t0 = 0; t0 < NEX; t0 += NT) {
    const int chunk = min(NT, NEX - t0);
    __syncthreads();
    if (tid < chunk) sw[tid] = __expf(score(t0 + tid) - top);
    __syncthreads();
    for (int k = 0; k < chunk; ++k) total += sw[k];
#pragma unroll
    for (int j = 0; j < PER_THREAD; ++j) {
      const int d = tid + j * NT;
      if (d < D)
#pragma unroll 4
        for (int k = 0; k < chunk; ++k) acc[j] += sw[k] * value(t0 + k, d);
    }
  }
  total += coded_weight;
  const float inv = total > 0.0f ? 1.0f / total : 0.0f;
  const int64_t out0 = (static_cast<int64_t>(b * row.H + h) * R + r) * D;
#pragma unroll
  for (int j = 0; j < PER_THREAD; ++j)
    if (tid + j * NT < D) out[out0 + tid + j * NT] = static_cast<OutT>(acc[j] * inv);
