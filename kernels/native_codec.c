/* Block-wise low-bit codec for CPU tensors: one fused pass per block.
 *
 * The layout and the float32 arithmetic are those of the PyTorch reference in
 * blockwise.py (read its module docstring first); under nearest rounding the
 * payload, the metadata and the decoded values are bit-identical to it.
 * Build flags matter for that: no -ffast-math, and -ffp-contract=off so that
 * "lo + step * l" stays a multiply followed by an add, as in the reference.
 *
 * Each call handles blocks [blk_begin, blk_end), so the Python side can split
 * a tensor between threads (ctypes releases the GIL during the call). A block
 * is small (<= 256 KiB of fp32), so its second sweep reads from cache.
 *
 * Stochastic rounding noise is a counter-based hash of (seed, block index,
 * index in the block): no state, any split of the blocks between calls draws
 * the same values, and the inner loop stays vectorisable (32-bit multiplies and
 * shifts only).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#if defined(__linux__)
#include <sys/mman.h>
#endif

#define KIND_F32 0
#define KIND_F16 1
#define KIND_BF16 2
#define INLINE static inline __attribute__((always_inline))

INLINE float f32_from_bits(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
INLINE uint32_t bits_from_f32(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

INLINE float bf16_to_f32(uint16_t h) { return f32_from_bits((uint32_t)h << 16); }

/* float32 -> bfloat16, round to nearest even (PyTorch's c10::round_to_nearest_even) */
INLINE uint16_t f32_to_bf16(float f) {
    uint32_t u = bits_from_f32(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

#if defined(__FLT16_MAX__) && !defined(BQ_SOFT_F16)
INLINE float f16_to_f32(uint16_t h) { _Float16 v; memcpy(&v, &h, 2); return (float)v; }
INLINE uint16_t f32_to_f16(float f) { _Float16 v = (_Float16)f; uint16_t h; memcpy(&h, &v, 2); return h; }
#else
/* compilers without _Float16 (gcc < 12 on x86): the bit-exact conversions PyTorch itself
 * uses on CPU (c10/util/Half.h, from Maratyszcza's FP16 library), round to nearest even */
INLINE float f16_to_f32(uint16_t h) {
    const uint32_t w = (uint32_t)h << 16;
    const uint32_t sign = w & 0x80000000u;
    const uint32_t two_w = w + w;
    const float normalized = f32_from_bits((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
    const float denormalized = f32_from_bits((two_w >> 17) | (126u << 23)) - 0.5f;
    return f32_from_bits(sign | (two_w < (1u << 27) ? bits_from_f32(denormalized) : bits_from_f32(normalized)));
}
INLINE uint16_t f32_to_f16(float f) {
    float base = (fabsf(f) * 0x1.0p+112f) * 0x1.0p-110f;
    const uint32_t w = bits_from_f32(f);
    const uint32_t shl1_w = w + w;
    const uint32_t sign = w & 0x80000000u;
    uint32_t bias = shl1_w & 0xFF000000u;
    if (bias < 0x71000000u) bias = 0x71000000u;
    base = f32_from_bits((bias >> 1) + 0x07800000u) + base;
    const uint32_t bits = bits_from_f32(base);
    const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
    return (uint16_t)((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}
#endif

INLINE float load_as_f32(const void *p, int64_t i, int kind) {
    if (kind == KIND_F32) return ((const float *)p)[i];
    if (kind == KIND_F16) return f16_to_f32(((const uint16_t *)p)[i]);
    return bf16_to_f32(((const uint16_t *)p)[i]);
}

INLINE void store_from_f32(void *p, int64_t i, float v, int kind) {
    if (kind == KIND_F32) ((float *)p)[i] = v;
    else if (kind == KIND_F16) ((uint16_t *)p)[i] = f32_to_f16(v);
    else ((uint16_t *)p)[i] = f32_to_bf16(v);
}

/* round_meta of the reference: v rounded to the metadata dtype toward +inf (up)
 * or -inf; non-finite values pass through. Returns the rounded value as float32
 * and stores it at meta[i]. */
static float round_and_store_meta(float v, int up, void *meta, int64_t i, int kind) {
    if (kind == KIND_F32) { ((float *)meta)[i] = v; return v; }
    uint16_t r = kind == KIND_F16 ? f32_to_f16(v) : f32_to_bf16(v);
    float back = kind == KIND_F16 ? f16_to_f32(r) : bf16_to_f32(r);
    int wrong = up ? back < v : back > v;
    int finite = kind == KIND_F16 ? (r & 0x7fff) < 0x7c00 : (r & 0x7fff) < 0x7f80;
    if (wrong && finite) {
        if (back == 0.0f) r = up ? 0x0001 : 0x8001;  /* the smallest subnormal of the right sign */
        else r = (uint16_t)((up ? back > 0.0f : back < 0.0f) ? r + 1 : r - 1);
        back = kind == KIND_F16 ? f16_to_f32(r) : bf16_to_f32(r);
    }
    ((uint16_t *)meta)[i] = r;
    return back;
}

/* a 32-bit integer hash with full avalanche (Wellons' "lowbias32") */
INLINE uint32_t mix32(uint32_t x) {
    x ^= x >> 16; x *= 0x7feb352du;
    x ^= x >> 15; x *= 0x846ca68bu;
    x ^= x >> 16;
    return x;
}

/* interval index k in [0, L-2] with levels[k] <= t (levels sorted, levels[0] = 0 <= t) */
INLINE int level_interval(float t, const float *levels, int bits) {
    const int top = (1 << bits) - 1;
    int k = 0;
    if (bits <= 4) {
        for (int i = 1; i < top; i++) k += levels[i] <= t;
    } else {
        /* branch-free binary search; cand <= top always, so levels[cand] is in bounds */
        for (int i = bits - 1; i >= 0; i--) {
            int cand = k + (1 << i);
            k = ((cand <= top - 1) & (levels[cand] <= t)) ? cand : k;
        }
    }
    return k;
}

/* min and max of a block; NaN is detected separately (NaN makes both NaN), so
 * the compiler may use vector min/max here */
__attribute__((optimize("finite-math-only", "no-signed-zeros")))
static void block_min_max(const float *restrict v, int64_t len, float *mn_out, float *mx_out) {
    float mn = v[0], mx = v[0];
    for (int64_t j = 1; j < len; j++) {
        mn = v[j] < mn ? v[j] : mn;
        mx = v[j] > mx ? v[j] : mx;
    }
    *mn_out = mn;
    *mx_out = mx;
}

static int has_nan(const float *restrict v, int64_t len) {
    const uint32_t *restrict u = (const uint32_t *)v;
    uint32_t m = 0;
    for (int64_t j = 0; j < len; j++) {
        uint32_t a = u[j] & 0x7fffffffu;
        m = a > m ? a : m;
    }
    return m > 0x7f800000u;
}

/* the block as float32: read in place when possible, else converted into buf (zero-padded to ncodes) */
static const float *block_as_f32(const void *x, int x_kind, int64_t start, int64_t len, int64_t ncodes,
                                 float *restrict buf) {
    if (x_kind == KIND_F32 && len == ncodes) return (const float *)x + start;
    if (x_kind == KIND_F32) {
        memcpy(buf, (const float *)x + start, (size_t)len * sizeof(float));
    } else if (x_kind == KIND_F16) {
        const uint16_t *restrict h = (const uint16_t *)x + start;
        for (int64_t j = 0; j < len; j++) buf[j] = f16_to_f32(h[j]);
    } else {
        const uint16_t *restrict h = (const uint16_t *)x + start;
        for (int64_t j = 0; j < len; j++) buf[j] = bf16_to_f32(h[j]);
    }
    for (int64_t j = len; j < ncodes; j++) buf[j] = 0.0f;
    return buf;
}

/* Scratch space of one call (one thread). */
typedef struct {
    float *xbuf;     /* G + 8 floats: a converted or padded block */
    float *t;        /* G + 8 floats: normalised values */
    uint32_t *codes; /* G + 8 codes (32-bit lanes: the encode loop vectorises over 16, not 64, elements) */
    uint32_t *mixed; /* G + 8 words: first hash round of each in-block index (shared by all blocks) */
    const float *shift, *scale; /* optional per-column affine map of float32 input (NULL: none) */
    int64_t ncols;              /* columns of the row-major input the affine map indexes */
} scratch_t;

/* The block of a row-major float32 [rows, ncols] input mapped column-wise, (x - shift[c]) * scale[c]
 * (a subtraction then a multiplication, as PyTorch computes it), zero-padded to ncodes. */
static const float *block_affine(const float *x, int64_t start, int64_t len, int64_t ncodes, const scratch_t *s,
                                 float *restrict buf) {
    const int64_t C = s->ncols;
    int64_t c = start % C, j = 0;
    while (j < len) {
        const int64_t seg = len - j < C - c ? len - j : C - c;
        const float *restrict xs = x + start + j;
        const float *restrict sh = s->shift + c;
        const float *restrict sc = s->scale + c;
        float *restrict o = buf + j;
        for (int64_t k = 0; k < seg; k++) o[k] = (xs[k] - sh[k]) * sc[k];
        j += seg;
        c = 0;
    }
    for (int64_t k = len; k < ncodes; k++) buf[k] = 0.0f;
    return buf;
}

/* Encode one block: elements [0, G) of it, x = 0 past the tensor's end (the
 * reference's padded layout), codes past G are 0; then pack the codes. */
INLINE void quantize_block(const void *x, int x_kind, int64_t start, int64_t len, int64_t G, int bits,
                           int meta_kind, const float *restrict levels, int optimal, int stochastic,
                           uint32_t block_key, uint8_t *restrict out, void *meta, int64_t nb, int64_t b,
                           scratch_t *s) {
    const int per = 8 / bits;
    const int top = (1 << bits) - 1;
    const float ftop = (float)top;
    const int64_t nbytes = (len * bits + 7) / 8;  /* bytes stored for this block */
    const int64_t ncodes = nbytes * per;          /* codes those bytes hold */
    const int64_t nenc = ncodes < G ? ncodes : G; /* codes that encode a value (the rest are 0) */
    const float *restrict v = s->shift ? block_affine((const float *)x, start, len, ncodes, s, s->xbuf)
                                       : block_as_f32(x, x_kind, start, len, ncodes, s->xbuf);

    /* metadata, rounded outward so that the stored range covers the block */
    float mn, mx;
    block_min_max(v, len, &mn, &mx);
    if (has_nan(v, len)) { mn = NAN; mx = NAN; }
    const float lo = round_and_store_meta(mn, 0, meta, b, meta_kind);
    const float step = round_and_store_meta((mx - lo) / ftop, 1, meta, nb + b, meta_kind);

    float *restrict t = s->t;
    if (step > 0.0f) {
        for (int64_t j = 0; j < nenc; j++) {
            float u = (v[j] - lo) / step;
            u = u < 0.0f ? 0.0f : u;
            t[j] = u > ftop ? ftop : u;
        }
    } else {
        for (int64_t j = 0; j < nenc; j++) t[j] = 0.0f;
    }
    if (optimal && bits == 2) {
        /* INT2 (i-Exact's setting): the interval by two compares and selects, which vectorise;
         * the same k, levels[k], levels[k+1] as level_interval (the levels increase strictly) */
        const float l0 = levels[0], l1 = levels[1], l2 = levels[2], l3 = levels[3];
        for (int64_t j = 0; j < nenc; j++) {
            const float u = t[j];
            const int a1 = l1 <= u, a2 = l2 <= u;
            const float k = a2 ? 2.0f : (a1 ? 1.0f : 0.0f);
            const float lk = a2 ? l2 : (a1 ? l1 : l0);
            const float lk1 = a2 ? l3 : (a1 ? l2 : l1);
            t[j] = k + (u - lk) / (lk1 - lk);
        }
    } else if (optimal && bits == 4) {
        /* INT4: the same selects over the 14 inner levels, written out so that the loop vectorises */
        float l[16];
        for (int i = 0; i < 16; i++) l[i] = levels[i];
        for (int64_t j = 0; j < nenc; j++) {
            const float u = t[j];
            float k = 0.0f, lk = l[0], lk1 = l[1];
#define BQ_STEP(i) { const int a = l[i] <= u; k = a ? (float)(i) : k; lk = a ? l[i] : lk; lk1 = a ? l[(i) + 1] : lk1; }
            BQ_STEP(1) BQ_STEP(2) BQ_STEP(3) BQ_STEP(4) BQ_STEP(5) BQ_STEP(6) BQ_STEP(7)
            BQ_STEP(8) BQ_STEP(9) BQ_STEP(10) BQ_STEP(11) BQ_STEP(12) BQ_STEP(13) BQ_STEP(14)
#undef BQ_STEP
            t[j] = k + (u - lk) / (lk1 - lk);
        }
    } else if (optimal) {
        for (int64_t j = 0; j < nenc; j++) {
            int k = level_interval(t[j], levels, bits);
            float lk = levels[k];
            t[j] = (float)k + (t[j] - lk) / (levels[k + 1] - lk);
        }
    }
    /* q = floor(t + r) clamped to [0, top]; t + r >= 0, so truncation is floor */
    uint32_t *restrict codes = s->codes;
    if (stochastic) {
        const uint32_t *restrict mixed = s->mixed;
        for (int64_t j = 0; j < nenc; j++) {
            float r = (float)(mix32(mixed[j] ^ block_key) >> 8) * 0x1p-24f;
            int q = (int)(t[j] + r);
            codes[j] = (uint32_t)(q > top ? top : q);
        }
    } else {
        for (int64_t j = 0; j < nenc; j++) {
            int q = (int)(t[j] + 0.5f);
            codes[j] = (uint32_t)(q > top ? top : q);
        }
    }
    for (int64_t j = nenc; j < ncodes; j++) codes[j] = 0;

    /* pack: code j of a byte sits at bits [j*bits, (j+1)*bits) */
    for (int64_t i = 0; i < nbytes; i++) {
        uint32_t byte = 0;
        for (int j = 0; j < per; j++) byte |= codes[i * per + j] << (j * bits);
        out[i] = (uint8_t)byte;
    }
}

/* The per-block key of the noise: a 64-bit mix of (seed key, block index). */
INLINE uint32_t block_key_of(uint64_t seed_key, int64_t b) {
    uint64_t z = seed_key ^ ((uint64_t)b * 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return (uint32_t)(z ^ (z >> 31));
}

INLINE void quantize_range(const void *x, int x_kind, int64_t n, int64_t G, int bits, int meta_kind,
                           const float *levels, int optimal, int stochastic, uint64_t seed_key,
                           uint8_t *payload, void *meta, int64_t nb, int64_t blk_begin, int64_t blk_end,
                           scratch_t *s) {
    const int64_t bpb = (G * bits + 7) / 8;
    for (int64_t b = blk_begin; b < blk_end; b++) {
        int64_t start = b * G;
        int64_t len = n - start < G ? n - start : G;
        quantize_block(x, x_kind, start, len, G, bits, meta_kind, levels, optimal, stochastic,
                       block_key_of(seed_key, b), payload + b * bpb, meta, nb, b, s);
    }
}

/* constant-folded variants: the compiler vectorises each inner loop for one bits/mode */
#define QUANTIZE_VARIANT(BITS, OPT, STO)                                                                     \
    static void quantize_##BITS##_##OPT##_##STO(const void *x, int x_kind, int64_t n, int64_t G,              \
            int meta_kind, const float *levels, uint64_t seed_key, uint8_t *payload, void *meta, int64_t nb,  \
            int64_t b0, int64_t b1, scratch_t *s) {                                                           \
        quantize_range(x, x_kind, n, G, BITS, meta_kind, levels, OPT, STO, seed_key, payload, meta, nb, b0,   \
                       b1, s);                                                                                \
    }
#define QUANTIZE_BITS(OPT, STO) \
    QUANTIZE_VARIANT(1, OPT, STO) QUANTIZE_VARIANT(2, OPT, STO) \
    QUANTIZE_VARIANT(4, OPT, STO) QUANTIZE_VARIANT(8, OPT, STO)
QUANTIZE_BITS(0, 0)
QUANTIZE_BITS(0, 1)
QUANTIZE_BITS(1, 0)
QUANTIZE_BITS(1, 1)

typedef void (*quantize_fn)(const void *, int, int64_t, int64_t, int, const float *, uint64_t, uint8_t *, void *,
                            int64_t, int64_t, int64_t, scratch_t *);
#define ENTRY(OPT, STO) \
    {quantize_1_##OPT##_##STO, quantize_2_##OPT##_##STO, quantize_4_##OPT##_##STO, quantize_8_##OPT##_##STO}
static const quantize_fn QUANTIZE_TABLE[2][2][4] = {
    {ENTRY(0, 0), ENTRY(0, 1)},
    {ENTRY(1, 0), ENTRY(1, 1)},
};

static int bits_index(int bits) { return bits == 1 ? 0 : bits == 2 ? 1 : bits == 4 ? 2 : bits == 8 ? 3 : -1; }

/* splitmix64: nearby seeds give unrelated keys */
static uint64_t seed_key_of(uint64_t seed) {
    uint64_t z = seed + 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* Returns 0, -1 for arguments this build does not handle (the caller validated them), -2 out of memory.
 * Noise of element j of block b: mix32(mix32(j + k1) ^ block_key(seed, b)) -- stateless, so any split of
 * the blocks between calls draws the same values. */
static int quantize_impl(const void *x, int x_kind, int64_t n, int64_t G, int bits, int meta_kind,
                         const float *levels, int stochastic, uint64_t seed, uint8_t *payload, void *meta, int64_t nb,
                         int64_t blk_begin, int64_t blk_end, const float *shift, const float *scale, int64_t ncols) {
    int bi = bits_index(bits);
    if (bi < 0 || x_kind < 0 || x_kind > 2 || meta_kind < 0 || meta_kind > 2 || G < 1) return -1;
    if (shift && (x_kind != KIND_F32 || !scale || ncols < 1)) return -1;
    size_t cap = (size_t)G + 8;
    scratch_t s;
    s.shift = shift;
    s.scale = scale;
    s.ncols = ncols;
    s.xbuf = (float *)malloc(cap * sizeof(float));
    s.t = (float *)malloc(cap * sizeof(float));
    s.codes = (uint32_t *)malloc(cap * sizeof(uint32_t));
    s.mixed = stochastic ? (uint32_t *)malloc(cap * sizeof(uint32_t)) : NULL;
    int status = 0;
    if (!s.xbuf || !s.t || !s.codes || (stochastic && !s.mixed)) {
        status = -2;
    } else {
        uint64_t key = seed_key_of(seed);
        if (stochastic)
            for (size_t j = 0; j < cap; j++) s.mixed[j] = mix32((uint32_t)j + (uint32_t)(key >> 32));
        QUANTIZE_TABLE[levels != NULL][stochastic != 0][bi](x, x_kind, n, G, meta_kind, levels, key, payload, meta,
                                                            nb, blk_begin, blk_end, &s);
    }
    free(s.xbuf);
    free(s.t);
    free(s.codes);
    free(s.mixed);
    return status;
}

int bq_quantize(const void *x, int x_kind, int64_t n, int64_t G, int bits, int meta_kind, const float *levels,
                int stochastic, uint64_t seed, uint8_t *payload, void *meta, int64_t nb, int64_t blk_begin,
                int64_t blk_end) {
    return quantize_impl(x, x_kind, n, G, bits, meta_kind, levels, stochastic, seed, payload, meta, nb, blk_begin,
                         blk_end, NULL, NULL, 0);
}

/* bq_quantize of (x - shift[c]) * scale[c], x a row-major float32 [n / ncols, ncols] (c the column):
 * a normalisation's output encoded without being stored. */
int bq_quantize_affine(const float *x, int64_t n, int64_t ncols, const float *shift, const float *scale, int64_t G,
                       int bits, int meta_kind, const float *levels, int stochastic, uint64_t seed, uint8_t *payload,
                       void *meta, int64_t nb, int64_t blk_begin, int64_t blk_end) {
    return quantize_impl(x, KIND_F32, n, G, bits, meta_kind, levels, stochastic, seed, payload, meta, nb, blk_begin,
                         blk_end, shift, scale, ncols);
}

/* ---------------------------------------------------------------- decoding */

/* the level of every code of a block (len codes) into vals: code q for uniform levels, levels[q] for optimal */
INLINE void unpack_levels(const uint8_t *restrict src, int64_t len, int bits, int optimal, const float *table,
                          float *restrict vals) {
    const int per = 8 / bits;
    const uint32_t mask = (1u << bits) - 1u;
    const int64_t nbytes = (len * bits + 7) / 8;
    for (int64_t i = 0; i < nbytes; i++) {
        const uint32_t byte = src[i];
        for (int j = 0; j < per; j++) {
            const uint32_t q = (byte >> (j * bits)) & mask;
            if (optimal && bits == 2)  /* selects instead of a table lookup: they vectorise */
                vals[i * per + j] = q == 0 ? table[0] : q == 1 ? table[1] : q == 2 ? table[2] : table[3];
            else
                vals[i * per + j] = optimal ? table[q] : (float)q;
        }
    }
}

/* x_hat = lo + step * l_q in float32 (a multiply, then an add), cast to the output dtype */
INLINE void dequantize_range(const uint8_t *restrict payload, const void *meta, int meta_kind,
                             const float *levels, int64_t n, int64_t G, int bits, int optimal, int out_kind,
                             void *out, int64_t nb, int64_t blk_begin, int64_t blk_end, float *restrict vals) {
    const uint32_t mask = (1u << bits) - 1u;
    const int64_t bpb = (G * bits + 7) / 8;
    float table[256];
    for (uint32_t q = 0; q <= mask; q++) table[q] = optimal ? levels[q] : (float)q;
    for (int64_t b = blk_begin; b < blk_end; b++) {
        const int64_t start = b * G;
        const int64_t len = n - start < G ? n - start : G;
        const float lo = load_as_f32(meta, b, meta_kind);
        const float step = load_as_f32(meta, nb + b, meta_kind);
        unpack_levels(payload + b * bpb, len, bits, optimal, table, vals);
        if (out_kind == KIND_F32) {
            float *restrict o = (float *)out + start;
            for (int64_t j = 0; j < len; j++) o[j] = lo + step * vals[j];
        } else if (out_kind == KIND_F16) {
            uint16_t *restrict o = (uint16_t *)out + start;
            for (int64_t j = 0; j < len; j++) o[j] = f32_to_f16(lo + step * vals[j]);
        } else {
            uint16_t *restrict o = (uint16_t *)out + start;
            for (int64_t j = 0; j < len; j++) o[j] = f32_to_bf16(lo + step * vals[j]);
        }
    }
}

#define DEQUANTIZE_VARIANT(BITS, OPT)                                                                        \
    static void dequantize_##BITS##_##OPT(const uint8_t *payload, const void *meta, int meta_kind,            \
            const float *levels, int64_t n, int64_t G, int out_kind, void *out, int64_t nb, int64_t b0,        \
            int64_t b1, float *vals) {                                                                         \
        dequantize_range(payload, meta, meta_kind, levels, n, G, BITS, OPT, out_kind, out, nb, b0, b1, vals);  \
    }
DEQUANTIZE_VARIANT(1, 0) DEQUANTIZE_VARIANT(2, 0) DEQUANTIZE_VARIANT(4, 0) DEQUANTIZE_VARIANT(8, 0)
DEQUANTIZE_VARIANT(1, 1) DEQUANTIZE_VARIANT(2, 1) DEQUANTIZE_VARIANT(4, 1) DEQUANTIZE_VARIANT(8, 1)

typedef void (*dequantize_fn)(const uint8_t *, const void *, int, const float *, int64_t, int64_t, int, void *,
                              int64_t, int64_t, int64_t, float *);
static const dequantize_fn DEQUANTIZE_TABLE[2][4] = {
    {dequantize_1_0, dequantize_2_0, dequantize_4_0, dequantize_8_0},
    {dequantize_1_1, dequantize_2_1, dequantize_4_1, dequantize_8_1},
};

int bq_dequantize(const uint8_t *payload, const void *meta, int meta_kind, const float *levels, int64_t n, int64_t G,
                  int bits, int out_kind, void *out, int64_t nb, int64_t blk_begin, int64_t blk_end) {
    int bi = bits_index(bits);
    if (bi < 0 || out_kind < 0 || out_kind > 2 || meta_kind < 0 || meta_kind > 2 || G < 1) return -1;
    float *vals = (float *)malloc(((size_t)G + 8) * sizeof(float));
    if (!vals) return -2;
    DEQUANTIZE_TABLE[levels != NULL][bi](payload, meta, meta_kind, levels, n, G, out_kind, out, nb, blk_begin,
                                         blk_end, vals);
    free(vals);
    return 0;
}

/* Ask for 2 MiB pages for a large output that has not been touched yet: a fresh
 * torch.empty is faulted in page by page as it is written, and with 4 KiB pages
 * those faults cost more than decoding. A hint only; results never depend on it. */
int bq_advise_huge_pages(void *p, int64_t nbytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    const uintptr_t huge = (uintptr_t)1 << 21;
    uintptr_t a = ((uintptr_t)p + huge - 1) & ~(huge - 1);
    uintptr_t e = ((uintptr_t)p + (uintptr_t)nbytes) & ~(huge - 1);
    if (e > a) return madvise((void *)a, e - a, MADV_HUGEPAGE);
#else
    (void)p; (void)nbytes;
#endif
    return 0;
}

/* lets the loader check that it talks to the build it expects */
int bq_abi_version(void) { return 1; }

/* ================================================================ elementwise ops beside the codec
 *
 * Dropout, ReLU / LeakyReLU with their 1-bit masks, and batch normalisation fused with the codec
 * (loaded by native_ops.py). Each handles a range of elements (or codec blocks) so that the Python
 * side can split the work between threads; none allocates tensors.
 */

/* Dropout: element i is kept iff the hash of (seed, i) is at least `threshold` (P(keep) = 1 - threshold
 * / 2^32); kept elements are multiplied by `scale`, the others are 0. With x == NULL the noise itself
 * (scale or 0) is written. The hash is the codec's noise construction over chunks of DROP_CHUNK
 * elements: mix32(mix32(j + k1) ^ chunk_key(seed, i / DROP_CHUNK)), j = i % DROP_CHUNK; any split of
 * the elements (begin a multiple of DROP_CHUNK) draws the same mask. */
#define DROP_CHUNK 4096
int bq_dropout(const void *x, int kind, int64_t n, uint32_t threshold, float scale, uint64_t seed, void *out,
               int64_t begin, int64_t end) {
    if (kind < 0 || kind > 2 || begin % DROP_CHUNK) return -1;
    uint32_t *mixed = (uint32_t *)malloc(DROP_CHUNK * sizeof(uint32_t));
    float *vals = (float *)malloc(DROP_CHUNK * sizeof(float));
    if (!mixed || !vals) { free(mixed); free(vals); return -2; }
    const uint64_t key = seed_key_of(seed);
    for (uint32_t j = 0; j < DROP_CHUNK; j++) mixed[j] = mix32(j + (uint32_t)(key >> 32));
    if (end > n) end = n;
    for (int64_t c0 = begin; c0 < end; c0 += DROP_CHUNK) {
        const int64_t len = end - c0 < DROP_CHUNK ? end - c0 : DROP_CHUNK;
        const uint32_t ck = block_key_of(key, c0 / DROP_CHUNK);
        if (x == NULL) {
            for (int64_t j = 0; j < len; j++) vals[j] = mix32(mixed[j] ^ ck) >= threshold ? scale : 0.0f;
        } else if (kind == KIND_F32) {
            const float *restrict xs = (const float *)x + c0;
            for (int64_t j = 0; j < len; j++) vals[j] = mix32(mixed[j] ^ ck) >= threshold ? xs[j] * scale : 0.0f;
        } else {
            for (int64_t j = 0; j < len; j++) {
                const float v = load_as_f32(x, c0 + j, kind);
                vals[j] = mix32(mixed[j] ^ ck) >= threshold ? v * scale : 0.0f;
            }
        }
        if (kind == KIND_F32) memcpy((float *)out + c0, vals, (size_t)len * sizeof(float));
        else for (int64_t j = 0; j < len; j++) store_from_f32(out, c0 + j, vals[j], kind);
    }
    free(mixed);
    free(vals);
    return 0;
}

/* ReLU (slope 0) / LeakyReLU: out = x > 0 ? x : x * slope (x itself for ReLU's negatives: 0), and the
 * sign mask x > 0 packed 8 per byte, element i at bit i % 8 of byte i / 8 (BitMask's layout); the last
 * byte zero-padded. begin must be a multiple of 8. */
#if defined(__AVX2__)
#include <immintrin.h>
#endif
INLINE float relu_value(float v, float slope, int leaky) {
    return v > 0.0f ? v : (leaky ? v * slope : (v <= 0.0f ? 0.0f : v));
}
int bq_relu_pack(const void *x, int kind, int64_t n, float slope, int leaky, void *out, uint8_t *bits,
                 int64_t begin, int64_t end) {
    if (kind < 0 || kind > 2 || begin % 8) return -1;
    if (end > n) end = n;
    int64_t i = begin;
    if (kind == KIND_F32) {
        const float *restrict xs = (const float *)x;
        float *restrict o = (float *)out;
        const int64_t full = begin + (end - begin) / 8 * 8;
        for (int64_t k = begin; k < full; k++) o[k] = relu_value(xs[k], slope, leaky);
#if defined(__AVX2__)
        const __m256 zero = _mm256_setzero_ps();
        for (; i < full; i += 8)
            bits[i / 8] = (uint8_t)_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(xs + i), zero, _CMP_GT_OQ));
#else
        for (; i < full; i += 8) {
            uint32_t byte = 0;
            for (int j = 0; j < 8; j++) byte |= (uint32_t)(xs[i + j] > 0.0f) << j;
            bits[i / 8] = (uint8_t)byte;
        }
#endif
    }
    for (; i < end; i += 8) {
        uint32_t byte = 0;
        for (int j = 0; j < 8 && i + j < end; j++) {
            const float v = load_as_f32(x, i + j, kind);
            store_from_f32(out, i + j, relu_value(v, slope, leaky), kind);
            byte |= (uint32_t)(v > 0.0f) << j;
        }
        bits[i / 8] = (uint8_t)byte;
    }
    return 0;
}

/* The gradient through a 1-bit mask: out = g * (bit ? 1 : slope) (slope 0: ReLU). begin a multiple of 8. */
int bq_mask_grad(const void *g, int kind, int64_t n, const uint8_t *bits, float slope, void *out, int64_t begin,
                 int64_t end) {
    if (kind < 0 || kind > 2 || begin % 8) return -1;
    if (end > n) end = n;
    float (*lut)[8] = (float (*)[8])malloc(256 * 8 * sizeof(float));  /* factor of every bit of every byte */
    if (!lut) return -2;
    for (int v = 0; v < 256; v++)
        for (int j = 0; j < 8; j++) lut[v][j] = ((v >> j) & 1) ? 1.0f : slope;
    int64_t i = begin;
    if (kind == KIND_F32) {
        const float *restrict gs = (const float *)g;
        float *restrict o = (float *)out;
        for (; i + 8 <= end; i += 8) {
            const float *restrict f = lut[bits[i / 8]];
            for (int j = 0; j < 8; j++) o[i + j] = gs[i + j] * f[j];
        }
    }
    for (; i < end; i++) store_from_f32(out, i, load_as_f32(g, i, kind) * lut[bits[i / 8]][i % 8], kind);
    free(lut);
    return 0;
}

/* Batch normalisation's backward from its normalised input xn kept compressed ([rows, C] row-major, n =
 * rows * C elements, codec blocks [b0, b1)) and the float32 gradient g of the same layout, without ever
 * storing a decoded xn. Pass 1 (bq_bn_sums) adds, per column c, sum(g) and sum(g * xn) into double
 * accumulators; pass 2 (bq_bn_dx) writes
 *     dx = A[c] * (g * (1 + xn * xn * inv_count) - M[c] - xn * Q[c])      (diag = 1; else without xn * xn)
 * with A = w * invstd, M = mean(g), Q = mean(g * xn) over the column (see _normalization_backward). */
INLINE void decode_block_values(const uint8_t *payload, const void *meta, int meta_kind, const float *table,
                                int64_t G, int bits, int optimal, int64_t n, int64_t nb, int64_t b, float *restrict vals,
                                int64_t *start_out, int64_t *len_out) {
    const int64_t bpb = (G * bits + 7) / 8;
    const int64_t start = b * G;
    const int64_t len = n - start < G ? n - start : G;
    const float lo = load_as_f32(meta, b, meta_kind);
    const float step = load_as_f32(meta, nb + b, meta_kind);
    unpack_levels(payload + b * bpb, len, bits, optimal, table, vals);
    for (int64_t j = 0; j < len; j++) vals[j] = lo + step * vals[j];
    *start_out = start;
    *len_out = len;
}

INLINE void bn_sums_range(const float *restrict g, const uint8_t *payload, const void *meta, int meta_kind,
                          const float *levels, int64_t n, int64_t G, int bits, int optimal, int64_t C, int64_t nb,
                          int64_t b0, int64_t b1, double *restrict sum_g, double *restrict sum_gx,
                          float *restrict vals) {
    float table[256];
    for (uint32_t q = 0; q < (1u << bits); q++) table[q] = optimal ? levels[q] : (float)q;
    for (int64_t b = b0; b < b1; b++) {
        int64_t start, len;
        decode_block_values(payload, meta, meta_kind, table, G, bits, optimal, n, nb, b, vals, &start, &len);
        int64_t c = start % C, j = 0;
        while (j < len) {
            const int64_t seg = len - j < C - c ? len - j : C - c;
            const float *restrict gs = g + start + j;
            const float *restrict v = vals + j;
            double *restrict sg = sum_g + c;
            double *restrict sx = sum_gx + c;
            for (int64_t k = 0; k < seg; k++) {
                sg[k] += (double)gs[k];
                sx[k] += (double)(gs[k] * v[k]);
            }
            j += seg;
            c = 0;
        }
    }
}

INLINE void bn_dx_range(const float *restrict g, const uint8_t *payload, const void *meta, int meta_kind,
                        const float *levels, int64_t n, int64_t G, int bits, int optimal, int64_t C, int64_t nb,
                        int64_t b0, int64_t b1, const float *A, const float *M, const float *Q, float inv_count,
                        int diag, float *restrict out, float *restrict vals) {
    float table[256];
    for (uint32_t q = 0; q < (1u << bits); q++) table[q] = optimal ? levels[q] : (float)q;
    for (int64_t b = b0; b < b1; b++) {
        int64_t start, len;
        decode_block_values(payload, meta, meta_kind, table, G, bits, optimal, n, nb, b, vals, &start, &len);
        int64_t c = start % C, j = 0;
        while (j < len) {
            const int64_t seg = len - j < C - c ? len - j : C - c;
            const float *restrict gs = g + start + j;
            const float *restrict v = vals + j;
            float *restrict o = out + start + j;
            const float *restrict a = A + c, *restrict m = M + c, *restrict q = Q + c;
            if (diag)
                for (int64_t k = 0; k < seg; k++)
                    o[k] = a[k] * (gs[k] * (1.0f + v[k] * v[k] * inv_count) - m[k] - v[k] * q[k]);
            else
                for (int64_t k = 0; k < seg; k++) o[k] = a[k] * (gs[k] - m[k] - v[k] * q[k]);
            j += seg;
            c = 0;
        }
    }
}

#define BN_VARIANT(BITS, OPT)                                                                                 \
    static void bn_sums_##BITS##_##OPT(const float *g, const uint8_t *p, const void *meta, int mk,             \
            const float *lv, int64_t n, int64_t G, int64_t C, int64_t nb, int64_t b0, int64_t b1, double *sg,   \
            double *sx, float *vals) {                                                                          \
        bn_sums_range(g, p, meta, mk, lv, n, G, BITS, OPT, C, nb, b0, b1, sg, sx, vals);                        \
    }                                                                                                           \
    static void bn_dx_##BITS##_##OPT(const float *g, const uint8_t *p, const void *meta, int mk,               \
            const float *lv, int64_t n, int64_t G, int64_t C, int64_t nb, int64_t b0, int64_t b1,               \
            const float *A, const float *M, const float *Q, float ic, int diag, float *out, float *vals) {     \
        bn_dx_range(g, p, meta, mk, lv, n, G, BITS, OPT, C, nb, b0, b1, A, M, Q, ic, diag, out, vals);           \
    }
BN_VARIANT(1, 0) BN_VARIANT(2, 0) BN_VARIANT(4, 0) BN_VARIANT(8, 0)
BN_VARIANT(1, 1) BN_VARIANT(2, 1) BN_VARIANT(4, 1) BN_VARIANT(8, 1)

typedef void (*bn_sums_fn)(const float *, const uint8_t *, const void *, int, const float *, int64_t, int64_t,
                           int64_t, int64_t, int64_t, int64_t, double *, double *, float *);
typedef void (*bn_dx_fn)(const float *, const uint8_t *, const void *, int, const float *, int64_t, int64_t,
                         int64_t, int64_t, int64_t, int64_t, const float *, const float *, const float *, float, int,
                         float *, float *);
static const bn_sums_fn BN_SUMS_TABLE[2][4] = {
    {bn_sums_1_0, bn_sums_2_0, bn_sums_4_0, bn_sums_8_0},
    {bn_sums_1_1, bn_sums_2_1, bn_sums_4_1, bn_sums_8_1},
};
static const bn_dx_fn BN_DX_TABLE[2][4] = {
    {bn_dx_1_0, bn_dx_2_0, bn_dx_4_0, bn_dx_8_0},
    {bn_dx_1_1, bn_dx_2_1, bn_dx_4_1, bn_dx_8_1},
};

int bq_bn_sums(const float *g, const uint8_t *payload, const void *meta, int meta_kind, const float *levels,
               int64_t n, int64_t G, int bits, int64_t C, int64_t nb, int64_t b0, int64_t b1, double *sum_g,
               double *sum_gx) {
    int bi = bits_index(bits);
    if (bi < 0 || meta_kind < 0 || meta_kind > 2 || G < 1 || C < 1) return -1;
    float *vals = (float *)malloc(((size_t)G + 8) * sizeof(float));
    if (!vals) return -2;
    BN_SUMS_TABLE[levels != NULL][bi](g, payload, meta, meta_kind, levels, n, G, C, nb, b0, b1, sum_g, sum_gx, vals);
    free(vals);
    return 0;
}

int bq_bn_dx(const float *g, const uint8_t *payload, const void *meta, int meta_kind, const float *levels, int64_t n,
             int64_t G, int bits, int64_t C, int64_t nb, int64_t b0, int64_t b1, const float *A, const float *M,
             const float *Q, float inv_count, int diag, float *out) {
    int bi = bits_index(bits);
    if (bi < 0 || meta_kind < 0 || meta_kind > 2 || G < 1 || C < 1) return -1;
    float *vals = (float *)malloc(((size_t)G + 8) * sizeof(float));
    if (!vals) return -2;
    BN_DX_TABLE[levels != NULL][bi](g, payload, meta, meta_kind, levels, n, G, C, nb, b0, b1, A, M, Q, inv_count, diag,
                                    out, vals);
    free(vals);
    return 0;
}

/* Multi-head attention aggregation over a CSR (rows [r0, r1)):
 *     out[j, h, :] = sum over positions e of row j of alpha[edge, h] * x[nbr[edge], h, :],  edge = eid ? eid[e] : e
 * (the transpose walks the source-sorted positions with eid = their target-sorted edge). float32, int32 indices;
 * x is [*, H, C] and out [rows, H, C], both contiguous. */
int bq_heads_spmm(const int32_t *crow, const int32_t *nbr, const int32_t *eid, const float *alpha, const float *x,
                  int64_t H, int64_t C, float *out, int64_t r0, int64_t r1) {
    if (H < 1 || C < 1) return -1;
    const int64_t W = H * C;
    for (int64_t j = r0; j < r1; j++) {
        float *restrict o = out + j * W;
        for (int64_t k = 0; k < W; k++) o[k] = 0.0f;
        for (int64_t e = crow[j]; e < crow[j + 1]; e++) {
            const int64_t edge = eid ? eid[e] : e;
            const float *restrict xs = x + (int64_t)nbr[edge] * W;
            const float *restrict a = alpha + edge * H;
            for (int64_t h = 0; h < H; h++) {
                const float w = a[h];
                float *restrict oh = o + h * C;
                const float *restrict xh = xs + h * C;
                for (int64_t c = 0; c < C; c++) oh[c] += w * xh[c];
            }
        }
    }
    return 0;
}

/* out[e - a, h] = <g[dst[e], h, :], x[src[e], h, :]> for edges [e0, e1) of a chunk starting at a (float32,
 * int32 indices); the sums over channels may be reassociated (vectorised), like any BLAS dot product. */
__attribute__((optimize("associative-math", "no-signed-zeros")))
int bq_heads_sddmm(const int32_t *src, const int32_t *dst, const float *g, const float *x, int64_t H, int64_t C,
                   float *out, int64_t a, int64_t e0, int64_t e1) {
    if (H < 1 || C < 1) return -1;
    const int64_t W = H * C;
    for (int64_t e = e0; e < e1; e++) {
        const float *restrict gs = g + (int64_t)dst[e] * W;
        const float *restrict xs = x + (int64_t)src[e] * W;
        float *restrict o = out + (e - a) * H;
        for (int64_t h = 0; h < H; h++) {
            float acc = 0.0f;
            for (int64_t c = 0; c < C; c++) acc += gs[h * C + c] * xs[h * C + c];
            o[h] = acc;
        }
    }
    return 0;
}
