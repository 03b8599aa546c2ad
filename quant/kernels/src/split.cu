  constexpr int C = D / LPT;            // coordinates per lane
  constexpr int TPW = 32 / LPT;         // tokens per warp step
  constexpr int NT = WARPS * 32;
  constexpr int KWORDS = C * KB / 32;
  constexpr int VWORDS = C * VB / 32;
  constexpr int STEP = WARPS * TPW * U;
  constexpr unsigned FULL = 0xffffffffu;
  const float NEG_INF = -cuda::std::numeric_limits<float>::infinity();

  __shared__ float sq[R * D];
  __shared__ float sck[1 << KB];
  __shared__ float scv[1 << VB];
  __shared__ float sacc[WARPS * R * D];
  __shared__ float sml[WARPS * R * 2];

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int grp = lane / LPT;
  const int sub = lane % LPT;
  const int split = blockIdx.x;
  const int h = blockIdx.y;
  const int b = blockIdx.z;
  const int H = gridDim.y;
  const int n_splits = gridDim.x;
  const int T = lengths[b];  // tokens held by this row: buffers may be longer, rows may differ
  const int L = q_shape[2];
  const int G = R / L;

  for (int i = tid; i < (1 << KB); i += NT) sck[i] = kcent[i];
  for (int i = tid; i < (1 << VB); i += NT) scv[i] = vcent[i];
  const float scale = params[0];
  for (int i = tid; i < R * D; i += NT) {
    const int r = i / D, d = i % D;
    const int hq = h * G + r / L, pos = r % L;
    const float x = static_cast<float>(
        q[b * q_strides[0] + hq * q_strides[1] + pos * q_strides[2] + d * q_strides[3]]);
    sq[i] = x * scale;
  }
  __syncthreads();
  // The key rotation: ROUNDS of (±1 diagonal, then Hadamard in Sylvester order as mx.hadamard_transform),
  // in place; the 1/√D of every round is applied once at the end.
  for (int rd = 0; rd < ROUNDS; ++rd) {
    for (int i = tid; i < R * D; i += NT) sq[i] *= signs[rd * D + i % D];
    __syncthreads();
    for (int len = 1; len < D; len <<= 1) {
      for (int i = tid; i < R * D / 2; i += NT) {
        const int r = i / (D / 2), k = i % (D / 2);
        const int lo = r * D + (k / len) * 2 * len + (k % len);
        const float a = sq[lo], c = sq[lo + len];
        sq[lo] = a + c;
        sq[lo + len] = a - c;
      }
      __syncthreads();
    }
  }
  const float hnorm = powf(static_cast<float>(D), -0.5f * ROUNDS);
  const float tail_qnat = hnorm;  // sq · k̂ · tail_qnat: a score in natural-log units (append_token.cu)
  float qr[R][C];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int c = 0; c < C; ++c) qr[r][c] = sq[r * D + sub * C + c] * hnorm;

  const int start = split * TPS;
  const int end = min(start + TPS, T);
  const uint8_t* kp = kidx + b * kidx_strides[0] + h * kidx_strides[1] + sub * (C * KB / 8);
  const uint8_t* vp = vidx + b * vidx_strides[0] + h * vidx_strides[1] + sub * (C * VB / 8);
  const int64_t kt = kidx_strides[2], vt = vidx_strides[2];
  const auto* knp = knorm + b * knorm_strides[0] + h * knorm_strides[1];
  const auto* vnp = vnorm + b * vnorm_strides[0] + h * vnorm_strides[1];
  const int64_t knt = knorm_strides[2], vnt = vnorm_strides[2];

  float m[R], l[R], acc[R][C];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    m[r] = NEG_INF;
    l[r] = 0.0f;
#pragma unroll
    for (int c = 0; c < C; ++c) acc[r][c] = 0.0f;
  }

  for (int t0 = start + warp * TPW * U; t0 < end; t0 += STEP) {
    uint32_t kw[U][KWORDS], vw[U][VWORDS];
    float kn[U], vn[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int t = t0 + u * TPW + grp;
      if (t < end) {
        kvs_load<KWORDS>(kp + t * kt, kw[u]);
        kvs_load<VWORDS>(vp + t * vt, vw[u]);
        kn[u] = static_cast<float>(knp[t * knt]);
        vn[u] = static_cast<float>(vnp[t * vnt]);
      } else {
#pragma unroll
        for (int i = 0; i < KWORDS; ++i) kw[u][i] = 0u;
#pragma unroll
        for (int i = 0; i < VWORDS; ++i) vw[u][i] = 0u;
        kn[u] = 0.0f;
        vn[u] = 0.0f;
      }
    }
    float s[U][R];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float kc[C];
#pragma unroll
      for (int c = 0; c < C; ++c) kc[c] = sck[kvs_code<KB>(kw[u], c)];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        float a = 0.0f;
#pragma unroll
        for (int c = 0; c < C; ++c) a = fmaf(qr[r][c], kc[c], a);
        s[u][r] = a;
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
      for (int r = 0; r < R; ++r)
#pragma unroll
        for (int off = LPT / 2; off > 0; off >>= 1) s[u][r] += __shfl_xor_sync(FULL, s[u][r], off);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const bool valid = t0 + u * TPW + grp < end;
#pragma unroll
      for (int r = 0; r < R; ++r) s[u][r] = valid ? s[u][r] * kn[u] : NEG_INF;
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
      float mnew = m[r];
#pragma unroll
      for (int u = 0; u < U; ++u) mnew = fmaxf(mnew, s[u][r]);
      const float ms = kvs_finite_or_zero(mnew);
      const float corr = __expf(m[r] - ms);
      l[r] *= corr;
#pragma unroll
      for (int c = 0; c < C; ++c) acc[r][c] *= corr;
      m[r] = mnew;
#pragma unroll
      for (int u = 0; u < U; ++u) {
        s[u][r] = __expf(s[u][r] - ms);
        l[r] += s[u][r];
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      float vc[C];
#pragma unroll
      for (int c = 0; c < C; ++c) vc[c] = scv[kvs_code<VB>(vw[u], c)];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const float pv = s[u][r] * vn[u];
#pragma unroll
        for (int c = 0; c < C; ++c) acc[r][c] = fmaf(pv, vc[c], acc[r][c]);
      }
    }
  }

  // Merge the token slots of the warp (lanes with the same `sub`), then the warps of the block.
#pragma unroll
  for (int r = 0; r < R; ++r) {
    float mw = m[r];
#pragma unroll
    for (int off = LPT; off < 32; off <<= 1) mw = fmaxf(mw, __shfl_xor_sync(FULL, mw, off));
    const float f = __expf(m[r] - kvs_finite_or_zero(mw));
    float lw = l[r] * f;
#pragma unroll
    for (int off = LPT; off < 32; off <<= 1) lw += __shfl_xor_sync(FULL, lw, off);
#pragma unroll
    for (int c = 0; c < C; ++c) {
      float a = acc[r][c] * f;
#pragma unroll
      for (int off = LPT; off < 32; off <<= 1) a += __shfl_xor_sync(FULL, a, off);
      acc[r][c] = a;
    }
    m[r] = mw;
    l[r] = lw;
  }
  if (grp == 0) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
#pragma unroll
      for (int c = 0; c < C; ++c) sacc[(warp * R + r) * D + sub * C + c] = acc[r][c];
      if (sub == 0) {
        sml[(warp * R + r) * 2] = m[r];
        sml[(warp * R + r) * 2 + 1] = l[r];
      }
    }
  }
  __syncthreads();
  const int64_t row0 = (static_cast<int64_t>(b * H + h) * n_splits + split) * R;
  kvs_merge_warps<R, D, WARPS, NT, false>(sacc, sml, part_o, part_ml, row0, tid);
  float* tail_extra = sacc;  // R x D, once the warps' partials are merged (attend_merge.cu)
