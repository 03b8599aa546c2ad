  // Tensor-core split kernel for codes of any coded layout (klt's calibrated plans): per-coordinate bit widths with
  // one codebook per run, fp16 or 8-bit log scales, keys decoded into model space by the method's synthesis S
  // (x̂ = S·ẑ + μ) and, for keys coded before RoPE, RoPE applied at their positions; values stay in the coded
  // domain (Σ p·ẑ, mapped back by the method once per query). D = 64 or 128, R <= 8 query rows per kv head.
  // Lane 4g+t of a warp, per 16 tokens (a tile):
  //   1. the tile's code rows and scales are copied to the warp's shared memory, and each coordinate's code is
  //      looked up in its run's codebook: keys as a (16 tokens x MPK) fp16 tile, values transposed (MPV x 16);
  //   2. K̂ (16 x D) = Ẑ (16 x MPK) · Sᵀ (MPK x D) on tensor cores (Sᵀ's B fragments in shared memory), times the
  //      tokens' scales, plus the key mean, then RoPE in the accumulators (a pair's two coordinates are held by
  //      one lane in both pair layouts);
  //   3. the accumulators, rounded to fp16, are the A fragments of the scores K̂ · Qᵀ (16 tokens x 8 rows);
  //   4. online softmax in base 2; the probabilities times the value scales, transposed in registers, are the B
  //      fragment of Oᵀ (MPV x 8 rows) += Ẑᵥᵀ · Pᵀ.
  // kcoord / vcoord: per coded coordinate, its bit offset in the token's code row (bits 0-11), its width (12-15)
  // and its codebook's first entry in kcent / vcent (16-31); width 0: a padding coordinate (value 0).
  // params: scale, the key / value log-scale centres, the position of the segment's first token, the key and value
  // code rows' bytes. NKC / NVC: the codebook tables' entries, rounded up.
  constexpr int NT = WARPS * 32;
  constexpr int NTL = D / 8;   // n-tiles of the key product: model-space coordinates
  constexpr int KSK = MPK / 16;  // k-steps of the key product: coded key coordinates
  constexpr int MTV = MPV / 16;  // m-tiles of the value product: coded value coordinates
  constexpr int ZK = MPK + 8;  // halves a token row of the key tile takes (padded: fragment loads hit 32 banks)
  constexpr int ZV = 24;  // halves a coordinate row of the transposed value tile takes
  // A token's code row takes rbk (rbv) bytes, at most MPK (MPV): run-time values, so that the layers of one model,
  // whose plans differ, share a few compiled kernels (one per padded width and codebook size).
  constexpr int KSPAN = 16 * MPK + 4;  // a tile's key code rows in the warp's shared memory (a byte of padding
  constexpr int RB = KSPAN + 16 * MPV + 4;  // read past the last row), then its value code rows
  constexpr int CK = MPK / 8, CV = MPV / 8;  // words of the spans a lane loads, at most
  constexpr int NP = NTL;  // RoPE pairs a lane holds per token
  constexpr int SB_WORDS = KSK * NTL * 32;  // uint2 B fragments of Sᵀ
  constexpr int WARP_BYTES = ((16 * ZK + MPV * ZV) * 2 + RB + 32 * 4 + 15) / 16 * 16;
  constexpr unsigned FULL = 0xffffffffu;
  constexpr float LOG2E = 1.4426950408889634f;
  const float NEG_INF = -cuda::std::numeric_limits<float>::infinity();
  extern __shared__ __align__(16) unsigned char kvs_smem[];
  __shared__ int kco[MPK], vco[MPV];
  __shared__ float kc[NKC], vc[NVC];
  __shared__ float smu[D], som[D / 2], sc8[D / 2], ss8[D / 2];

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int g = lane >> 2;
  const int t = lane & 3;
  const int split = blockIdx.x;
  const int h = blockIdx.y;
  const int b = blockIdx.z;
  const int H = gridDim.y;
  const int n_splits = gridDim.x;
  const int T = lengths[b];
  const int L = q_shape[2];
  const int G = R / L;
  const float scale = params[0], kcenter = params[1], vcenter = params[2], pos0 = params[3];
  const int rbk = static_cast<int>(params[4]), rbv = static_cast<int>(params[5]);

  uint2* sB = reinterpret_cast<uint2*>(kvs_smem);
  unsigned char* own = kvs_smem + SB_WORDS * 8 + warp * WARP_BYTES;
  __half* zk = reinterpret_cast<__half*>(own);
  __half* zv = zk + 16 * ZK;
  uint8_t* rows = reinterpret_cast<uint8_t*>(zv + MPV * ZV);
  float* sc = reinterpret_cast<float*>(rows + RB);  // key scales of the tile's tokens, then value scales

  const int sh = synth_shape[0] == 1 ? 0 : h;
  for (int i = tid; i < SB_WORDS; i += NT)
    sB[i] = make_uint2(__ldg(synth + (static_cast<int64_t>(sh) * SB_WORDS + i) * 2),
                       __ldg(synth + (static_cast<int64_t>(sh) * SB_WORDS + i) * 2 + 1));
  for (int i = tid; i < MPK; i += NT) kco[i] = kcoord[i];
  for (int i = tid; i < MPV; i += NT) vco[i] = vcoord[i];
  for (int i = tid; i < NKC; i += NT) kc[i] = kcent[i];
  for (int i = tid; i < NVC; i += NT) vc[i] = vcent[i];

  // B fragments of Qᵀ times scale·log2(e): k-step j, lane (g, t) holds row g at coordinates 16j + 2t + {0, 1}
  // and 16j + 8 + 2t + {0, 1}.
  uint32_t qf[D / 16][2];
  {
    const int hq = h * G + g / L, pos = g % L;
    const int64_t q0 = b * q_strides[0] + hq * q_strides[1] + pos * q_strides[2];
    const float f = scale * LOG2E;
#pragma unroll
    for (int j = 0; j < D / 16; ++j)
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        const int d = 16 * j + 8 * i + 2 * t;
        qf[j][i] = g < R ? kvs_half2(static_cast<float>(q[q0 + d * q_strides[3]]) * f,
                                     static_cast<float>(q[q0 + (d + 1) * q_strides[3]]) * f)
                         : 0u;
      }
  }
  // The key mean, and per RoPE pair its frequency with the rotation by 8 positions that takes token g's angles to
  // token g + 8's: in shared memory, not registers (at head_dim 128 these would be 80 registers a thread).
  for (int d = tid; d < D; d += NT)
    smu[d] = HAS_MEAN ? static_cast<float>(kmean[b * kmean_strides[0] + h * kmean_strides[1] + d * kmean_strides[3]])
                      : 0.0f;
  for (int i = tid; i < D / 2; i += NT) {
    som[i] = ROPE ? __ldg(omega + i) : 0.0f;
    kvs_sincos(8.0f * som[i], ss8[i], sc8[i]);
  }

  constexpr int STEP = 16;
  const int per = ((T + n_splits - 1) / n_splits + STEP - 1) / STEP * STEP;
  const int start = split * per;
  const int end = min(start + per, T);
  const int64_t kt = kidx_strides[2], vt = vidx_strides[2], kd = kidx_strides[3], vd = vidx_strides[3];
  const uint8_t* kp = kidx + b * kidx_strides[0] + h * kidx_strides[1];
  const uint8_t* vp = vidx + b * vidx_strides[0] + h * vidx_strides[1];
  const auto* knp = knorm + b * knorm_strides[0] + h * knorm_strides[1];
  const auto* vnp = vnorm + b * vnorm_strides[0] + h * vnorm_strides[1];
  const int64_t knt = knorm_strides[2], vnt = vnorm_strides[2];
  __syncthreads();

  float o[MTV][4];
#pragma unroll
  for (int mt = 0; mt < MTV; ++mt)
#pragma unroll
    for (int i = 0; i < 4; ++i) o[mt][i] = 0.0f;
  float m[2] = {NEG_INF, NEG_INF}, l[2] = {0.0f, 0.0f};  // rows 2t, 2t+1 (base 2)
  // A tile's key codes are 16 rows of rbk bytes, one span in the buffer (rows rbk apart, as the cache lays them
  // out): each lane loads up to CK words of it and CV of the values', the next tile's while this one is computed.
  const bool words = kt == rbk && kd == 1 && vt == rbv && vd == 1 &&
                     ((reinterpret_cast<uintptr_t>(kp) | reinterpret_cast<uintptr_t>(vp)) & 3) == 0;
  struct Tile {
    uint32_t k[CK], v[CV];
    float scale;  // lanes 0-15: token lane's key scale; 16-31: token lane − 16's value scale
  };
  auto load = [&](int tau, Tile& x) {
    const bool full = words && tau + 16 <= end;
    kvs_load_span<CK>(kp, rbk, kt, kd, tau, end, full, lane, x.k);
    kvs_load_span<CV>(vp, rbv, vt, vd, tau, end, full, lane, x.v);
    const int tok = tau + (lane & 15);
    x.scale = 0.0f;
    if (tok < end) {
      const float n = lane < 16 ? static_cast<float>(knp[tok * knt]) : static_cast<float>(vnp[tok * vnt]);
      const bool logscale = lane < 16 ? KLOG : VLOG;
      x.scale = logscale ? exp2f((n - 128.0f) * 0.0625f + (lane < 16 ? kcenter : vcenter)) : n;
    }
  };
  Tile next;
  if (start + warp * STEP < end) load(start + warp * STEP, next);
  for (int tau = start + warp * STEP; tau < end; tau += WARPS * STEP) {
    // 1. The tile's codes and scales to shared memory, the next tile's loads issued, then the centroids.
    uint32_t* kspan = reinterpret_cast<uint32_t*>(rows);
    uint32_t* vspan = reinterpret_cast<uint32_t*>(rows + KSPAN);
#pragma unroll
    for (int j = 0; j < CK; ++j)
      if (lane + 32 * j < 4 * rbk) kspan[lane + 32 * j] = next.k[j];
#pragma unroll
    for (int j = 0; j < CV; ++j)
      if (lane + 32 * j < 4 * rbv) vspan[lane + 32 * j] = next.v[j];
    sc[lane] = next.scale;
    if (tau + WARPS * STEP < end) load(tau + WARPS * STEP, next);
    __syncwarp();
    for (int i = lane; i < 16 * (MPK / 2); i += 32) {
      const int tok = i / (MPK / 2), c = 2 * (i - tok * (MPK / 2));
      const uint8_t* row = rows + tok * rbk;
      *reinterpret_cast<uint32_t*>(zk + tok * ZK + c) = kvs_half2(kvs_coded(row, kco[c], kc),
                                                                  kvs_coded(row, kco[c + 1], kc));
    }
    for (int i = lane; i < MPV * 8; i += 32) {
      const int c = i >> 3, tok = 2 * (i & 7);
      const uint8_t* row = rows + KSPAN + tok * rbv;
      *reinterpret_cast<uint32_t*>(zv + c * ZV + tok) = kvs_half2(kvs_coded(row, vco[c], vc),
                                                                  kvs_coded(row + rbv, vco[c], vc));
    }
    __syncwarp();
    // 2. K̂ = Ẑ·Sᵀ: acc[nt] holds (token g, coordinates 8nt + 2t, + 1) and (token g + 8, the same).
    float acc[NTL][4];
#pragma unroll
    for (int nt = 0; nt < NTL; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[nt][i] = 0.0f;
#pragma unroll
    for (int ks = 0; ks < KSK; ++ks) {
      const __half* z0 = zk + g * ZK + 16 * ks + 2 * t;
      const uint32_t a0 = *reinterpret_cast<const uint32_t*>(z0);
      const uint32_t a1 = *reinterpret_cast<const uint32_t*>(z0 + 8 * ZK);
      const uint32_t a2 = *reinterpret_cast<const uint32_t*>(z0 + 8);
      const uint32_t a3 = *reinterpret_cast<const uint32_t*>(z0 + 8 * ZK + 8);
#pragma unroll
      for (int nt = 0; nt < NTL; ++nt) {
        const uint2 bf = sB[(ks * NTL + nt) * 32 + lane];
        kvs_mma(acc[nt], a0, a1, a2, a3, bf.x, bf.y);
      }
    }
    const float sk[2] = {sc[g], sc[g + 8]};
#pragma unroll
    for (int nt = 0; nt < NTL; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[nt][i] = acc[nt][i] * sk[i >> 1] + smu[8 * nt + 2 * t + (i & 1)];
    if constexpr (ROPE) {
      const float pg = pos0 + static_cast<float>(tau + g);
#pragma unroll
      for (int p = 0; p < NP; ++p) {
        // ROPE 1 (pairs i, i + D/2): the lane's pair p is coordinate 8(p/2) + 2t + p%2 of the first half; ROPE 2
        // (pairs 2i, 2i + 1): coordinates 8p + 2t, + 1.
        const int i = ROPE == 1 ? 8 * (p / 2) + 2 * t + p % 2 : 4 * p + t;
        float s, c;
        kvs_sincos(pg * som[i], s, c);
        const float s1 = s * sc8[i] + c * ss8[i], c1 = c * sc8[i] - s * ss8[i];  // token g + 8
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float cs = e ? c1 : c, sn = e ? s1 : s;
          float& x1 = ROPE == 1 ? acc[p / 2][2 * e + p % 2] : acc[p][2 * e];
          float& x2 = ROPE == 1 ? acc[p / 2 + NTL / 2][2 * e + p % 2] : acc[p][2 * e + 1];
          const float y1 = x1 * cs - x2 * sn, y2 = x1 * sn + x2 * cs;
          x1 = y1;
          x2 = y2;
        }
      }
    }
    // 3. Scores Sᵀ: (token g, row 2t), (g, 2t+1), (g+8, 2t), (g+8, 2t+1).
    float s[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
    for (int j = 0; j < D / 16; ++j)
      kvs_mma(s, kvs_half2(acc[2 * j][0], acc[2 * j][1]), kvs_half2(acc[2 * j][2], acc[2 * j][3]),
              kvs_half2(acc[2 * j + 1][0], acc[2 * j + 1][1]), kvs_half2(acc[2 * j + 1][2], acc[2 * j + 1][3]),
              qf[j][0], qf[j][1]);
    const bool in0 = tau + g < end, in1 = tau + g + 8 < end;
    s[0] = in0 ? s[0] : NEG_INF;
    s[1] = in0 ? s[1] : NEG_INF;
    s[2] = in1 ? s[2] : NEG_INF;
    s[3] = in1 ? s[3] : NEG_INF;
    // 4. Online softmax, then Oᵀ += Ẑᵥᵀ·(P·scales)ᵀ.
    float base0, base1;
    kvs_softmax_rescale<MTV>(fmaxf(m[0], fmaxf(s[0], s[2])), fmaxf(m[1], fmaxf(s[1], s[3])), m, l, o, base0, base1);
    const float p0 = kvs_exp2(s[0] - base0), p1 = kvs_exp2(s[1] - base1);
    const float p2 = kvs_exp2(s[2] - base0), p3 = kvs_exp2(s[3] - base1);
    l[0] += p0 + p2;
    l[1] += p1 + p3;
    const float vn0 = sc[16 + g], vn1 = sc[24 + g];
    const uint32_t pb0 = kvs_transpose8x8(kvs_half2(p0 * vn0, p1 * vn0));
    const uint32_t pb1 = kvs_transpose8x8(kvs_half2(p2 * vn1, p3 * vn1));
#pragma unroll
    for (int mt = 0; mt < MTV; ++mt) {
      const __half* z0 = zv + (16 * mt + g) * ZV + 2 * t;
      kvs_mma(o[mt], *reinterpret_cast<const uint32_t*>(z0), *reinterpret_cast<const uint32_t*>(z0 + 8 * ZV),
              *reinterpret_cast<const uint32_t*>(z0 + 8), *reinterpret_cast<const uint32_t*>(z0 + 8 * ZV + 8), pb0,
              pb1);
    }
    __syncwarp();  // the tile's shared memory is read: the next tile may overwrite it
  }
#pragma unroll
  for (int off = 4; off < 32; off <<= 1) {
    l[0] += __shfl_xor_sync(FULL, l[0], off);
    l[1] += __shfl_xor_sync(FULL, l[1], off);
  }
  __syncthreads();  // Sᵀ and the tiles are done with: their space takes the warps' partial results
  float* wacc = reinterpret_cast<float*>(kvs_smem);  // WARPS x R x MPV
  float* wml = wacc + WARPS * R * MPV;               // WARPS x R x (m, l)
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int r = 2 * t + i;
    if (r < R) {
#pragma unroll
      for (int mt = 0; mt < MTV; ++mt) {
        wacc[(warp * R + r) * MPV + 16 * mt + g] = o[mt][i];
        wacc[(warp * R + r) * MPV + 16 * mt + g + 8] = o[mt][2 + i];
      }
      if (g == 0) {
        wml[(warp * R + r) * 2] = m[i];
        wml[(warp * R + r) * 2 + 1] = l[i];
      }
    }
  }
  __syncthreads();
  const int64_t row0 = (static_cast<int64_t>(b * H + h) * n_splits + split) * R;
  kvs_merge_warps<R, MPV, WARPS, NT, true>(wacc, wml, part_o, part_ml, row0, tid);
