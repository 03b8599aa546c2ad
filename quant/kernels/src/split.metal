  constexpr int C = D / LPT;
  constexpr int TPW = 32 / LPT;
  constexpr int NT = WARPS * 32;
  constexpr int KWORDS = C * KB / 32;
  constexpr int VWORDS = C * VB / 32;
  constexpr int STEP = WARPS * TPW * U;

  threadgroup float sq[R * D];
  threadgroup float sck[1 << KB];
  threadgroup float scv[1 << VB];
  threadgroup float sacc[WARPS * R * D];
  threadgroup float sml[WARPS * R * 2];

  const int tid = thread_position_in_threadgroup.x;
  const int lane = thread_index_in_simdgroup;
  const int warp = simdgroup_index_in_threadgroup;
  const int grp = lane / LPT;
  const int sub = lane % LPT;
  const int split = threadgroup_position_in_grid.x;
  const int h = threadgroup_position_in_grid.y;
  const int b = threadgroup_position_in_grid.z;
  const int H = threadgroups_per_grid.y;
  const int n_splits = threadgroups_per_grid.x;
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
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (int rd = 0; rd < ROUNDS; ++rd) {
    for (int i = tid; i < R * D; i += NT) sq[i] *= signs[rd * D + i % D];
    threadgroup_barrier(mem_flags::mem_threadgroup);
    for (int len = 1; len < D; len <<= 1) {
      for (int i = tid; i < R * D / 2; i += NT) {
        const int r = i / (D / 2), k = i % (D / 2);
        const int lo = r * D + (k / len) * 2 * len + (k % len);
        const float a = sq[lo], c = sq[lo + len];
        sq[lo] = a + c;
        sq[lo + len] = a - c;
      }
      threadgroup_barrier(mem_flags::mem_threadgroup);
    }
  }
  const float hnorm = metal::pow(static_cast<float>(D), -0.5f * ROUNDS);
  float qr[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) qr[r][c] = sq[r * D + sub * C + c] * hnorm;

  const int start = split * TPS;
  const int end = metal::min(start + TPS, T);
  const device uint8_t* kp = kidx + b * kidx_strides[0] + h * kidx_strides[1] + sub * (C * KB / 8);
  const device uint8_t* vp = vidx + b * vidx_strides[0] + h * vidx_strides[1] + sub * (C * VB / 8);
  const int64_t kt = kidx_strides[2], vt = vidx_strides[2];
  const int64_t kn0 = b * knorm_strides[0] + h * knorm_strides[1];
  const int64_t vn0 = b * vnorm_strides[0] + h * vnorm_strides[1];
  const int64_t knt = knorm_strides[2], vnt = vnorm_strides[2];

  float m[R], l[R], acc[R][C];
  for (int r = 0; r < R; ++r) {
    m[r] = -INFINITY;
    l[r] = 0.0f;
    for (int c = 0; c < C; ++c) acc[r][c] = 0.0f;
  }

  for (int t0 = start + warp * TPW * U; t0 < end; t0 += STEP) {
    uint32_t kw[U][KWORDS], vw[U][VWORDS];
    float kn[U], vn[U];
    for (int u = 0; u < U; ++u) {
      const int t = t0 + u * TPW + grp;
      if (t < end) {
        kvs_load<KWORDS>(kp + t * kt, kw[u]);
        kvs_load<VWORDS>(vp + t * vt, vw[u]);
        kn[u] = static_cast<float>(knorm[kn0 + t * knt]);
        vn[u] = static_cast<float>(vnorm[vn0 + t * vnt]);
      } else {
        for (int i = 0; i < KWORDS; ++i) kw[u][i] = 0u;
        for (int i = 0; i < VWORDS; ++i) vw[u][i] = 0u;
        kn[u] = 0.0f;
        vn[u] = 0.0f;
      }
    }
    float s[U][R];
    for (int u = 0; u < U; ++u) {
      float kc[C];
      for (int c = 0; c < C; ++c) kc[c] = sck[kvs_code<KB>(kw[u], c)];
      for (int r = 0; r < R; ++r) {
        float a = 0.0f;
        for (int c = 0; c < C; ++c) a = metal::fma(qr[r][c], kc[c], a);
        s[u][r] = a;
      }
    }
    for (int u = 0; u < U; ++u)
      for (int r = 0; r < R; ++r)
        for (int off = LPT / 2; off > 0; off >>= 1) s[u][r] += simd_shuffle_xor(s[u][r], ushort(off));
    for (int u = 0; u < U; ++u) {
      const bool valid = t0 + u * TPW + grp < end;
      for (int r = 0; r < R; ++r) s[u][r] = valid ? s[u][r] * kn[u] : -INFINITY;
    }
    for (int r = 0; r < R; ++r) {
      float mnew = m[r];
      for (int u = 0; u < U; ++u) mnew = metal::max(mnew, s[u][r]);
      const float ms = kvs_finite_or_zero(mnew);
      const float corr = metal::exp(m[r] - ms);
      l[r] *= corr;
      for (int c = 0; c < C; ++c) acc[r][c] *= corr;
      m[r] = mnew;
      for (int u = 0; u < U; ++u) {
        s[u][r] = metal::exp(s[u][r] - ms);
        l[r] += s[u][r];
      }
    }
    for (int u = 0; u < U; ++u) {
      float vc[C];
      for (int c = 0; c < C; ++c) vc[c] = scv[kvs_code<VB>(vw[u], c)];
      for (int r = 0; r < R; ++r) {
        const float pv = s[u][r] * vn[u];
        for (int c = 0; c < C; ++c) acc[r][c] = metal::fma(pv, vc[c], acc[r][c]);
      }
    }
  }

  for (int r = 0; r < R; ++r) {
    float mw = m[r];
    for (int off = LPT; off < 32; off <<= 1) mw = metal::max(mw, simd_shuffle_xor(mw, ushort(off)));
    const float f = metal::exp(m[r] - kvs_finite_or_zero(mw));
    float lw = l[r] * f;
    for (int off = LPT; off < 32; off <<= 1) lw += simd_shuffle_xor(lw, ushort(off));
    for (int c = 0; c < C; ++c) {
      float a = acc[r][c] * f;
      for (int off = LPT; off < 32; off <<= 1) a += simd_shuffle_xor(a, ushort(off));
      acc[r][c] = a;
    }
    m[r] = mw;
    l[r] = lw;
  }
  if (grp == 0) {
    for (int r = 0; r < R; ++r) {
      for (int c = 0; c < C; ++c) sacc[(warp * R + r) * D + sub * C + c] = acc[r][c];
      if (sub == 0) {
        sml[(warp * R + r) * 2] = m[r];
        sml[(warp * R + r) * 2 + 1] = l[r];
      }
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  const int64_t row0 = (int64_t(b * H + h) * n_splits + split) * R;
  for (int i = tid; i < R * D; i += NT) {
    const int r = i / D;
    float mb = -INFINITY;
    for (int w = 0; w < WARPS; ++w) mb = metal::max(mb, sml[(w * R + r) * 2]);
    const float ms = kvs_finite_or_zero(mb);
    float v = 0.0f;
    for (int w = 0; w < WARPS; ++w) v += sacc[(w * R + r) * D + i % D] * metal::exp(sml[(w * R + r) * 2] - ms);
    part_o[row0 * D + i] = v;
  }
  if (tid < R) {
    float mb = -INFINITY;
    for (int w = 0; w < WARPS; ++w) mb = metal::max(mb, sml[(w * R + tid) * 2]);
    const float ms = kvs_finite_or_zero(mb);
    float lb = 0.0f;
    for (int w = 0; w < WARPS; ++w) lb += sml[(w * R + tid) * 2 + 1] * metal::exp(sml[(w * R + tid) * 2] - ms);
    part_ml[(row0 + tid) * 2] = mb;
    part_ml[(row0 + tid) * 2 + 1] = lb;
  }
