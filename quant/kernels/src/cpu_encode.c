// The encode of runs of Lloyd-Max coordinates after their transform, one token (row of z) at a time, in one
// call where quant/methods/ do it in MLX ops (klt's append was a few hundred small ops per layer and step).
//
// TurboQuant-MSE (refit 0): z is the rotated unit vector; each coordinate gets the count of the boundaries
// below it and the codes are packed; its norm is the caller's. klt (refit 1): per row z (m coded coordinates,
// runs of equal bit width with their own codebooks): the scale
// starts at |z|; twice, each coordinate of z / scale gets the index of its nearest centroid (the count of the
// run's boundaries below it) and the scale is refitted as the least-squares gain of those centroids under
// the coordinates' energy weights, g = sum(l z c) / sum(l c c). The indices are packed LSB first into one
// bit stream of all runs (quant/packing.py's pack_runs) and the scale stored as fp16 or as a log-scale byte.

#include <math.h>
#include <stdint.h>
#include <string.h>

#define MAX_CODED 512

typedef struct {
    int32_t m, bytes, n_runs;
    const int32_t *run_count, *run_bits, *run_table;  // per run; run_table: where its boundaries/centroids start
    const float *boundaries;  // per run 2^b - 1 ascending boundaries, then 1 unused entry
    const float *centroids;   // per run 2^b centroids
    const float *energy;      // (heads, m) weights; heads 1 broadcasts
    int32_t energy_heads;
    int32_t refit;             // 1: klt's scale refits and scale output; 0: codes only
    const float *scale_table;  // 256 scales of the log-scale byte (ascending); NULL: fp16 scales
} run_encoder;

// Index of the nearest centroid: how many of the run's 2^b - 1 ascending boundaries lie below u, by halving.
static inline int nearest(const float *boundaries, int bits, float u) {
    int at = 0;
    for (int step = 1 << (bits - 1); step; step >>= 1)
        if (u > boundaries[at + step - 1]) at += step;
    return at;
}

static inline uint8_t log_scale_byte(const float *table, float gain) {
    // The byte s whose scale 2^((s - 128) / 16 + center) is nearest in the log domain: round((log2 g - center)
    // * 16 + 128), clipped, computed as the count of geometric midpoints below g (the same answer, without
    // depending on libm's log2 rounding).
    int lo = 0;
    for (int step = 128; step; step >>= 1)
        if (lo + step <= 255 && gain >= sqrtf(table[lo + step - 1] * table[lo + step])) lo += step;
    return (uint8_t)lo;
}

static void pack(const run_encoder *E, const uint8_t *index, uint8_t *out) {
    memset(out, 0, (size_t)E->bytes);
    int64_t bit = 0;
    int j = 0;
    for (int run = 0; run < E->n_runs; run++)
        for (int k = 0; k < E->run_count[run]; k++, j++)
            for (int b = 0; b < E->run_bits[run]; b++, bit++)
                out[bit >> 3] |= (uint8_t)(((index[j] >> b) & 1) << (bit & 7));
}

int kvshard_encode(const float *z, int64_t rows, int64_t tokens, int heads, const run_encoder *E, uint8_t *codes,
                       void *norm) {
    const int m = E->m;
    if (m > MAX_CODED || m < 1) return -1;
    float unit[MAX_CODED], chosen[MAX_CODED];
    uint8_t index[MAX_CODED];
    for (int64_t r = 0; r < rows; r++) {
        const float *zr = z + r * m;
        if (!E->refit) {
            for (int run = 0, j = 0; run < E->n_runs; run++)
                for (int k = 0; k < E->run_count[run]; k++, j++)
                    index[j] = (uint8_t)nearest(E->boundaries + E->run_table[run], E->run_bits[run], zr[j]);
            pack(E, index, codes + r * E->bytes);
            continue;
        }
        const int64_t head = (r / tokens) % heads;
        const float *energy = E->energy + (E->energy_heads == 1 ? 0 : head * m);
        float sq = 0;
        for (int j = 0; j < m; j++) sq += zr[j] * zr[j];
        float scale = sqrtf(sq);
        for (int round = 0; round < 2; round++) {
            const float divisor = scale > 1e-30f ? scale : 1e-30f;
            for (int j = 0; j < m; j++) unit[j] = zr[j] / divisor;
            float num = 0, den = 0;
            int j = 0;
            for (int run = 0; run < E->n_runs; run++) {
                const int bits = E->run_bits[run], at = E->run_table[run];
                for (int k = 0; k < E->run_count[run]; k++, j++) {
                    const int i = nearest(E->boundaries + at, bits, unit[j]);
                    index[j] = (uint8_t)i;
                    chosen[j] = E->centroids[at + i];
                    num += energy[j] * zr[j] * chosen[j];
                    den += energy[j] * chosen[j] * chosen[j];
                }
            }
            scale = num / (den > 1e-30f ? den : 1e-30f);
        }
        pack(E, index, codes + r * E->bytes);
        if (E->scale_table) {
            ((uint8_t *)norm)[r] = log_scale_byte(E->scale_table, scale > 1e-30f ? scale : 1e-30f);
        } else {
            const _Float16 h = (_Float16)scale;
            memcpy((uint16_t *)norm + r, &h, 2);
        }
    }
    return 0;
}
