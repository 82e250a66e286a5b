/* Fused CPU kernels for the task-arithmetic family (dmerge/methods/_gta.py) and its
 * magnitude statistics (RankSelect in dmerge/methods/_sparsify.py).
 *
 * Why: the torch formulation of one TIES element costs ~60 small tensor operations per
 * row block, each streaming float64 temporaries through the cache; here an element is
 * read once, computed in registers and written once.
 *
 * Contract: every function reproduces the torch code path *bit for bit* (same IEEE
 * operations in the same order, float64 unless said otherwise), so the output does not
 * depend on whether this library was available. Compiled with -ffp-contract=off: a fused
 * multiply-add would round differently. NaN results are NaN here too, but their payload
 * bits may differ (torch itself gives different NaN bits on its vector and scalar paths).
 *
 * Built on first use by dmerge/native/__init__.py; loaded through ctypes, which releases
 * the GIL for the duration of a call, so Dask's worker threads run these in parallel.
 */
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "apply_random reads the halves of 64-bit words in little-endian order"
#endif
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { DT_F32 = 0, DT_BF16 = 1, DT_F16 = 2, DT_F64 = 3 };
enum { MASK_ALL = 0, MASK_NONE = 1, MASK_WINDOW = 2, MASK_RANDOM = 3, MASK_BITS = 4 };

#define BLOCK 1024          /* elements per step: a few float64 rows of this stay in L1 */
#define MAX_MODELS 64
#define COARSE_SHIFT 15
#define COARSE_BINS (1 << 16)
#define FINE_BINS (1 << COARSE_SHIFT)
#define HIST_COPIES 4

static inline uint32_t f32_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float f32_from(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

/* Exact conversion of an IEEE half (binary16) to float32. */
static inline float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1F, man = h & 0x3FF;
    if (exp == 0x1F) return f32_from(sign | 0x7F800000u | (man << 13));      /* inf / NaN */
    if (exp != 0) return f32_from(sign | ((exp + 112) << 23) | (man << 13)); /* normal */
    if (man == 0) return f32_from(sign);                                      /* +-0 */
    /* subnormal: man * 2^-24 is exact in float32 */
    float v = (float)man * 5.9604644775390625e-08f;
    return sign ? -v : v;
}

/* float32 -> binary16 with one round-to-nearest-even (the IEEE conversion). */
static inline uint16_t f32_to_f16(float f) {
    uint32_t u = f32_bits(f);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000);
    uint32_t a = u & 0x7FFFFFFFu;
    if (a >= 0x7F800000u) /* inf stays inf, NaN stays a quiet NaN */
        return sign | (a > 0x7F800000u ? 0x7E00 | ((a >> 13) & 0x3FF) : 0x7C00);
    int32_t exp = (int32_t)(a >> 23) - 127;
    if (exp > 15) return sign | 0x7C00; /* overflow */
    uint32_t man = (a & 0x7FFFFF) | 0x800000; /* with the implicit bit, 24 bits */
    int shift; /* bits of man dropped */
    uint32_t base_exp;
    if (exp >= -14) { shift = 13; base_exp = (uint32_t)(exp + 15); }
    else {
        shift = 13 + (-14 - exp); /* subnormal result */
        base_exp = 0;
        if (shift > 25) return sign; /* below half the smallest subnormal: rounds to 0 */
    }
    if (a == 0) return sign;
    uint32_t kept = man >> shift;
    uint32_t rest = man & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rest > half || (rest == half && (kept & 1))) kept++;
    /* normal: kept has the implicit bit at 2^10; a carry into 2^11 bumps the exponent,
       which adding the fields does by itself. subnormal: kept may reach 2^10, the
       smallest normal, which is again what adding gives. */
    uint32_t r = base_exp ? ((base_exp - 1) << 10) + kept : kept;
    if (r >= 0x7C00) return sign | 0x7C00;
    return sign | (uint16_t)r;
}

/* float32 -> bfloat16, round to nearest even (NaN -> quiet NaN). */
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u = f32_bits(f);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)((u >> 16) | 0x40);
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1)) >> 16);
}

/* float64 -> float32 whose later narrowing by `dropped` bits rounds like the float64
 * value would (dmerge.numerics.round_to): a float32 exactly on a midpoint of the narrow
 * type is moved one ulp towards the true value. */
static inline float f64_to_f32_for(double v, int dropped) {
    float f = (float)v;
    uint32_t u = f32_bits(f);
    uint32_t low = u & ((1u << dropped) - 1);
    if (low == (1u << (dropped - 1))) {
        double t = fabs(v), r = fabs((double)f);
        u += (uint32_t)((t > r) - (t < r));
        f = f32_from(u);
    }
    return f;
}

static void widen_f64(const void *src, int dt, int64_t at, int n, double *dst) {
    switch (dt) {
    case DT_F32: { const float *s = (const float *)src + at; for (int j = 0; j < n; j++) dst[j] = s[j]; break; }
    case DT_BF16: { const uint16_t *s = (const uint16_t *)src + at;
        for (int j = 0; j < n; j++) dst[j] = f32_from((uint32_t)s[j] << 16); break; }
    case DT_F16: { const uint16_t *s = (const uint16_t *)src + at; for (int j = 0; j < n; j++) dst[j] = f16_to_f32(s[j]); break; }
    default: { const double *s = (const double *)src + at; memcpy(dst, s, (size_t)n * sizeof(double)); break; }
    }
}

static void widen_f32(const void *src, int dt, int64_t at, int n, float *dst) {
    switch (dt) {
    case DT_F32: memcpy(dst, (const float *)src + at, (size_t)n * sizeof(float)); break;
    case DT_BF16: { const uint16_t *s = (const uint16_t *)src + at;
        for (int j = 0; j < n; j++) dst[j] = f32_from((uint32_t)s[j] << 16); break; }
    default: { const uint16_t *s = (const uint16_t *)src + at; for (int j = 0; j < n; j++) dst[j] = f16_to_f32(s[j]); break; }
    }
}

static void store(const double *v, int n, void *dst, int dt, int64_t at) {
    switch (dt) {
    case DT_F32: { float *d = (float *)dst + at; for (int j = 0; j < n; j++) d[j] = (float)v[j]; break; }
    case DT_BF16: { uint16_t *d = (uint16_t *)dst + at;
        for (int j = 0; j < n; j++) d[j] = f32_to_bf16(f64_to_f32_for(v[j], 16)); break; }
    case DT_F16: { uint16_t *d = (uint16_t *)dst + at;
        for (int j = 0; j < n; j++) d[j] = f32_to_f16(f64_to_f32_for(v[j], 13)); break; }
    default: memcpy((double *)dst + at, v, (size_t)n * sizeof(double)); break;
    }
}

/* How many of n stored output elements (from index at) are NaN or infinite: all
 * exponent bits set (dmerge.numerics.count_nonfinite), counted while they are in cache. */
static int64_t count_special(const void *dst, int dt, int64_t at, int n) {
    int64_t bad = 0;
    switch (dt) {
    case DT_F32: { const uint32_t *d = (const uint32_t *)dst + at;
        for (int j = 0; j < n; j++) bad += (d[j] & 0x7F800000u) == 0x7F800000u; break; }
    case DT_BF16: { const uint16_t *d = (const uint16_t *)dst + at;
        for (int j = 0; j < n; j++) bad += (d[j] & 0x7F80u) == 0x7F80u; break; }
    case DT_F16: { const uint16_t *d = (const uint16_t *)dst + at;
        for (int j = 0; j < n; j++) bad += (d[j] & 0x7C00u) == 0x7C00u; break; }
    default: { const uint64_t *d = (const uint64_t *)dst + at;
        for (int j = 0; j < n; j++) bad += (d[j] & 0x7FF0000000000000ull) == 0x7FF0000000000000ull; break; }
    }
    return bad;
}

/* splitmix64 of counter c under key (dmerge.methods._sparsify._splitmix64). */
static inline uint64_t splitmix64(uint64_t key, uint64_t c) {
    uint64_t z = key + (c + 1) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* One model's keep-mask, as the Python side describes it (see gta_merge there). */
typedef struct {
    const void *data;
    int32_t dtype;
    int32_t mask;        /* MASK_* */
    double weight;
    double factor;       /* rescale factor, applied after a WINDOW/RANDOM mask when != 1 */
    /* MASK_WINDOW: keep keys in (bottom, top) (top < 0: no upper cut); keys equal to
       tie_key[t] take consecutive ranks from tie_next[t] and are kept inside [lo, hi) */
    int32_t bottom, top;
    int32_t n_ties;
    int32_t tie_key[2];
    int64_t tie_next[2];
    int64_t lo, hi;
    /* MASK_RANDOM: keep where keyed bits < threshold */
    uint64_t key;
    int64_t threshold;
    /* MASK_BITS: keep where bit j (little-endian within bytes) of these is set, j the
       element's index in this call: the MASK_RANDOM bits dm_masked_l1_rows recorded */
    const uint8_t *keep_bits;
} dm_model;

static void apply_window(dm_model *m, const double *d, int32_t *keys, double *keep, int n) {
    int32_t bottom = m->bottom, top = m->top;
    for (int j = 0; j < n; j++) keys[j] = (int32_t)f32_bits(fabsf((float)d[j]));
    for (int j = 0; j < n; j++) {
        int32_t k = keys[j];
        keep[j] = (double)((k > bottom) & ((top < 0) | (k < top)));
    }
    for (int t = 0; t < m->n_ties; t++) {
        if (m->tie_next[t] >= m->hi) continue; /* every later tie ranks past the window */
        int32_t tk = m->tie_key[t];
        int64_t r = m->tie_next[t], lo = m->lo, hi = m->hi;
        /* A tie's keep is 0 so far (tk is bottom or top, both excluded above). Ties are
           common (bf16 task vectors): no branches on them, and ranks only in the one
           block where the window's edge falls. */
        int64_t count = 0;
        for (int j = 0; j < n; j++) count += keys[j] == tk;
        if (r >= lo && r + count <= hi) {
            for (int j = 0; j < n; j++) keep[j] = keep[j] + (double)(keys[j] == tk);
        } else if (r + count > lo) {
            for (int j = 0; j < n; j++) {
                int64_t eq = keys[j] == tk;
                keep[j] = keep[j] + (double)(eq & (r >= lo) & (r < hi));
                r += eq;
            }
        }
        m->tie_next[t] = m->tie_next[t] + count;
    }
}

/* keep[j] = keyed bits of element first + j < threshold. One splitmix64 output serves two
 * elements (low half: even index, high half: odd), so each is computed once: a loop
 * over counters into z[], then one over elements (both vectorize). */
static void apply_random(const dm_model *m, int64_t first, double *keep, int n) {
    if (n <= 0) return;
    int64_t thr = m->threshold;
    uint64_t key = m->key;
    uint64_t c0 = (uint64_t)first >> 1;
    int skip = (int)(first & 1); /* element 0 takes the high half of counter c0 */
    int pairs = (n + skip + 1) / 2;
    uint64_t z[BLOCK / 2 + 1];
    for (int p = 0; p < pairs; p++) z[p] = splitmix64(key, c0 + (uint64_t)p);
    const uint32_t *halves = (const uint32_t *)z; /* little-endian: [2p] low, [2p + 1] high */
    for (int j = 0; j < n; j++) keep[j] = (double)((int64_t)halves[j + skip] < thr);
}

/* byte -> its 8 bits as 0.0 / 1.0, lowest bit first: a byte of a keep-mask expands to
 * eight keep values with one 64-byte copy (16 KiB, stays in L1) */
static double bit_table[256][8];

__attribute__((constructor)) static void fill_bit_table(void) { /* when the library is loaded */
    for (int v = 0; v < 256; v++)
        for (int k = 0; k < 8; k++) bit_table[v][k] = (double)((v >> k) & 1);
}

static void apply_bits(const dm_model *m, int64_t first, double *keep, int n) {
    const uint8_t *bits = m->keep_bits;
    int j = 0;
    if ((first & 7) == 0) { /* whole bytes (blocks start at multiples of BLOCK): 8 elements each */
        const uint8_t *by = bits + (first >> 3);
        for (; j + 8 <= n; j += 8) memcpy(keep + j, bit_table[by[j >> 3]], 8 * sizeof(double));
    }
    for (; j < n; j++) {
        uint64_t e = (uint64_t)(first + j);
        keep[j] = (double)((bits[e >> 3] >> (e & 7)) & 1);
    }
}

/* The family's formula on n elements (see dmerge/methods/_gta.py), in float64, rounded
 * once to out_dtype. element_offset: flat index of element 0 in the whole tensor.
 * Returns the number of NaN/Inf outputs, or -1 when the arguments are out of range. */
int64_t dm_gta_merge(const void *base, int32_t base_dtype, int64_t n, int64_t element_offset,
                 dm_model *models, int32_t n_models, int32_t consensus, int32_t normalize,
                 double total_weight, double lam, void *out, int32_t out_dtype) {
    if (n_models < 1 || n_models > MAX_MODELS) return -1;
    double *buf = (double *)malloc(sizeof(double) * BLOCK * (size_t)(n_models + 4));
    if (!buf) return -1;
    double *b = buf, *keep = buf + BLOCK, *mixed = buf + 2 * BLOCK, *div = buf + 3 * BLOCK;
    double *ds = buf + 4 * BLOCK;
    int32_t keys[BLOCK];
    int divide_total = !consensus && normalize && fabs(total_weight) >= 1e-8;
    int64_t bad = 0;
    for (int64_t at = 0; at < n; at += BLOCK) {
        int m = (int)(n - at < BLOCK ? n - at : BLOCK);
        widen_f64(base, base_dtype, at, m, b);
        for (int i = 0; i < n_models; i++) {
            dm_model *md = &models[i];
            double *d = ds + (size_t)i * BLOCK;
            widen_f64(md->data, md->dtype, at, m, d);
            for (int j = 0; j < m; j++) d[j] = d[j] - b[j];
            if (md->mask == MASK_NONE) {
                for (int j = 0; j < m; j++) d[j] = 0.0;
            } else if (md->mask == MASK_WINDOW || md->mask == MASK_RANDOM || md->mask == MASK_BITS) {
                if (md->mask == MASK_WINDOW) apply_window(md, d, keys, keep, m);
                else if (md->mask == MASK_RANDOM) apply_random(md, element_offset + at, keep, m);
                else apply_bits(md, at, keep, m);
                for (int j = 0; j < m; j++) d[j] = d[j] * keep[j];
                if (md->factor != 1.0) {
                    double f = md->factor;
                    for (int j = 0; j < m; j++) d[j] = d[j] * f;
                }
            }
            double w = md->weight;
            for (int j = 0; j < m; j++) d[j] = d[j] * w;
        }
        /* sum in model order */
        if (n_models == 1) memcpy(mixed, ds, sizeof(double) * (size_t)m);
        else {
            const double *d0 = ds, *d1 = ds + BLOCK;
            for (int j = 0; j < m; j++) mixed[j] = d0[j] + d1[j];
            for (int i = 2; i < n_models; i++) {
                const double *d = ds + (size_t)i * BLOCK;
                for (int j = 0; j < m; j++) mixed[j] = mixed[j] + d[j];
            }
        }
        if (consensus) {
            /* sg = copysign(1, sum); agreeing part relu(sg * d_i); divisor sums w_i where
               that part is > 0 (sign() of a relu is 0 or 1) */
            for (int i = 0; i < n_models; i++) {
                double *d = ds + (size_t)i * BLOCK;
                double w = models[i].weight;
                for (int j = 0; j < m; j++) {
                    double r = d[j] * copysign(1.0, mixed[j]);
                    d[j] = r < 0 ? 0.0 : r;
                }
                if (normalize) { /* (double)(comparison), not ?: -- branch-free, vectorized */
                    if (i == 0) for (int j = 0; j < m; j++) div[j] = (double)(d[j] > 0) * w;
                    else for (int j = 0; j < m; j++) div[j] = div[j] + w * (double)(d[j] > 0);
                }
            }
            double *agreeing = keep; /* sum of the agreeing parts, in model order */
            memcpy(agreeing, ds, sizeof(double) * (size_t)m);
            for (int i = 1; i < n_models; i++) {
                const double *d = ds + (size_t)i * BLOCK;
                for (int j = 0; j < m; j++) agreeing[j] = agreeing[j] + d[j];
            }
            for (int j = 0; j < m; j++) mixed[j] = agreeing[j] * copysign(1.0, mixed[j]);
            if (normalize)
                for (int j = 0; j < m; j++) mixed[j] = mixed[j] / (div[j] + (double)(div[j] == 0));
        } else if (divide_total) {
            for (int j = 0; j < m; j++) mixed[j] = mixed[j] / total_weight;
        }
        if (lam != 1.0)
            for (int j = 0; j < m; j++) mixed[j] = mixed[j] * lam;
        for (int j = 0; j < m; j++) mixed[j] = mixed[j] + b[j];
        store(mixed, m, out, out_dtype, at);
        bad += count_special(out, out_dtype, at, m);
    }
    free(buf);
    return bad;
}

/* Sum of a row's n values in dmerge.methods._reduce.lastdim_sum's order: a pairwise tree
 * (element i plus element i + n/2, an odd last element added to element 0), in place. */
static double pairwise_row_sum(double *v, int64_t n) {
    if (n == 0) return 0.0;
    while (n > 1) {
        int64_t h = n / 2;
        for (int64_t i = 0; i < h; i++) v[i] = v[i] + v[i + h];
        if (n % 2) v[0] = v[0] + v[2 * h];
        n = h;
    }
    return v[0];
}

/* DARE's rescale statistic (rescale_statistic in dmerge/methods/_sparsify.py) on a chunk
 * of `rows` rows of `cols` elements: for each model i, per row, the sums of |x_i - base|
 * and of |x_i - base| * keep_i (float64, lastdim_sum's order) into
 * out[row * 2 * n_models + 2 * i] and [... + 1]. Masks: MASK_ALL (both sums the same),
 * MASK_NONE (kept sum 0), MASK_RANDOM (element_offset: flat index of the chunk's first
 * element in the whole tensor). Where bits[i] is not NULL the drawn keep-mask is stored
 * there (ceil(rows * cols / 8) bytes, see MASK_BITS), so the write pass of the same chunk
 * uses these bits instead of drawing them again. Returns 0, or -1 on bad arguments. */
int dm_masked_l1_rows(const void *base, int32_t base_dtype, int64_t rows, int64_t cols, int64_t element_offset,
                      const dm_model *models, int32_t n_models, double *out, uint8_t **bits) {
    if (n_models < 1 || n_models > MAX_MODELS || cols < 0 || rows < 0) return -1;
    for (int i = 0; i < n_models; i++) {
        int mk = models[i].mask;
        if (mk != MASK_ALL && mk != MASK_NONE && mk != MASK_RANDOM) return -1;
        if (bits && bits[i]) memset(bits[i], 0, (size_t)((rows * cols + 7) / 8));
    }
    size_t width = cols > 0 ? (size_t)cols : 1;
    /* per row: the base's row once, then each model's |tau| and kept |tau| */
    double *buf = (double *)malloc(sizeof(double) * (3 * width + 2 * BLOCK));
    if (!buf) return -1;
    double *b = buf, *a = buf + width, *kept = buf + 2 * width, *x = buf + 3 * width, *keep = x + BLOCK;
    for (int64_t r = 0; r < rows; r++) {
        int64_t row0 = r * cols;
        for (int64_t c0 = 0; c0 < cols; c0 += BLOCK) {
            int m = (int)(cols - c0 < BLOCK ? cols - c0 : BLOCK);
            widen_f64(base, base_dtype, row0 + c0, m, b + c0);
        }
        for (int i = 0; i < n_models; i++) {
            const dm_model *md = &models[i];
            uint8_t *mbits = bits ? bits[i] : NULL;
            for (int64_t c0 = 0; c0 < cols; c0 += BLOCK) {
                int m = (int)(cols - c0 < BLOCK ? cols - c0 : BLOCK);
                widen_f64(md->data, md->dtype, row0 + c0, m, x);
                double *ar = a + c0, *kr = kept + c0;
                const double *br = b + c0;
                for (int j = 0; j < m; j++) ar[j] = fabs(x[j] - br[j]);
                if (md->mask != MASK_RANDOM) continue;
                apply_random(md, element_offset + row0 + c0, keep, m);
                for (int j = 0; j < m; j++) kr[j] = ar[j] * keep[j];
                if (!mbits) continue;
                int64_t e0 = row0 + c0; /* chunk-relative index of keep[0] */
                int j = 0;
                for (; j < m && ((e0 + j) & 7); j++) mbits[(e0 + j) >> 3] |= (uint8_t)((keep[j] != 0.0) << ((e0 + j) & 7));
                for (; j + 8 <= m; j += 8) { /* whole bytes */
                    uint32_t byte = 0;
                    for (int k = 0; k < 8; k++) byte |= (uint32_t)(keep[j + k] != 0.0) << k;
                    mbits[(e0 + j) >> 3] = (uint8_t)byte;
                }
                for (; j < m; j++) mbits[(e0 + j) >> 3] |= (uint8_t)((keep[j] != 0.0) << ((e0 + j) & 7));
            }
            double before = pairwise_row_sum(a, cols), after;
            if (md->mask == MASK_ALL) after = before;
            else if (md->mask == MASK_NONE) after = 0.0;
            else after = pairwise_row_sum(kept, cols);
            out[r * 2 * n_models + 2 * i] = before;
            out[r * 2 * n_models + 2 * i + 1] = after;
        }
    }
    free(buf);
    return 0;
}

/* Per-row inner products of m vectors (gram_rows in dmerge/methods/_reduce.py): for
 * every pair i <= j in row-major upper-triangle order, per row of `cols` elements,
 * dot_rows' order: y[t] = v_i[t] v_j[t] + v_i[t + h] v_j[t + h] (h = cols / 2; an odd
 * last product added to y[0]), then lastdim_sum's pairwise tree over y. Into
 * out[row * m (m + 1) / 2 + pair]. Returns 0, or -1 on bad arguments. */
int dm_gram_rows(const void **xs, const int32_t *x_dtypes, int32_t m, int64_t rows, int64_t cols, double *out) {
    if (m < 1 || m > MAX_MODELS || rows < 0 || cols < 0) return -1;
    size_t width = cols > 0 ? (size_t)cols : 1;
    double *buf = (double *)malloc(sizeof(double) * width * (size_t)(m + 1));
    if (!buf) return -1;
    double *y = buf + width * (size_t)m;
    int64_t pairs = (int64_t)m * (m + 1) / 2, h = cols / 2;
    for (int64_t r = 0; r < rows; r++) {
        for (int k = 0; k < m; k++)
            for (int64_t c0 = 0; c0 < cols; c0 += BLOCK) {
                int n = (int)(cols - c0 < BLOCK ? cols - c0 : BLOCK);
                widen_f64(xs[k], x_dtypes[k], r * cols + c0, n, buf + width * (size_t)k + c0);
            }
        int64_t p = 0;
        for (int i = 0; i < m; i++)
            for (int j = i; j < m; j++, p++) {
                const double *a = buf + width * (size_t)i, *b = buf + width * (size_t)j;
                double total;
                if (cols < 2) total = cols ? a[0] * b[0] : 0.0;
                else {
                    for (int64_t t = 0; t < h; t++) y[t] = a[t] * b[t] + a[t + h] * b[t + h];
                    if (cols % 2) y[0] = y[0] + a[2 * h] * b[2 * h];
                    total = pairwise_row_sum(y, h);
                }
                out[r * pairs + p] = total;
            }
    }
    free(buf);
    return 0;
}

/* Weighted sum (linear, passthrough's scale; dmerge/methods/_weighted.py) of n elements:
 * acc = x_0 * w_0, then acc = acc + x_i * w_i in model order (a product, rounded, then a
 * sum, rounded: never fused), then acc / divisor when divide; rounded once to out_dtype.
 * Returns the number of NaN/Inf outputs, or -1 on bad arguments. */
int64_t dm_weighted_sum(const void **xs, const int32_t *x_dtypes, const double *weights, int32_t n_models, int64_t n,
                    int32_t divide, double divisor, void *out, int32_t out_dtype) {
    if (n_models < 1 || n_models > MAX_MODELS) return -1;
    double acc[BLOCK], x[BLOCK];
    int64_t bad = 0;
    for (int64_t at = 0; at < n; at += BLOCK) {
        int m = (int)(n - at < BLOCK ? n - at : BLOCK);
        widen_f64(xs[0], x_dtypes[0], at, m, acc);
        double w0 = weights[0];
        for (int j = 0; j < m; j++) acc[j] = acc[j] * w0;
        for (int i = 1; i < n_models; i++) {
            double w = weights[i];
            widen_f64(xs[i], x_dtypes[i], at, m, x);
            for (int j = 0; j < m; j++) acc[j] = acc[j] + x[j] * w;
        }
        if (divide)
            for (int j = 0; j < m; j++) acc[j] = acc[j] / divisor;
        store(acc, m, out, out_dtype, at);
        bad += count_special(out, out_dtype, at, m);
    }
    return bad;
}

/* Radix-select coarse pass (RankSelect._coarse_chunk with magnitude keys of task
 * vectors): for each model i, the float32 key bits(|x_i - base|) (subtracted in
 * float32) of each of n elements is counted in hists[i] at its coarse bucket
 * key >> 15, or, for a key inside the p-th predicted bucket of that model
 * (predicted[i * max_predicted + p], n_predicted[i] of them), at
 * COARSE_BINS + p * FINE_BINS + (key & (FINE_BINS - 1)). */
int dm_magnitude_histograms(const void *base, int32_t base_dtype, const void **xs, const int32_t *x_dtypes,
                            int32_t n_models, int64_t n, int64_t **hists, const int32_t *predicted,
                            const int32_t *n_predicted, int32_t max_predicted) {
    if (n_models < 1 || n_models > MAX_MODELS || max_predicted < 0) return -1;
    /* Task vectors of bf16 parents take few distinct magnitudes: consecutive increments
       of one counter would wait on each other, so elements alternate between HIST_COPIES
       private coarse histograms; the fine bins (few keys each) have one. int32 counts,
       added into the caller's int64 ones well before they could overflow. */
    size_t fine_bins = (size_t)FINE_BINS * (size_t)max_predicted;
    size_t coarse_all = (size_t)COARSE_BINS * HIST_COPIES;
    uint32_t *local = (uint32_t *)calloc(coarse_all + fine_bins, sizeof(uint32_t));
    float *buf = (float *)malloc(sizeof(float) * BLOCK * 2);
    int32_t *idx = (int32_t *)malloc(sizeof(int32_t) * BLOCK * 2);
    int32_t *position = NULL;
    int rc = -1;
    if (!local || !buf || !idx) goto done;
    float *b = buf, *x = buf + BLOCK;
    int32_t *keys = idx + BLOCK;
    for (int i = 0; i < n_models; i++) {
        int np = n_predicted[i];
        const int32_t *pb = predicted + (size_t)i * max_predicted;
        int32_t first = 0;
        uint32_t span = 0;
        if (np > 2) { /* bucket -> its position among the predicted ones, or -1 */
            first = pb[0];
            span = (uint32_t)(pb[np - 1] - first + 1);
            free(position);
            position = (int32_t *)malloc(sizeof(int32_t) * span);
            if (!position) goto done;
            for (uint32_t q = 0; q < span; q++) position[q] = -1;
            for (int p = 0; p < np; p++) position[pb[p] - first] = p;
        }
        int64_t since_flush = 0;
        for (int64_t at = 0; at < n; at += BLOCK) {
            int m = (int)(n - at < BLOCK ? n - at : BLOCK);
            widen_f32(base, base_dtype, at, m, b);
            widen_f32(xs[i], x_dtypes[i], at, m, x);
            for (int j = 0; j < m; j++) {
                int32_t k = (int32_t)f32_bits(fabsf(x[j] - b[j]));
                keys[j] = k;
                idx[j] = k >> COARSE_SHIFT;
            }
            if (np <= 2) {
                for (int p = 0; p < np; p++) { /* a select, not a branch: the bucket may hold many keys */
                    int32_t bucket = pb[p], fine = COARSE_BINS + p * FINE_BINS;
                    for (int j = 0; j < m; j++)
                        idx[j] = idx[j] == bucket ? fine + (keys[j] & (FINE_BINS - 1)) : idx[j];
                }
            } else { /* a range of buckets (continuous keys, few of them inside): one lookup */
                for (int j = 0; j < m; j++) {
                    uint32_t off = (uint32_t)(idx[j] - first);
                    if (off < span && position[off] >= 0)
                        idx[j] = COARSE_BINS + position[off] * FINE_BINS + (keys[j] & (FINE_BINS - 1));
                }
            }
            /* histogram index -> local slot: coarse bins in copy c, fine bins after the copies */
            int j = 0;
            for (; j + HIST_COPIES <= m; j += HIST_COPIES)
                for (int c = 0; c < HIST_COPIES; c++) {
                    int32_t q = idx[j + c];
                    local[q + (q < COARSE_BINS ? c * COARSE_BINS : (HIST_COPIES - 1) * COARSE_BINS)]++;
                }
            for (; j < m; j++) {
                int32_t q = idx[j];
                local[q + (q < COARSE_BINS ? 0 : (HIST_COPIES - 1) * COARSE_BINS)]++;
            }
            since_flush += m;
            if (since_flush > (1 << 30) || at + m >= n) { /* into the caller's int64 counts */
                int64_t *h = hists[i];
                for (int c = 0; c < HIST_COPIES; c++) {
                    uint32_t *l = local + (size_t)c * COARSE_BINS;
                    for (size_t q = 0; q < COARSE_BINS; q++) { h[q] += l[q]; l[q] = 0; }
                }
                uint32_t *l = local + coarse_all;
                size_t used = (size_t)FINE_BINS * (size_t)np;
                for (size_t q = 0; q < used; q++)
                    if (l[q]) { h[COARSE_BINS + q] += l[q]; l[q] = 0; } /* untouched pages stay unwritten */
                since_flush = 0;
            }
        }
    }
    rc = 0;
done:
    free(local); free(buf); free(idx); free(position);
    return rc;
}

int dm_abi_version(void) { return 5; }
