// Flash-decoding over packed KV codes on the CPU: one call attends one code segment for every (batch, kv head,
// query row), reading the codes directly; fp16 K/V of the history never exist.
//
// A token's codes are one little-endian bit stream of runs (n coordinates of b bits, each run with its own
// centroid table). Keys: scores come from the codes decoded in the method's rotated domain and dotted with
// the rotated query (<q, S z> = <S^T q, z>), times the token's scale. Keys coded before RoPE cannot be scored
// there (RoPE turns every token by its own angles): each is decoded, mapped back by the per-head synthesis S
// (d x m), shifted by the key mean, turned by RoPE at its position and dotted with the plain query. Values are
// accumulated in their rotated domain (the caller un-rotates once). The softmax is online per block of tokens;
// the context is split into chunks that the threads take, whose partial (max, sum, acc) are merged at the end.

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

#define BLOCK 64        // tokens decoded together: their codes and scores stay in L1
#define MAX_DIM 512     // coordinates per token (rotated or head dim)
#define MAX_BYTES 1024  // code bytes per token

// How one token's codes decode: groups of up to 8 coordinates of one run (same bit width and codebook),
// each read from a 64-bit window of the bit stream at its bit offset. Every run's centroids sit in
// `centroids` from `group_table`, padded to at least 16 entries.
typedef struct {
    int32_t dim, bytes, n_groups;
    const int32_t *group_coord, *group_offset, *group_bits, *group_count, *group_table;
    const float *centroids;
    const float *scale_table;  // the 256 scales a log-scale byte stands for; NULL: fp16 scales
    int32_t fp16;  // 1: no codes but the fp16 values themselves (sinks, the recent window), no scale
} code_layout;

typedef struct {
    const uint8_t *codes;
    const void *scale;
    int64_t codes_b, codes_h, codes_t;  // strides in bytes
    int64_t scale_b, scale_h, scale_t;  // strides in elements
} code_tensor;

// Vectors of 8 floats (GCC/Clang vector extensions: AVX registers where the target has them, pairs of SSE
// registers or scalars where not). Internal buffers are 32-byte aligned with rows padded to 16 floats; v8u
// reads the caller's arrays, which need not be aligned.
typedef float v8 __attribute__((vector_size(32)));
typedef float v8u __attribute__((vector_size(32), aligned(4)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef uint32_t v8ui __attribute__((vector_size(32)));
#define LANES 8

// A scalar in every lane. Not `(v8){0} + s`: 0 + s is not s for s = -0, so that costs an add before the
// broadcast in the innermost loops.
static inline v8 splat(float s) { return (v8){s, s, s, s, s, s, s, s}; }

static inline float half_to_float(uint16_t bits) {
    _Float16 h;  // F16C's vcvtph2ps where the target has it
    memcpy(&h, &bits, 2);
    return (float)h;
}

static inline float token_scale(const code_layout *L, const code_tensor *c, int64_t b, int64_t h, int64_t t) {
    if (L->fp16) return 1.0f;
    int64_t at = b * c->scale_b + h * c->scale_h + t * c->scale_t;
    if (L->scale_table) return L->scale_table[((const uint8_t *)c->scale)[at]];
    return half_to_float(((const uint16_t *)c->scale)[at]);
}

// Codes of up to 4 bits: the 8 codes of a group shifted into 8 lanes at once, looked up in the 16-entry table
// by two register permutes (vpermps on AVX2) and a select. Wider codes: see decode_block.
// Lane k of a group of b-bit codes starts at bit k * b of its window.
static const v8ui LANE_SHIFTS[5] = {{0}, {0, 1, 2, 3, 4, 5, 6, 7}, {0, 2, 4, 6, 8, 10, 12, 14},
                                    {0, 3, 6, 9, 12, 15, 18, 21}, {0, 4, 8, 12, 16, 20, 24, 28}};

// The common layout (TurboQuant-MSE, uniform klt): one run of 1, 2 or 4 bits over whole groups of 8, so
// group g's codes are b whole bytes at byte g * b: read in place (no window past the token) and, with b a
// constant at each call below, shifted by constants.
static int uniform_bits(const code_layout *L) {
    if (L->fp16) return 16;
    const int b = L->n_groups ? L->group_bits[0] : 0;
    if ((b != 1 && b != 2 && b != 4) || L->dim != 8 * L->n_groups) return 0;
    for (int g = 0; g < L->n_groups; g++)
        if (L->group_bits[g] != b || L->group_count[g] != 8 || L->group_offset[g] != 8 * b * g ||
            L->group_coord[g] != 8 * g || L->group_table[g] != 0)
            return 0;
    return b;
}

static inline __attribute__((always_inline)) void decode_uniform_bits(const code_layout *L, const int b,
                                                                      const uint8_t *restrict src, float *restrict z) {
    const v8 low = *(const v8u *)L->centroids, high = *(const v8u *)(L->centroids + 8);
    for (int g = 0; g < L->n_groups; g++) {
        uint32_t window = 0;
        memcpy(&window, src + g * b, (size_t)b);
        const v8i idx = (v8i)((((v8ui){0} + window) >> LANE_SHIFTS[b]) & ((1u << b) - 1));
        if (b < 4) {
            *(v8 *)(z + 8 * g) = __builtin_shuffle(low, idx);
        } else {
            const v8i upper = idx > 7;
            *(v8 *)(z + 8 * g) = (v8)(((v8i)__builtin_shuffle(low, idx) & ~upper) | ((v8i)__builtin_shuffle(high, idx) & upper));
        }
    }
}

// fp16 values (F16C's vcvtph2ps where the target has it), 8 at a time.
typedef _Float16 v8h __attribute__((vector_size(16), aligned(2)));
static inline void decode_fp16(int dim, const uint8_t *restrict src, float *restrict z) {
    int i = 0;
    for (; i + LANES <= dim; i += LANES) *(v8u *)(z + i) = __builtin_convertvector(*(const v8h *)(src + 2 * i), v8);
    for (; i < dim; i++) z[i] = half_to_float(((const uint16_t *)src)[i]);
}

// A block's n tokens decoded into rows of z (`stride` floats apart); src[t]: token t's codes, followed in
// memory by at least 8 readable bytes (the caller copies a segment's last token beside zeros). Uniform
// layouts (uniform_bits' answer) go token by token through the constant-width loops. Mixed layouts go group by
// group over the block's tokens: a group's bit offset, width, shifts and centroids are read once per block and
// stay in registers across its tokens, where one token at a time re-read them for every group.
static void decode_block(const code_layout *L, int uniform, const uint8_t *const *src, int n, float *restrict z,
                         int stride) {
    switch (uniform) {
        case 4: for (int t = 0; t < n; t++) decode_uniform_bits(L, 4, src[t], z + t * stride); return;
        case 2: for (int t = 0; t < n; t++) decode_uniform_bits(L, 2, src[t], z + t * stride); return;
        case 1: for (int t = 0; t < n; t++) decode_uniform_bits(L, 1, src[t], z + t * stride); return;
        case 16: for (int t = 0; t < n; t++) decode_fp16(L->dim, src[t], z + t * stride); return;
    }
    for (int g = 0; g < L->n_groups; g++) {
        const int off = L->group_offset[g], b = L->group_bits[g];
        const int byte = off >> 3, shift = off & 7;
        const float *restrict centroids = L->centroids + L->group_table[g];
        float *restrict to = z + L->group_coord[g];
        if (b <= 4) {  // lanes past the group's count are overwritten by the next group or padding
            const v8ui lane_shifts = LANE_SHIFTS[b], mask = (v8ui){0} + ((1u << b) - 1);
            const v8 low = *(const v8u *)centroids, high = *(const v8u *)(centroids + 8);
            for (int t = 0; t < n; t++) {
                uint64_t window;
                memcpy(&window, src[t] + byte, 8);
                const v8i idx = (v8i)((((v8ui){0} + (uint32_t)(window >> shift)) >> lane_shifts) & mask);
                v8 out;
                if (b < 4) {  // at most 8 centroids: one permute
                    out = __builtin_shuffle(low, idx);
                } else {
                    const v8i upper = idx > 7;
                    out = (v8)(((v8i)__builtin_shuffle(low, idx) & ~upper) | ((v8i)__builtin_shuffle(high, idx) & upper));
                }
                *(v8u *)(to + t * stride) = out;
            }
        } else {
#if defined(__AVX2__)
            // 5-8 bits: lanes 0-3 read the low 32 bits of the window, lanes 4-7 the 32 from lane 4's code on (a
            // group holds at most 56 bits), so every lane's code is in its 32-bit word. Then the table: 32 or 64
            // centroids in two or four 512-bit registers (vpermt2ps, and a select on bit 5), else a gather.
            const v8ui lane_shifts = {0, b, 2 * b, 3 * b, 0, b, 2 * b, 3 * b}, mask = (v8ui){0} + ((1u << b) - 1);
#if defined(__AVX512F__)
            const __m512 t0 = _mm512_loadu_ps(centroids), t1 = _mm512_loadu_ps(centroids + 16);
            const __m512 t2 = b == 6 ? _mm512_loadu_ps(centroids + 32) : t0, t3 = b == 6 ? _mm512_loadu_ps(centroids + 48) : t1;
#endif
            for (int t = 0; t < n; t++) {
                uint64_t window;
                memcpy(&window, src[t] + byte, 8);
                window >>= shift;
                const uint32_t lo = (uint32_t)window, hi = (uint32_t)(window >> (4 * b));
                const v8i idx = (v8i)(((v8ui){lo, lo, lo, lo, hi, hi, hi, hi} >> lane_shifts) & mask);
                float *restrict row = to + t * stride;
#if defined(__AVX512F__)
                if (b <= 6) {
                    const __m512i wide = _mm512_zextsi256_si512((__m256i)idx);
                    __m512 out = _mm512_permutex2var_ps(t0, wide, t1);
                    if (b == 6)
                        out = _mm512_mask_blend_ps(_mm512_test_epi32_mask(wide, _mm512_set1_epi32(32)), out,
                                                   _mm512_permutex2var_ps(t2, wide, t3));
                    _mm256_storeu_ps(row, _mm512_castps512_ps256(out));
                    continue;
                }
#endif
                _mm256_storeu_ps(row, _mm256_i32gather_ps(centroids, (__m256i)idx, 4));
            }
#else
            const uint64_t mask = (1u << b) - 1;
            const int count = L->group_count[g];
            for (int t = 0; t < n; t++) {
                uint64_t window;
                memcpy(&window, src[t] + byte, 8);
                window >>= shift;
                float *restrict row = to + t * stride;
                for (int k = 0; k < count; k++) row[k] = centroids[(window >> (k * b)) & mask];
            }
#endif
        }
    }
}

static inline float hsum(v8 v) {
    return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

// e^x for x <= 0, 8 at a time, in plain arithmetic (libm's expf is a call per element): 2^n * 2^f with
// f in [-1/2, 1/2] and a degree-6 Taylor polynomial of 2^f (relative error < 2e-7). Inputs below -87
// (masked scores included) give e^-87, a weight of 1e-38 beside the row maximum's 1.
static inline v8 exp_nonpositive(v8 x) {
    const v8 low = splat(-87.0f), magic = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
    v8i below = x < low;
    x = (v8)(((v8i)x & ~below) | ((v8i)low & below));
    v8 t = x * 1.44269504f, n = (t + magic) - magic, f = (t - n) * 0.693147181f;
    v8 p = 1.0f + f * (1.0f + f * (0.5f + f * (1.0f / 6 + f * (1.0f / 24 + f * (1.0f / 120 + f * (1.0f / 720))))));
    v8i e = (__builtin_convertvector(n, v8i) + 127) << 23;
    return p * (v8)e;
}

static inline float dot(const v8 *a, const v8 *b, int chunks) {
    v8 s = a[0] * b[0];
    for (int c = 1; c < chunks; c++) s += a[c] * b[c];
    return hsum(s);
}

// acc[0 .. chunks) = acc * scale + sum_t w[t] * rows[t], rows `stride` floats apart: eight chunks (64 floats)
// at a time in registers, so each accumulator is loaded and stored once per block, not once per token.
static inline void accumulate(v8 *acc, int chunks, float scale, const float *w, const float *rows, int stride,
                              int n) {
    for (int g = 0; g < chunks; g += 8) {
        const int in_group = chunks - g < 8 ? chunks - g : 8;
        v8 a[8];
        for (int c = 0; c < 8; c++) a[c] = c < in_group ? acc[g + c] * scale : (v8){0};
        for (int t = 0; t < n; t++) {
            const v8 wt = splat(w[t]), *row = (const v8 *)(rows + (int64_t)t * stride) + g;
            for (int c = 0; c < 8; c++)
                if (c < in_group) a[c] += wt * row[c];
        }
        for (int c = 0; c < in_group; c++) acc[g + c] = a[c];
    }
}

// Keys coded before RoPE: n_pairs angular frequencies; traditional pairs (2i, 2i+1), else (i, i + n_pairs).
// synthesis_t and key_mean rows are padded (with zeros) to `dim_padded` floats, a multiple of 16.
typedef struct {
    int32_t n_pairs, traditional;
    const double *omega;
    int64_t first_position;
    const float *synthesis_t;  // (H, m, dim_padded): row j of head h is column j of S_h
    const float *key_mean;     // (B, H, dim_padded) or NULL
    int64_t mean_b, mean_h;
    int32_t dim_padded;
} pre_rope;

// RoPE of a block of n tokens as x' = x * C + partner(x) * S per coordinate, C and S rows (stride floats) per
// token: cosines and signed sines. Each pair's angle is stepped from the block's first position by the angle
// of one position (in double precision; pairs side by side, so the steps vectorise).
static void rope_table(const pre_rope *P, int64_t position, int n, int dim, int stride, float *C, float *S) {
    double c[MAX_DIM / 2], s[MAX_DIM / 2], c1[MAX_DIM / 2], s1[MAX_DIM / 2];
    const int pairs = P->n_pairs;
    for (int i = 0; i < pairs; i++) {
        c[i] = cos((double)position * P->omega[i]);
        s[i] = sin((double)position * P->omega[i]);
        c1[i] = cos(P->omega[i]);
        s1[i] = sin(P->omega[i]);
    }
    for (int t = 0; t < n; t++) {
        float *Ct = C + t * stride, *St = S + t * stride;
        for (int i = 2 * pairs; i < dim; i++) {
            Ct[i] = 1.0f;
            St[i] = 0.0f;
        }
        for (int i = 0; i < pairs; i++) {
            const int a = P->traditional ? 2 * i : i, b = P->traditional ? 2 * i + 1 : i + pairs;
            Ct[a] = Ct[b] = (float)c[i];
            St[a] = (float)-s[i];
            St[b] = (float)s[i];
        }
        for (int i = 0; i < pairs; i++) {
            const double next_c = c[i] * c1[i] - s[i] * s1[i];
            s[i] = s[i] * c1[i] + c[i] * s1[i];
            c[i] = next_c;
        }
    }
}

static inline int partner(const pre_rope *P, int i) {
    if (P->traditional) return i < 2 * P->n_pairs ? i ^ 1 : i;
    return i < P->n_pairs ? i + P->n_pairs : i < 2 * P->n_pairs ? i - P->n_pairs : i;
}

// x' = x * C + partner(x) * S over whole vectors: partner swaps neighbours (traditional) or halves of the
// rotated dims (a multiple of 16 of them); other layouts go coordinate by coordinate.
static inline void rope_apply(const pre_rope *P, int qdim, const v8 *x, const float *C, const float *S,
                              const int32_t *partner_of, float *out) {
    const int chunks = (qdim + LANES - 1) / LANES, half = P->n_pairs / LANES;
    if (P->traditional && qdim % LANES == 0) {
        for (int c = 0; c < chunks; c++) {
            const v8 swapped = __builtin_shuffle(x[c], (v8i){1, 0, 3, 2, 5, 4, 7, 6});
            *(v8u *)(out + c * LANES) = x[c] * *(const v8u *)(C + c * LANES) + swapped * *(const v8u *)(S + c * LANES);
        }
    } else if (!P->traditional && qdim % LANES == 0 && P->n_pairs % LANES == 0) {
        for (int c = 0; c < chunks; c++) {
            const v8 other = c < half ? x[c + half] : c < 2 * half ? x[c - half] : x[c];
            *(v8u *)(out + c * LANES) = x[c] * *(const v8u *)(C + c * LANES) + other * *(const v8u *)(S + c * LANES);
        }
    } else {
        const float *xs = (const float *)x;
        for (int i = 0; i < qdim; i++) out[i] = xs[i] * C[i] + xs[partner_of[i]] * S[i];
    }
}

// X = Z S^T for a block of n tokens: row t of Z (m coded coordinates, `zstride` floats apart) times the head's
// synthesis (St: m rows of dp floats, dp a multiple of 16) gives row t of X. Tiles of 6 tokens x 16 outputs:
// twelve accumulators in registers, each loaded row of St serving six tokens, each broadcast coordinate two
// vectors, so the FMA units rather than the loads set the pace. Z's rows n .. up to a multiple of 6 are read
// and must be zero.
#define SYN_TOKENS 6
#if !defined(__AVX512F__)
static void synthesize(const float *restrict z, int zstride, const float *restrict St, int dp, int m, int n,
                       float *restrict x, int xstride) {
    for (int t = 0; t < n; t += SYN_TOKENS)
        for (int c = 0; c < dp; c += 2 * LANES) {
            v8 a[SYN_TOKENS][2];
            for (int i = 0; i < SYN_TOKENS; i++) a[i][0] = a[i][1] = (v8){0};
            const float *zt = z + (int64_t)t * zstride;
            for (int j = 0; j < m; j++) {
                const v8 r0 = *(const v8u *)(St + (int64_t)j * dp + c), r1 = *(const v8u *)(St + (int64_t)j * dp + c + LANES);
                for (int i = 0; i < SYN_TOKENS; i++) {
                    const v8 zi = splat(zt[i * zstride + j]);
                    a[i][0] += zi * r0;
                    a[i][1] += zi * r1;
                }
            }
            for (int i = 0; i < SYN_TOKENS && t + i < n; i++) {
                *(v8 *)(x + (int64_t)(t + i) * xstride + c) = a[i][0];
                *(v8 *)(x + (int64_t)(t + i) * xstride + c + LANES) = a[i][1];
            }
        }
}
#else
// The same with 512-bit vectors where the CPU has them: tiles of 6 tokens x 32 outputs (x 16 for a last odd
// chunk). Zen 4 runs a 512-bit FMA at the rate of two 256-bit ones but issues half the instructions, so the
// loads and broadcasts stop competing with the FMAs: 1.35x the multiply-adds per second of the 256-bit tiles in
// a loop of FMAs alone, 1.3x faster calls over SmolLM2-shaped pre-RoPE keys (one thread, 8K tokens).
static void synthesize(const float *restrict z, int zstride, const float *restrict St, int dp, int m, int n,
                       float *restrict x, int xstride) {
    for (int t = 0; t < n; t += SYN_TOKENS)
        for (int c = 0; c < dp; c += 32) {
            const int two = c + 32 <= dp;
            __m512 a0[SYN_TOKENS], a1[SYN_TOKENS];
            for (int i = 0; i < SYN_TOKENS; i++) a0[i] = a1[i] = _mm512_setzero_ps();
            const float *zt = z + (int64_t)t * zstride;
            for (int j = 0; j < m; j++) {
                const __m512 r0 = _mm512_loadu_ps(St + (int64_t)j * dp + c);
                const __m512 r1 = two ? _mm512_loadu_ps(St + (int64_t)j * dp + c + 16) : _mm512_setzero_ps();
                for (int i = 0; i < SYN_TOKENS; i++) {
                    const __m512 zi = _mm512_set1_ps(zt[i * zstride + j]);
                    a0[i] = _mm512_fmadd_ps(zi, r0, a0[i]);
                    if (two) a1[i] = _mm512_fmadd_ps(zi, r1, a1[i]);
                }
            }
            for (int i = 0; i < SYN_TOKENS && t + i < n; i++) {
                _mm512_storeu_ps(x + (int64_t)(t + i) * xstride + c, a0[i]);
                if (two) _mm512_storeu_ps(x + (int64_t)(t + i) * xstride + c + 16, a1[i]);
            }
        }
}
#endif

// Additive mask given by element strides over (B, H, group, L, T), 0 where it broadcasts; row r of a head is
// query l = r % L of group member r / L. mask NULL: none.
typedef struct {
    const float *mask;
    int64_t mask_b, mask_h, mask_g, mask_l, mask_t;
    int32_t query_len;
} masking;

// Rows of decoded coordinates in a block: padded to 16 floats, with room for a last group's 8 lanes (not to MAX_DIM: a 2 KB stride would map every
// row to the same few L1 sets).
static inline int row_stride(int dim) { return (dim + 8 + 15) & ~15; }  // + 8: a group writes 8 lanes

typedef struct {  // one thread's buffers, 32-byte aligned
    float *q, *scores, *zk, *zv, *C, *S, *x;
    int32_t *partner;
    uint8_t *kpad, *vpad;  // a segment's last token's codes, then zeros: decode_block reads 8 bytes past a group
} scratch;

// One work item: batch b, tokens [t0, t1), every kv head and row. Writes per (h, r): max, sum and acc (rows of
// vstride floats).
static void attend_chunk(int64_t b, int64_t t0, int64_t t1, int64_t T, int H, int R, int qdim, const float *q,
                         const code_layout *K, const code_tensor *kc, const code_layout *V, const code_tensor *vc,
                         const pre_rope *P, const masking *M, float *part_max, float *part_sum, float *part_acc,
                         const scratch *w) {
    const int kstride = row_stride(K->dim > qdim ? K->dim : qdim), vstride = row_stride(V->dim);
    const int qchunks = (qdim + LANES - 1) / LANES, vchunks = (V->dim + LANES - 1) / LANES;
    const int mk = K->dim, kuniform = uniform_bits(K), vuniform = uniform_bits(V);
    for (int64_t hr = 0; hr < (int64_t)H * R; hr++) {
        part_max[hr] = -INFINITY;
        part_sum[hr] = 0;
        memset(part_acc + hr * vstride, 0, sizeof(float) * (size_t)vstride);
    }
    // The queries, rows padded with zeros to whole vectors.
    for (int64_t hr = 0; hr < (int64_t)H * R; hr++) {
        memcpy(w->q + hr * kstride, q + (b * H * R + hr) * qdim, sizeof(float) * (size_t)qdim);
        memset(w->q + hr * kstride + qdim, 0, sizeof(float) * (size_t)(kstride - qdim));
    }
    if (P)
        for (int i = 0; i < qdim; i++) w->partner[i] = partner(P, i);
    for (int64_t s = t0; s < t1; s += BLOCK) {
        const int n = (int)((t1 - s) < BLOCK ? (t1 - s) : BLOCK), vectors = (n + LANES - 1) / LANES;
        if (P) rope_table(P, P->first_position + s, n, qdim, kstride, w->C, w->S);
        for (int64_t h = 0; h < H; h++) {
            float kscale[BLOCK], vscale[BLOCK] __attribute__((aligned(32)));
            const uint8_t *ksrc[BLOCK], *vsrc[BLOCK];
            for (int t = 0; t < n; t++) {
                ksrc[t] = kc->codes + b * kc->codes_b + h * kc->codes_h + (s + t) * kc->codes_t;
                vsrc[t] = vc->codes + b * vc->codes_b + h * vc->codes_h + (s + t) * vc->codes_t;
                kscale[t] = token_scale(K, kc, b, h, s + t);
                vscale[t] = token_scale(V, vc, b, h, s + t);
            }
            if (s + n == T) {  // the segment's last token: nothing of ours need follow its codes
                memcpy(w->kpad, ksrc[n - 1], (size_t)K->bytes);
                memcpy(w->vpad, vsrc[n - 1], (size_t)V->bytes);
                ksrc[n - 1] = w->kpad;
                vsrc[n - 1] = w->vpad;
            }
            decode_block(K, kuniform, ksrc, n, w->zk, kstride);
            decode_block(V, vuniform, vsrc, n, w->zv, vstride);
            for (int t = n; t < vectors * LANES; t++) vscale[t] = 0;
            if (P) {  // x = scale * S z + mean, turned by RoPE: scored in the head's own domain
                const int dp = P->dim_padded;
                const float *mean = P->key_mean ? P->key_mean + b * P->mean_b + h * P->mean_h : NULL;
                for (int t = n; t < (n + SYN_TOKENS - 1) / SYN_TOKENS * SYN_TOKENS; t++)
                    memset(w->zk + t * kstride, 0, sizeof(float) * (size_t)mk);
                synthesize(w->zk, kstride, P->synthesis_t + h * (int64_t)mk * dp, dp, mk, n, w->x, kstride);
                for (int t = 0; t < n; t++) {
                    v8 *xt = (v8 *)(w->x + t * kstride);
                    for (int c = 0; c < dp / LANES; c++) xt[c] = xt[c] * kscale[t] + (mean ? ((const v8u *)mean)[c] : (v8){0});
                    rope_apply(P, qdim, xt, w->C + t * kstride, w->S + t * kstride, w->partner, w->zk + t * kstride);
                    kscale[t] = 1.0f;
                }
            }
            for (int t = 0; t < n; t++) {
                const v8 *zt = (const v8 *)(w->zk + t * kstride);
                for (int r = 0; r < R; r++)
                    w->scores[(int64_t)r * BLOCK + t] = kscale[t] * dot((const v8 *)(w->q + (h * R + r) * kstride), zt, qchunks);
            }
            for (int r = 0; r < R; r++) {
                float *sr = w->scores + (int64_t)r * BLOCK;
                if (M->mask) {
                    const float *mrow = M->mask + b * M->mask_b + h * M->mask_h + (r / M->query_len) * M->mask_g
                                        + (r % M->query_len) * M->mask_l;
                    for (int t = 0; t < n; t++) sr[t] += mrow[(s + t) * M->mask_t];
                }
                float block_max = -INFINITY;
                for (int t = 0; t < n; t++) block_max = sr[t] > block_max ? sr[t] : block_max;
                float *pm = part_max + h * R + r, *ps = part_sum + h * R + r;
                const float new_max = block_max > *pm ? block_max : *pm;
                if (new_max == -INFINITY) continue;  // every token so far masked
                const float correction = exp_nonpositive(splat(*pm - new_max))[0];
                v8 sum = {0};
                for (int k = 0; k < vectors; k++) {
                    v8 p = exp_nonpositive(((v8u *)sr)[k] - new_max);
                    for (int lane = 0; lane < LANES; lane++)
                        if (k * LANES + lane >= n) p[lane] = 0;  // past the block's last token
                    sum += p;
                    ((v8u *)sr)[k] = p * ((v8 *)vscale)[k];
                }
                *ps = *ps * correction + hsum(sum);
                accumulate((v8 *)(part_acc + (h * R + r) * vstride), vchunks, correction, sr, w->zv, vstride, n);
                *pm = new_max;
            }
        }
    }
}

static void *aligned_floats(size_t n) {
    size_t bytes = ((n * sizeof(float) + 31) / 32) * 32;
    void *p = aligned_alloc(32, bytes ? bytes : 32);
    if (p) memset(p, 0, bytes);
    return p;
}

// Both entry points. lengths: NULL (every row holds T tokens) or per row b its own lengths[b] <= T (a batch of
// sessions in one buffer); a chunk past a row's length does nothing and merges as nothing.
static int attend(const float *q, int B, int H, int R, int qdim, int64_t T, const int32_t *lengths,
                  const code_layout *K, const code_tensor *kc, const code_layout *V, const code_tensor *vc,
                  const pre_rope *P, const masking *M, int chunk_tokens, int threads, float *out, float *lse) {
    if (K->dim > MAX_DIM || V->dim > MAX_DIM || qdim > MAX_DIM || K->bytes > MAX_BYTES || V->bytes > MAX_BYTES)
        return -1;
    if (T > 1 && (kc->codes_t < K->bytes || vc->codes_t < V->bytes)) return -1;  // tokens' codes must not overlap
    if (P ? (P->dim_padded % (2 * LANES) || P->dim_padded < qdim || P->dim_padded > row_stride(qdim)) : qdim != K->dim)
        return -1;
    const int mv = V->dim, vstride = row_stride(mv), kstride = row_stride(K->dim > qdim ? K->dim : qdim);
    const int64_t chunks = T <= 0 ? 0 : (T + chunk_tokens - 1) / chunk_tokens, items = (int64_t)B * chunks;
    const int64_t per_item = (int64_t)H * R;
    float *pmax = aligned_floats((size_t)(items * per_item));
    float *psum = aligned_floats((size_t)(items * per_item));
    float *pacc = aligned_floats((size_t)(items * per_item * vstride));
    int failed = !pmax || !psum || !pacc;
    if (!failed) {
#pragma omp parallel num_threads(threads)
        {
            scratch w = {aligned_floats((size_t)(per_item * kstride)), aligned_floats((size_t)R * BLOCK),
                         aligned_floats((size_t)(BLOCK + SYN_TOKENS) * kstride), aligned_floats((size_t)BLOCK * vstride),
                         aligned_floats((size_t)(P ? BLOCK * kstride : 1)),
                         aligned_floats((size_t)(P ? BLOCK * kstride : 1)),
                         aligned_floats((size_t)(P ? BLOCK * kstride : 1)), aligned_alloc(32, 4 * MAX_DIM),
                         aligned_floats((MAX_BYTES + 8) / 4), aligned_floats((MAX_BYTES + 8) / 4)};
            if (!w.q || !w.scores || !w.zk || !w.zv || !w.C || !w.S || !w.x || !w.partner || !w.kpad || !w.vpad) {
#pragma omp atomic write
                failed = 1;
            } else {
#pragma omp for schedule(dynamic, 1)
                for (int64_t item = 0; item < items; item++) {
                    int64_t b = item / chunks, t0 = (item % chunks) * chunk_tokens;
                    const int64_t Tb = lengths ? lengths[b] : T;
                    int64_t t1 = t0 + chunk_tokens < Tb ? t0 + chunk_tokens : Tb;
                    if (t1 < t0) t1 = t0;
                    attend_chunk(b, t0, t1, Tb, H, R, qdim, q, K, kc, V, vc, P, M, pmax + item * per_item,
                                 psum + item * per_item, pacc + item * per_item * vstride, &w);
                }
            }
            free(w.q); free(w.scores); free(w.zk); free(w.zv); free(w.C); free(w.S); free(w.x); free(w.partner);
            free(w.kpad); free(w.vpad);
        }
    }
    if (!failed) {
        for (int64_t b = 0; b < B; b++)
            for (int64_t hr = 0; hr < per_item; hr++) {
                float m = -INFINITY, l = 0;
                for (int64_t c = 0; c < chunks; c++) {
                    float cm = pmax[(b * chunks + c) * per_item + hr];
                    if (cm > m) m = cm;
                }
                float *o = out + (b * per_item + hr) * mv;
                memset(o, 0, sizeof(float) * (size_t)mv);
                if (m != -INFINITY) {
                    for (int64_t c = 0; c < chunks; c++) {
                        int64_t at = (b * chunks + c) * per_item + hr;
                        if (pmax[at] == -INFINITY) continue;
                        float wt = expf(pmax[at] - m);
                        l += wt * psum[at];
                        const float *a = pacc + at * vstride;
                        for (int i = 0; i < mv; i++) o[i] += wt * a[i];
                    }
                    for (int i = 0; i < mv; i++) o[i] /= l;
                }
                // Rows that saw no token: output 0 and lse -inf, which the caller's merge weighs as nothing.
                lse[b * per_item + hr] = m == -INFINITY ? -INFINITY : m + logf(l);
            }
    }
    free(pmax); free(psum); free(pacc);
    return failed ? -1 : 0;
}

// Entry point. q: (B, H, R, qdim) fp32 contiguous, already scaled (and rotated unless P is given).
// out: (B, H, R, mv) normalised rotated-domain output; lse: (B, H, R). Returns 0, or -1 on bad sizes.
int kvshard_attend(const float *q, int B, int H, int R, int qdim, int64_t T, const code_layout *K,
                   const code_tensor *kc, const code_layout *V, const code_tensor *vc, const pre_rope *P,
                   const masking *M, int chunk_tokens, int threads, float *out, float *lse) {
    return attend(q, B, H, R, qdim, T, NULL, K, kc, V, vc, P, M, chunk_tokens, threads, out, lse);
}

// The same with rows of their own lengths (0 <= lengths[b] <= T): row b attends its first lengths[b] tokens;
// a row of none gets output 0 and lse -inf.
int kvshard_attend_rows(const float *q, int B, int H, int R, int qdim, int64_t T, const int32_t *lengths,
                        const code_layout *K, const code_tensor *kc, const code_layout *V, const code_tensor *vc,
                        const pre_rope *P, const masking *M, int chunk_tokens, int threads, float *out, float *lse) {
    for (int b = 0; b < B; b++)
        if (lengths[b] < 0 || lengths[b] > T) return -1;
    return attend(q, B, H, R, qdim, T, lengths, K, kc, V, vc, P, M, chunk_tokens, threads, out, lse);
}
