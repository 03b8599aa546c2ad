  // Tensor-core split kernel for 4-bit or 2-bit keys and values (KB == VB), R <= 8 query rows per kv head, D = 64
  // or 128.
  // Lane 4g+t of a warp. Per 16 tokens: scores Sᵀ (16 tokens x 8 rows) = K̂ (16 x D) · Qᵀ, keys dequantized
  // straight into A fragments (tokens g and g+8, the lane's quarter of their codes); the fp16 probabilities
  // (times the value norms) are transposed in registers into the B fragment of Oᵀ (D x 8 rows) += V̂ᵀ · Pᵀ,
  // whose A fragments pair two tokens' codes at one coordinate. The coordinate order inside a fragment is
  // a fixed permutation, the same for the query and the keys; outputs are written back in natural order.
  constexpr int NT = WARPS * 32;
  constexpr int KSTEPS = D / 16;
  static_assert(KB == VB && (KB == 4 || KB == 2), "one table: keys and values of one width, 4 or 2 bits");
  constexpr int KW = D * KB / 128;  // words of one token's key codes per lane: a quarter of the token
  constexpr int VBYTES = D * VB / 64;  // bytes of one token's value codes per lane: an eighth of the token
  constexpr int VW = VBYTES >= 4 ? VBYTES / 4 : 1;
  constexpr int MT = D / 16;  // m-tiles of the value product
  constexpr int STEP = 16 * U;
  // Dynamic shared memory: the centroid-pair table (a row per code pair: 256 at 4 bits, 16 at 2; 64 words a row,
  // one per lane and side), whose space the warps' partial results take afterwards, then the rotated query
  // (gpu.mma_shared_bytes says the same).
  constexpr int TABLE_BYTES = (1 << (2 * KB)) * 64 * 4;
  constexpr int WACC_BYTES = WARPS * R * (D + 2) * 4;
  constexpr int SQ_OFFSET = ((TABLE_BYTES > WACC_BYTES ? TABLE_BYTES : WACC_BYTES) + 15) / 16 * 16;
  constexpr unsigned FULL = 0xffffffffu;
  constexpr float LOG2E = 1.4426950408889634f;
  const float tail_qnat = 1.0f / LOG2E;  // sq · k̂ · tail_qnat: a score in natural-log units (append_token.cu)
  const float NEG_INF = -cuda::std::numeric_limits<float>::infinity();
  extern __shared__ __align__(16) unsigned char kvs_smem[];
  const unsigned char* table = kvs_smem;
  float* sq = reinterpret_cast<float*>(kvs_smem + SQ_OFFSET);  // R x D: rotated query, later the output

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
  const int T = lengths[b];  // tokens held by this row: buffers may be longer, rows may differ
  const int L = q_shape[2];
  const int G = R / L;
  const float scale = params[0];

  const int per = ((T + n_splits - 1) / n_splits + STEP - 1) / STEP * STEP;
  const int start = split * per;
  const int end = min(start + per, T);
  const int64_t kt = kidx_strides[2], vt = vidx_strides[2], kd = kidx_strides[3], vd = vidx_strides[3];
  const uint8_t* kp = kidx + b * kidx_strides[0] + h * kidx_strides[1] + t * (KW * 4) * kd;
  const uint8_t* vp = vidx + b * vidx_strides[0] + h * vidx_strides[1] + g * VBYTES * vd;
  const bool vec = kd == 1 && vd == 1 && (reinterpret_cast<uintptr_t>(kp) | static_cast<uintptr_t>(kt)) % (KW * 4) == 0 &&
                   (reinterpret_cast<uintptr_t>(vp) | static_cast<uintptr_t>(vt)) % VBYTES == 0;
  const auto* knp = knorm + b * knorm_strides[0] + h * knorm_strides[1];
  const auto* vnp = vnorm + b * vnorm_strides[0] + h * vnorm_strides[1];
  const int64_t knt = knorm_strides[2], vnt = vnorm_strides[2];
  const uint32_t kcol = lane * 4, vcol = 128 + lane * 4;

  struct Codes {
    uint32_t k[U][2][KW];  // tokens g, g+8: the lane's quarter of the key codes
    uint32_t v[U][4][VW];  // tokens 2t, 2t+1, 2t+8, 2t+9: the lane's eighth of the value codes
    float kn[U][2], vn[U][2];  // norms of tokens g, g+8
  };
  auto load = [&](int tau, Codes& c) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int tok = tau + 16 * u + g + 8 * j;
        if (tok < end) {
          kvs_load_codes<KW>(kp + tok * kt, kd, vec, c.k[u][j]);
          c.kn[u][j] = static_cast<float>(knp[tok * knt]);
          c.vn[u][j] = static_cast<float>(vnp[tok * vnt]);
        } else {
#pragma unroll
          for (int i = 0; i < KW; ++i) c.k[u][j][i] = 0u;
          c.kn[u][j] = 0.0f;
          c.vn[u][j] = 0.0f;
        }
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int tok = tau + 16 * u + 2 * t + (j & 1) + 8 * (j >> 1);
        if (tok < end) {
          kvs_load_bytes<VBYTES>(vp + tok * vt, vd, vec, c.v[u][j]);
        } else {
#pragma unroll
          for (int i = 0; i < VW; ++i) c.v[u][j][i] = 0u;
        }
      }
    }
  };

  // The small reads first (centroids, the query, its rotation's signs), then the first two steps' codes: at
  // launch every block floods the memory system, and what the set-up waits for must not queue behind that.
  __shared__ float scent[32];
  const int code = tid & 15;  // scent: 16 slots a side, the first 2^KB filled
  const float cent = tid < 32 && code < (1 << KB) ? __ldg(tid < 16 ? kcent + code : vcent + code) : 0.0f;
  const int r0 = warp;  // the query row this warp rotates (warps >= R have none)
  float v[D / 32], sg[ROUNDS > 0 ? ROUNDS : 1][D / 32];  // ROUNDS = 0: the query came rotated
  if (r0 < R) {
    const int hq = h * G + r0 / L, pos = r0 % L;
#pragma unroll
    for (int e = 0; e < D / 32; ++e) {
      v[e] = static_cast<float>(
          q[b * q_strides[0] + hq * q_strides[1] + pos * q_strides[2] + (lane * (D / 32) + e) * q_strides[3]]);
#pragma unroll
      for (int rd = 0; rd < ROUNDS; ++rd) sg[rd][e] = __ldg(signs + rd * D + lane * (D / 32) + e);
    }
  }
  // NB code buffers per warp: while one step is computed, the next NB - 1 steps' codes are in flight (the
  // loads' latency, not bandwidth, bounds a warp at head_dim 64; Nsight: long-scoreboard stalls).
  Codes c[NB];
  int tau = start + warp * STEP;
#pragma unroll
  for (int i = 0; i < NB - 1; ++i)
    if (tau + i * WARPS * STEP < end) load(tau + i * WARPS * STEP, c[i]);
  if (tid < 32) scent[tid] = cent;
  __syncthreads();
  // Tables: a row per code pair (its low code in the low bits) x 64 words; words 0-31 are the 32 lanes' copies
  // for keys, 32-63 for values.
  for (int i = tid; i < (1 << (2 * KB)) * 16; i += NT) {
    const int pair = i >> 4, side = (i & 15) < 8 ? 0 : 16;
    const uint32_t w = kvs_half2(scent[side + (pair & ((1 << KB) - 1))], scent[side + (pair >> KB)]);
    reinterpret_cast<uint4*>(kvs_smem)[i] = make_uint4(w, w, w, w);
  }
  // The query rows, rotated by the key rotation, times scale·log2(e) (the softmax runs in base 2).
  for (int r = r0; r < R; r += WARPS) {
    if (r != r0) {
      const int hq = h * G + r / L, pos = r % L;
#pragma unroll
      for (int e = 0; e < D / 32; ++e)
        v[e] = static_cast<float>(
            q[b * q_strides[0] + hq * q_strides[1] + pos * q_strides[2] + (lane * (D / 32) + e) * q_strides[3]]);
    }
    kvs_rotate_row<D, ROUNDS>(v, sg, lane);
    const float f = scale * LOG2E * powf(static_cast<float>(D), -0.5f * ROUNDS);
#pragma unroll
    for (int e = 0; e < D / 32; ++e) sq[r * D + lane * (D / 32) + e] = v[e] * f;
  }
  __syncthreads();
  // B fragments of Qᵀ: k-step s, lane (g, t) holds row g at coordinates (D/4)t + 4s + {0, 1} and {2, 3},
  // the coordinates that bytes 2s and 2s+1 of the lane's quarter of a key hold.
  uint32_t qf[KSTEPS][2];
#pragma unroll
  for (int s = 0; s < KSTEPS; ++s) {
    const int d0 = (D / 4) * t + 4 * s;
    qf[s][0] = g < R ? kvs_half2(sq[g * D + d0], sq[g * D + d0 + 1]) : 0u;
    qf[s][1] = g < R ? kvs_half2(sq[g * D + d0 + 2], sq[g * D + d0 + 3]) : 0u;
  }

  // Oᵀ fragments: o[mt][i] is coordinate (D/8)g + 2mt (i < 2) or that + 1 (i >= 2), row 2t + (i & 1).
  float o[MT][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int i = 0; i < 4; ++i) o[mt][i] = 0.0f;
  float m[2] = {NEG_INF, NEG_INF}, l[2] = {0.0f, 0.0f};  // rows 2t, 2t+1 (base 2)
  auto step = [&](const Codes& cur, int tau, Codes& refill, int tau_refill) {
    if (tau_refill < end) load(tau_refill, refill);
      float s[U][4];  // Sᵀ: (token g, row 2t), (g, 2t+1), (g+8, 2t), (g+8, 2t+1)
#pragma unroll
      for (int u = 0; u < U; ++u) {
        float odd[4];  // two accumulator chains: the k-steps' MMAs overlap
#pragma unroll
        for (int i = 0; i < 4; ++i) s[u][i] = odd[i] = 0.0f;
#pragma unroll
        for (int ks = 0; ks < KSTEPS; ++ks) {
          // Pairs 2ks and 2ks + 1 of the lane's quarter: coordinates (D/4)t + 4ks + {0, 1} and {2, 3}.
          kvs_mma(ks % 2 ? odd : s[u], kvs_pair<KB>(table, cur.k[u][0], kcol, 2 * ks),
                  kvs_pair<KB>(table, cur.k[u][1], kcol, 2 * ks), kvs_pair<KB>(table, cur.k[u][0], kcol, 2 * ks + 1),
                  kvs_pair<KB>(table, cur.k[u][1], kcol, 2 * ks + 1), qf[ks][0], qf[ks][1]);
        }
#pragma unroll
        for (int i = 0; i < 4; ++i) s[u][i] += odd[i];
        const bool in0 = tau + 16 * u + g < end, in1 = tau + 16 * u + g + 8 < end;
        s[u][0] = in0 ? s[u][0] * cur.kn[u][0] : NEG_INF;
        s[u][1] = in0 ? s[u][1] * cur.kn[u][0] : NEG_INF;
        s[u][2] = in1 ? s[u][2] * cur.kn[u][1] : NEG_INF;
        s[u][3] = in1 ? s[u][3] * cur.kn[u][1] : NEG_INF;
      }
      float mx0 = m[0], mx1 = m[1];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        mx0 = fmaxf(mx0, fmaxf(s[u][0], s[u][2]));
        mx1 = fmaxf(mx1, fmaxf(s[u][1], s[u][3]));
      }
      float base0, base1;
      kvs_softmax_rescale<MT>(mx0, mx1, m, l, o, base0, base1);
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const float p0 = kvs_exp2(s[u][0] - base0), p1 = kvs_exp2(s[u][1] - base1);
        const float p2 = kvs_exp2(s[u][2] - base0), p3 = kvs_exp2(s[u][3] - base1);
        l[0] += p0 + p2;
        l[1] += p1 + p3;
        // Pᵀ fragments: (token g, rows 2t, 2t+1) transposed to (row g, tokens 2t, 2t+1), and tokens + 8.
        const uint32_t pb0 = kvs_transpose8x8(kvs_half2(p0 * cur.vn[u][0], p1 * cur.vn[u][0]));
        const uint32_t pb1 = kvs_transpose8x8(kvs_half2(p2 * cur.vn[u][1], p3 * cur.vn[u][1]));
        // Pair i of lo/hi (a byte at 4 bits, a nibble at 2): the lane's code 2i / 2i+1 of token 2t (low code)
        // and of token 2t+1 (high code): pair mt holds m-tile mt's coordinates (D/8)g + 2mt / + 1.
        constexpr uint32_t LOW = VB == 4 ? 0x0F0F0F0Fu : 0x33333333u;
        uint32_t lo01[VW], hi01[VW], lo89[VW], hi89[VW];
#pragma unroll
        for (int w = 0; w < VW; ++w) {
          lo01[w] = (cur.v[u][0][w] & LOW) | ((cur.v[u][1][w] << VB) & ~LOW);
          hi01[w] = ((cur.v[u][0][w] >> VB) & LOW) | (cur.v[u][1][w] & ~LOW);
          lo89[w] = (cur.v[u][2][w] & LOW) | ((cur.v[u][3][w] << VB) & ~LOW);
          hi89[w] = ((cur.v[u][2][w] >> VB) & LOW) | (cur.v[u][3][w] & ~LOW);
        }
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
          kvs_mma(o[mt], kvs_pair<VB>(table, lo01, vcol, mt), kvs_pair<VB>(table, hi01, vcol, mt),
                  kvs_pair<VB>(table, lo89, vcol, mt), kvs_pair<VB>(table, hi89, vcol, mt), pb0, pb1);
      }
  };
  for (; tau < end; tau += NB * WARPS * STEP) {
#pragma unroll
    for (int i = 0; i < NB; ++i) {
      const int at = tau + i * WARPS * STEP;
      if (at >= end) break;
      step(c[i], at, c[(i + NB - 1) % NB], at + (NB - 1) * WARPS * STEP);
    }
  }
#pragma unroll
  for (int off = 4; off < 32; off <<= 1) {
    l[0] += __shfl_xor_sync(FULL, l[0], off);
    l[1] += __shfl_xor_sync(FULL, l[1], off);
  }
  __syncthreads();  // the tables are done with: their space takes the warps' partial results
  float* wacc = reinterpret_cast<float*>(kvs_smem);  // WARPS x R x D
  float* wml = wacc + WARPS * R * D;                  // WARPS x R x (m, l)
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int r = 2 * t + i;
    if (r < R) {
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        wacc[(warp * R + r) * D + (D / 8) * g + 2 * mt] = o[mt][i];
        wacc[(warp * R + r) * D + (D / 8) * g + 2 * mt + 1] = o[mt][2 + i];
      }
      if (g == 0) {
        wml[(warp * R + r) * 2] = m[i];
        wml[(warp * R + r) * 2 + 1] = l[i];
      }
    }
  }
  __syncthreads();
  const int64_t row0 = (static_cast<int64_t>(b * H + h) * n_splits + split) * R;
  kvs_merge_warps<R, D, WARPS, NT, true>(wacc, wml, part_o, part_ml, row0, tid);
  float* tail_extra = wacc;  // R x D, once the warps' partials are merged (attend_merge.cu)
