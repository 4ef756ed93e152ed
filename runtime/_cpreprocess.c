/*
 * vlmedge.runtime._cpreprocess: per-image work of the HF image processors, in C.
 *
 * Every function reads a caller's buffer and writes into a caller-provided
 * buffer (no allocation per frame), checks sizes before touching memory, and
 * releases the GIL while it computes, so camera threads run in parallel.
 * The numpy reference of each function is in preprocess_ref.py; the tests
 * hold the two to each other.
 *
 * C99 that builds with gcc or clang on any target, -O3 vectorising the
 * portable kernels (NEON on aarch64). x86-64 builds add AVX2 and AVX512-VNNI
 * resize kernels, compiled with target attributes (no -march flag at build
 * time) and chosen at import by what the CPU has; all kernels do the same
 * integer arithmetic, so every CPU gives the same bytes. Define
 * VLMEDGE_PORTABLE_ONLY to build without them.
 *
 * Speed comes from doing only the needed work, once: the resize computes only
 * the center crop's pixels (fused crop), the last pass writes normalized
 * float32 planes directly (resize_normalize: no uint8 image in between), and
 * the SIMD kernels keep Pillow's 22-bit fixed-point weights exact by
 * splitting each into two int16 halves for pmaddwd / vpdpwssd.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

/* Acquire a contiguous buffer or set an error naming the argument. */
static int get_buffer(PyObject *obj, Py_buffer *view, int writable, const char *name) {
    int flags = PyBUF_C_CONTIGUOUS | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj, view, flags) != 0) {
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError,
                     "%s: expected a C-contiguous%s buffer (numpy array, bytes%s); "
                     "got %.80s (hint: np.ascontiguousarray)",
                     name, writable ? " writable" : "", writable ? "array" : "",
                     Py_TYPE(obj)->tp_name);
        return -1;
    }
    return 0;
}

/* The arithmetic of normalize_to_chw (below), as one table per channel:
 * lut[c * 256 + v]. */
static void build_lut(float *lut, double scale, const float *mean, const float *std) {
    for (int c = 0; c < 3; c++)
        for (int v = 0; v < 256; v++)
            lut[c * 256 + v] = ((float)((double)v * scale) - mean[c]) / std[c];
}

/*
 * normalize_to_chw(src, height, width, channels, dst, scale, mean, std)
 *
 * src: uint8 pixels, interleaved HWC, `channels` in {3, 4} (RGB or RGBA; alpha
 *      is ignored), row stride = width * channels.
 * dst: float32 (3, height, width), planar CHW, written in full.
 * Computes dst[c, y, x] = (float32(src[y, x, c] * scale) - mean[c]) / std[c]
 * exactly as HF's rescale then normalize do it: the rescale in float64 rounded
 * once to float32 (transformers.image_transforms.rescale), then the subtraction
 * and the division in float32 (multiplication by 1/std is NOT used), so results
 * equal HF's bit for bit.
 */
static PyObject *normalize_to_chw(PyObject *self, PyObject *args) {
    PyObject *src_obj, *dst_obj;
    Py_ssize_t h, w, ch;
    double scale;
    float mean[3], std[3];
    if (!PyArg_ParseTuple(args, "OnnnOd(fff)(fff)", &src_obj, &h, &w, &ch, &dst_obj, &scale,
                          &mean[0], &mean[1], &mean[2], &std[0], &std[1], &std[2]))
        return NULL;
    if (h <= 0 || w <= 0) {
        PyErr_Format(PyExc_ValueError,
                     "normalize_to_chw: image size must be positive; got %zdx%zd", w, h);
        return NULL;
    }
    if (ch != 3 && ch != 4) {
        PyErr_Format(PyExc_ValueError,
                     "normalize_to_chw: channels must be 3 (RGB) or 4 (RGBA); got %zd", ch);
        return NULL;
    }
    for (int c = 0; c < 3; c++) {
        if (!(std[c] != 0.0f)) {
            PyErr_SetString(PyExc_ValueError, "normalize_to_chw: std must be non-zero");
            return NULL;
        }
    }
    Py_buffer src, dst;
    if (get_buffer(src_obj, &src, 0, "normalize_to_chw: src") < 0) return NULL;
    if (get_buffer(dst_obj, &dst, 1, "normalize_to_chw: dst") < 0) {
        PyBuffer_Release(&src);
        return NULL;
    }
    Py_ssize_t npix = h * w;
    if (src.len < npix * ch) {
        PyErr_Format(PyExc_ValueError,
                     "normalize_to_chw: src too short: expected %zd bytes for %zdx%zdx%zd, got %zd",
                     npix * ch, h, w, ch, src.len);
        goto fail;
    }
    if (dst.len < npix * 3 * (Py_ssize_t)sizeof(float)) {
        PyErr_Format(PyExc_ValueError,
                     "normalize_to_chw: dst too short: expected %zd bytes (float32 3x%zdx%zd), got %zd",
                     npix * 3 * (Py_ssize_t)sizeof(float), h, w, dst.len);
        goto fail;
    }
    if (dst.itemsize != (Py_ssize_t)sizeof(float) && dst.itemsize != 1) {
        PyErr_Format(PyExc_ValueError,
                     "normalize_to_chw: dst must be float32; got itemsize %zd", dst.itemsize);
        goto fail;
    }
    {
        const uint8_t *s = (const uint8_t *)src.buf;
        float *d = (float *)dst.buf;
        Py_BEGIN_ALLOW_THREADS
        /* Per channel: a lookup table of 256 values makes the inner loop a
         * gather, identical to (v * scale - mean) / std computed per pixel. */
        float lut[3 * 256];
        build_lut(lut, scale, mean, std);
        for (int c = 0; c < 3; c++) {
            float *plane = d + (Py_ssize_t)c * npix;
            const uint8_t *sc = s + c;
            for (Py_ssize_t i = 0; i < npix; i++) plane[i] = lut[c * 256 + sc[i * ch]];
        }
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    Py_RETURN_NONE;
fail:
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    return NULL;
}


/* ------------------------------------------------------------------------
 * Resize, matching Pillow's Image.resize(size, resample) for 8-bit bands
 * (reducing_gap=None), so that our pixels equal what the HF image processors
 * get from Pillow. The algorithm is Pillow's (src/libImaging/Resample.c),
 * re-derived here:
 *
 *  - separable: two passes through an 8-bit intermediate, each rounding to
 *    uint8; horizontal first, except that Pillow 13 goes vertical first when
 *    the height shrinks much more than the width (see vertical_first());
 *  - per output pixel, taps over [xmin, xmin+n) of the source with weights
 *    filter((x - center + 0.5) / filterscale), center = (xx + 0.5) * scale,
 *    scale = in/out, filterscale = max(scale, 1) (the support widens when
 *    downscaling: antialiasing); xmin/xmax rounded with (int)(v + 0.5) and
 *    clamped to the image; weights divided by their (sequential) sum;
 *  - weights become fixed point with 22 fractional bits, rounded half away
 *    from zero; a pixel is (2^21 + sum(p * k)) >> 22 clamped to 0..255;
 *  - a pass whose size does not change is skipped (an exact copy).
 * All doubles are computed in the same order as Pillow so that the integer
 * weights are identical; the C99 build keeps FP contraction off (-std=c99).
 * Only the output region asked for is computed (resize + center crop fused):
 * each output pixel depends on its own taps only, so this changes no value.
 * ------------------------------------------------------------------------ */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#ifndef M_PI  /* not in strict C99's math.h */
#define M_PI 3.14159265358979323846
#endif

#define PREC_BITS 22                  /* Pillow: 32 - 8 - 2 */
#define KPAD 8                        /* taps padded to a multiple of 8 (SIMD width) */

/* Pillow's filter numbers (PIL.Image.Resampling); NEAREST (0) is not a
 * convolution and is not provided. */
enum { F_LANCZOS = 1, F_BILINEAR = 2, F_BICUBIC = 3, F_BOX = 4, F_HAMMING = 5 };

static double filter_support(int f) {
    switch (f) {
        case F_BOX: return 0.5;
        case F_BILINEAR: case F_HAMMING: return 1.0;
        case F_BICUBIC: return 2.0;
        case F_LANCZOS: return 3.0;
        default: return 0.0;
    }
}

static double sinc(double x) {
    if (x == 0.0) return 1.0;
    x = x * M_PI;
    return sin(x) / x;
}

/* The filter kernels, written term for term as Pillow evaluates them. */
static double filter_eval(int f, double x) {
    switch (f) {
        case F_BOX:
            return (x > -0.5 && x <= 0.5) ? 1.0 : 0.0;
        case F_BILINEAR:
            if (x < 0.0) x = -x;
            return x < 1.0 ? 1.0 - x : 0.0;
        case F_HAMMING:
            if (x < 0.0) x = -x;
            if (x == 0.0) return 1.0;
            if (x >= 1.0) return 0.0;
            x = x * M_PI;
            return sin(x) / x * (0.54f + 0.46f * cos(x));
        case F_BICUBIC: /* Keys cubic, a = -0.5 */
            if (x < 0.0) x = -x;
            if (x < 1.0) return ((-0.5 + 2.0) * x - (-0.5 + 3.0)) * x * x + 1;
            if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * -0.5;
            return 0.0;
        case F_LANCZOS:
            return (-3.0 <= x && x < 3.0) ? sinc(x) * sinc(x / 3) : 0.0;
        default:
            return 0.0;
    }
}

/* Fixed-point weights of `count` consecutive output pixels [first, first+count)
 * of an in_size -> out_size resize along one axis. */
typedef struct {
    int kpad;        /* stride of k (taps, padded to KPAD) */
    int *xmin;       /* (count,) first source index */
    int *n;          /* (count,) number of taps */
    int32_t *k;      /* (count, kpad) weights, 22 fractional bits, 0 past n */
} axis_coeffs;

static void coeffs_free(axis_coeffs *c) {
    free(c->xmin); free(c->n); free(c->k);
    c->xmin = c->n = NULL; c->k = NULL;
}

/* Returns 0, or -1 when out of memory. Needs no GIL. */
static int coeffs_build(axis_coeffs *c, int in_size, int out_size, int first, int count, int f) {
    double scale = (double)(float)in_size / out_size;  /* Pillow: (in1 - in0) as floats */
    double filterscale = scale < 1.0 ? 1.0 : scale;
    double support = filter_support(f) * filterscale;
    int ksize = (int)ceil(support) * 2 + 1;
    c->kpad = (ksize + KPAD - 1) / KPAD * KPAD;
    c->xmin = malloc(sizeof(int) * (size_t)count);
    c->n = malloc(sizeof(int) * (size_t)count);
    c->k = calloc((size_t)count * c->kpad, sizeof(int32_t));
    double *w = malloc(sizeof(double) * (size_t)ksize);
    if (!c->xmin || !c->n || !c->k || !w) {
        free(w);
        coeffs_free(c);
        return -1;
    }
    double inv_fs = 1.0 / filterscale;
    for (int i = 0; i < count; i++) {
        int xx = first + i;
        double center = (xx + 0.5) * scale;
        int lo = (int)(center - support + 0.5);   /* truncation toward 0, as Pillow */
        int hi = (int)(center + support + 0.5);
        if (lo < 0) lo = 0;
        if (hi > in_size) hi = in_size;
        int n = hi - lo;
        double ww = 0.0;
        for (int x = 0; x < n; x++) {
            w[x] = filter_eval(f, (x + lo - center + 0.5) * inv_fs);
            ww += w[x];
        }
        int32_t *k = c->k + (size_t)i * c->kpad;
        for (int x = 0; x < n; x++) {
            double v = ww != 0.0 ? w[x] / ww : w[x];
            k[x] = v < 0 ? (int32_t)(-0.5 + v * (1 << PREC_BITS))
                         : (int32_t)(0.5 + v * (1 << PREC_BITS));
        }
        c->xmin[i] = lo;
        c->n[i] = n;
    }
    free(w);
    return 0;
}

/* Rounds a fixed-point sum to uint8 as Pillow's clip8 does: >> 22, clamped. */
static inline uint8_t clip8(int64_t ss) {
    if (ss < 0) return 0;
    ss >>= PREC_BITS;
    return ss > 255 ? 255 : (uint8_t)ss;
}

/* On x86-64 Linux with gcc, the hot loops are compiled twice, for AVX2 and for
 * the baseline (SSE2), and the loader picks one per CPU (an ifunc): a portable
 * binary that still uses 256-bit registers where the CPU has them. Elsewhere
 * (aarch64 uses NEON at baseline, clang, other OSes) it is one plain copy. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define HOT_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define HOT_CLONES
#endif


/* Each 22-bit weight k is split as k = hi * 2048 + lo with lo in 0..2047, so
 * both halves fit int16 and a dot product of int16 pixels with them is an
 * exact 16x16->32 multiply-add, which compilers vectorise (pmaddwd on SSE2,
 * smlal on NEON); sum(p * k) = 2048 * sum(p * hi) + sum(p * lo), recombined
 * in 64 bits, is then exactly Pillow's integer sum. */
static inline void split_weight(int32_t k, int16_t *hi, int16_t *lo) {
    int32_t h = k >= 0 ? (k >> 11) : -((-k + 2047) >> 11);  /* floor(k / 2048) */
    *hi = (int16_t)h;
    *lo = (int16_t)(k - h * 2048);
}

static void split_weights(const int32_t *k, size_t len, int16_t *kh, int16_t *kl) {
    for (size_t j = 0; j < len; j++) split_weight(k[j], &kh[j], &kl[j]);
}

static inline uint8_t combine(int32_t sum_hi, int32_t sum_lo) {
    return clip8((int64_t)sum_hi * 2048 + sum_lo + (1 << (PREC_BITS - 1)));
}

/* The SIMD kernels below add in int32 lanes that wrap. Wrapping adds and
 * shifts left are exact modulo 2^32, so the final sum is exact whenever the
 * true sum fits an int32 (as Pillow's own INT32 accumulator assumes); this
 * checks it, 255 * sum(|k|) + 2^21 < 2^31, for every output pixel of an axis
 * (only extreme reductions, hundreds of taps, fail it: they take the
 * portable path). */
static int sums_fit_int32(const axis_coeffs *c, int count) {
    for (int i = 0; i < count; i++) {
        int64_t s = 0;
        for (int t = 0; t < c->n[i]; t++) {
            int32_t k = c->k[(size_t)i * c->kpad + t];
            s += k < 0 ? -(int64_t)k : k;
        }
        if (255 * s + (1 << (PREC_BITS - 1)) >= INT32_MAX) return 0;
    }
    return 1;
}

/* ------------------------------------------------------------------------
 * Where a pass writes its output rows. An intermediate or a uint8 result
 * goes straight to `u8` (row y at u8 + y * stride). A normalized result
 * (resize_normalize) goes through `rowbuf`, a few rows of scratch that stay
 * in L1, into float32 planes (3, rows, width) by per-channel lookup tables:
 * the uint8 image is never written out whole.
 * ------------------------------------------------------------------------ */
#define SINK_SLOTS 4   /* rows a kernel may hold at once (the AVX2 row block) */

typedef struct {
    uint8_t *u8;          /* (rows, stride) uint8 output, or NULL to normalize */
    size_t stride;        /* bytes per output row (u8), or rowbuf slot size */
    uint8_t *rowbuf;      /* (SINK_SLOTS, stride) scratch when normalizing */
    float *planes;        /* (3, rows, width) float32 */
    const float *lut;     /* (3, 256): lut[c * 256 + v] = normalized value */
    int width, ch;        /* pixels per row, channels of a pixel (3 or 4) */
    size_t npix;          /* rows * width: one plane */
    /* uint8 (width, ch) row -> its three float32 plane rows r, g, b */
    void (*normalize)(const uint8_t *row, int width, int ch, const float *lut, float *r,
                      float *g, float *b);
} row_sink;

static inline uint8_t *sink_row(const row_sink *k, int y, int slot) {
    return k->u8 ? k->u8 + (size_t)y * k->stride : k->rowbuf + (size_t)slot * k->stride;
}

/* Row y is written: a normalizing sink converts it (HWC -> planar CHW). */
static void normalize_row(const uint8_t *restrict row, int width, int ch,
                          const float *restrict lut, float *restrict r, float *restrict g,
                          float *restrict b) {
    const float *restrict lr = lut, *restrict lg = lut + 256, *restrict lb = lut + 512;
    if (ch == 3) {  /* a constant stride: three table lookups per pixel, no multiply */
        for (int x = 0; x < width; x++, row += 3) {
            r[x] = lr[row[0]];
            g[x] = lg[row[1]];
            b[x] = lb[row[2]];
        }
        return;
    }
    for (int x = 0; x < width; x++, row += ch) {
        r[x] = lr[row[0]];
        g[x] = lg[row[1]];
        b[x] = lb[row[2]];
    }
}

static inline void sink_done(const row_sink *k, int y, int slot) {
    if (k->u8) return;
    float *r = k->planes + (size_t)y * k->width;
    k->normalize(k->rowbuf + (size_t)slot * k->stride, k->width, k->ch, k->lut, r,
                 r + k->npix, r + 2 * k->npix);
}

/* ------------------------------------------------------------------------
 * Portable kernels: plain C that gcc -O3 vectorises on any target.
 * ------------------------------------------------------------------------ */

/* One row, interleaved uint8 (ncols, ch) -> ch int16 planes of stride plen. */
HOT_CLONES static void deinterleave(const uint8_t *restrict row, int ncols, int ch,
                         int16_t *restrict plane, int plen) {
    if (ch == 3) {  /* the common case, written out so the loop has no inner stride */
        int16_t *restrict r = plane, *restrict g = plane + plen, *restrict b = plane + 2 * plen;
        for (int x = 0; x < ncols; x++) {
            r[x] = row[3 * x];
            g[x] = row[3 * x + 1];
            b[x] = row[3 * x + 2];
        }
        return;
    }
    for (int c = 0; c < ch; c++)
        for (int x = 0; x < ncols; x++) plane[(size_t)c * plen + x] = row[(size_t)x * ch + c];
}

/* dot product of int16 vectors (n a multiple of KPAD). */
static inline int32_t dot16(const int16_t *restrict a, const int16_t *restrict b, int n) {
    int32_t s = 0;
    for (int i = 0; i < n; i++) s += (int32_t)a[i] * (int32_t)b[i];
    return s;
}

/* One row of RGB planes -> count output pixels, all three channels and both
 * weight halves in one loop over the taps; K is the padded tap count, a
 * compile-time constant in the specialised copies below so the loop unrolls
 * into straight SIMD code with no per-dot-product overhead. */
#define HROW3_BODY(K)                                                              \
    for (int i = 0; i < count; i++) {                                              \
        const int16_t *restrict r = plane + off[i];                                \
        const int16_t *restrict g = r + plen, *restrict b = r + 2 * plen;          \
        const int16_t *restrict h = kh + (size_t)i * (K), *restrict l = kl + (size_t)i * (K); \
        int32_t rh = 0, gh = 0, bh = 0, rl = 0, gl = 0, bl = 0;                    \
        for (int t = 0; t < (K); t++) {                                            \
            rh += r[t] * h[t]; gh += g[t] * h[t]; bh += b[t] * h[t];               \
            rl += r[t] * l[t]; gl += g[t] * l[t]; bl += b[t] * l[t];               \
        }                                                                          \
        out[3 * i] = combine(rh, rl);                                              \
        out[3 * i + 1] = combine(gh, gl);                                          \
        out[3 * i + 2] = combine(bh, bl);                                          \
    }

#define DEFINE_HROW3(K)                                                               \
    HOT_CLONES static void hrow3_##K(const int16_t *restrict plane, int plen, const int *off,    \
                          int count, const int16_t *restrict kh,                      \
                          const int16_t *restrict kl, uint8_t *restrict out) {        \
        HROW3_BODY(K)                                                                 \
    }
DEFINE_HROW3(8)
DEFINE_HROW3(16)
DEFINE_HROW3(24)
DEFINE_HROW3(32)
DEFINE_HROW3(40)
DEFINE_HROW3(48)
DEFINE_HROW3(56)
DEFINE_HROW3(64)
DEFINE_HROW3(72)
DEFINE_HROW3(80)

HOT_CLONES static void hrow3_any(const int16_t *restrict plane, int plen, const int *off, int count,
                      const int16_t *restrict kh, const int16_t *restrict kl,
                      uint8_t *restrict out, int kpad) {
    HROW3_BODY(kpad)
}

typedef void (*hrow3_fn)(const int16_t *, int, const int *, int, const int16_t *,
                         const int16_t *, uint8_t *);
static const hrow3_fn HROW3[] = {NULL, hrow3_8, hrow3_16, hrow3_24, hrow3_32, hrow3_40,
                                 hrow3_48, hrow3_56, hrow3_64, hrow3_72, hrow3_80};

/* Any channel count: one pair of dot products per channel. */
HOT_CLONES static void hrow_any(const int16_t *plane, int plen, const int *off, int count,
                     const int16_t *kh, const int16_t *kl, uint8_t *out, int kpad, int ch) {
    for (int i = 0; i < count; i++) {
        const int16_t *h = kh + (size_t)i * kpad, *l = kl + (size_t)i * kpad;
        for (int c = 0; c < ch; c++) {
            const int16_t *p = plane + (size_t)c * plen + off[i];
            out[(size_t)i * ch + c] = combine(dot16(p, h, kpad), dot16(p, l, kpad));
        }
    }
}

/* One output row of the vertical pass: n source rows from r0 (stride bytes
 * apart), weights k, row_len bytes; acc is (row_len,) int32 scratch. */
HOT_CLONES static void vrow_portable(const uint8_t *r0, size_t stride, int n, const int32_t *k,
                          size_t row_len, int32_t *restrict acc, uint8_t *restrict o) {
    for (size_t j = 0; j < row_len; j++) acc[j] = 1 << (PREC_BITS - 1);
    for (int t = 0; t < n; t++) {
        const uint8_t *restrict r = r0 + (size_t)t * stride;
        int32_t kt = k[t];
        for (size_t j = 0; j < row_len; j++) acc[j] += (int32_t)r[j] * kt;
    }
    for (size_t j = 0; j < row_len; j++) o[j] = clip8(acc[j]);
}

/* ------------------------------------------------------------------------
 * Run-time kernel choice. x86-64 builds also carry AVX2 kernels (compiled
 * with a target attribute: no -mavx2 at build time, so the binary still runs
 * on any x86-64) and take them when the CPU has AVX2, in a second flavour
 * when it also has AVX512-VNNI (Ice Lake and later Xeons, Zen 4), whose
 * vpdpwssd fuses each pmaddwd + paddd pair. Every kernel does the same
 * integer arithmetic, so the choice never changes a pixel; the tests run
 * each one against the others (set_kernels).
 * ------------------------------------------------------------------------ */
enum { KERNELS_PORTABLE = 0, KERNELS_AVX2 = 1, KERNELS_AVX512VNNI = 2 };
static const char *const KERNEL_NAMES[] = {"portable", "avx2", "avx512vnni"};
#define KERNELS_LAST KERNELS_AVX512VNNI

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__) && \
    !defined(VLMEDGE_PORTABLE_ONLY)
#define HAVE_AVX2_KERNELS 1
#include <immintrin.h>
#define AVX2_FN __attribute__((target("avx2")))
#define AVX2_INLINE static inline __attribute__((target("avx2"), always_inline))
#else
#define HAVE_AVX2_KERNELS 0
#endif

static int best_kernels(void) {
#if HAVE_AVX2_KERNELS
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("avx2")) return KERNELS_PORTABLE;
    if (__builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl"))
        return KERNELS_AVX512VNNI;
    return KERNELS_AVX2;
#endif
    return KERNELS_PORTABLE;
}

static int kernels = KERNELS_PORTABLE;  /* set at import; set_kernels() for tests */

/* Scratch of the horizontal pass (allocated with the GIL held). */
typedef struct {
    /* portable kernels */
    int16_t *kh, *kl;   /* (count, kpad) split weights */
    int *off;           /* (count,) first tap's index in the planes */
    int16_t *plane;     /* (ch, plen) one deinterleaved source row, zero tail */
    int plen, c0, ncols;
    /* AVX2 kernels (simd: 0 portable, else a KERNELS_ value) */
    int simd;
    int16_t *kv;        /* (count, ngmax, 2, 16): per group of 4 taps, two ymm
                         * vectors of int16 pairs, hi then lo halves; lane 0
                         * holds taps (0, 1), lane 1 taps (2, 3), each pair 4x */
    int *ng;            /* (count,) groups of 4 taps (taps past n weigh 0) */
    size_t *boff;       /* (count,) first tap's byte offset in a row */
    int ngmax;
    size_t max_read;    /* bytes past a row's start that a kernel loads */
    uint8_t *pad;       /* (max_read,) copy of a row whose loads would pass the buffer end */
} hscratch;

/* Scratch of the vertical pass: weights as int32 words of two int16 weights
 * (taps 2p, 2p + 1), hi and lo halves, for the AVX2 kernel. */
typedef struct {
    int simd;            /* 0 portable, else a KERNELS_ value */
    int32_t *kh2, *kl2;  /* (count, npmax) */
    int npmax;
} vscratch;

#if HAVE_AVX2_KERNELS
/* pshufb masks, per channel count: the bytes of 4 pixels (one 16-byte load,
 * copied to both lanes) -> int16 pairs (pixel t, pixel t + 1) per channel:
 * lane 0 taps 0 and 1, lane 1 taps 2 and 3; R G B (A or 0). -1 gives 0. */
static const int8_t HMASK3[32] = {0, -1, 3, -1, 1, -1, 4, -1, 2, -1, 5, -1, -1, -1, -1, -1,
                                  6, -1, 9, -1, 7, -1, 10, -1, 8, -1, 11, -1, -1, -1, -1, -1};
static const int8_t HMASK4[32] = {0, -1, 4, -1, 1, -1, 5, -1, 2, -1, 6, -1, 3, -1, 7, -1,
                                  8, -1, 12, -1, 9, -1, 13, -1, 10, -1, 14, -1, 11, -1, 15, -1};

/* Rows -> `count` output pixels each, for 1 or 4 rows at a time. Per group
 * of 4 taps and row: one broadcast load, one shuffle, and the products with
 * the hi and lo weights (two vpdpwssd, or two pmaddwd folded as hl_madd),
 * with no horizontal sums until the pixel is done: lanes hold channels, as
 * in Pillow-SIMD, but with Pillow's full 22-bit weights. A block of 4 rows
 * shares each weight load (2-row blocks measured slower). The accumulators
 * are named variables (not arrays) so that they stay in registers. */
#define HTAP_AVX2(r)                                                                   \
    do {                                                                               \
        __m128i px = _mm_loadu_si128((const __m128i *)(rows[r] + at));                 \
        __m256i p = _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(px), mask);        \
        if (vnni) {                                                                    \
            h##r = macc(h##r, p, kh, 1);                                               \
            l##r = macc(l##r, p, kl, 1);                                               \
        } else {                                                                       \
            l##r = _mm256_add_epi32(l##r, hl_madd(p, kh, kl));                         \
        }                                                                              \
    } while (0)

/* AVX2 without VNNI: one group's (hi << 11) + lo products, folded at once so
 * that each row needs one accumulator (the h ones stay 0): one shift more per
 * group than two accumulators, but half the registers (gcc spilled the eight
 * of a 4-row block) and nothing left to combine; measured 5-7% faster. */
AVX2_INLINE __m256i hl_madd(__m256i p, __m256i kh, __m256i kl) {
    return _mm256_add_epi32(_mm256_slli_epi32(_mm256_madd_epi16(p, kh), 11),
                            _mm256_madd_epi16(p, kl));
}

/* acc + (a . b in int16 pairs), wrapping: pmaddwd then paddd, or with vnni
 * AVX512-VNNI's vpdpwssd, the same sum in one instruction. Inline asm (its
 * EVEX form, ymm0-15) because the kernels are compiled for plain AVX2 and
 * only the vnni wrappers, chosen when the CPU has AVX512-VNNI and AVX512-VL,
 * reach it. */
AVX2_INLINE __m256i macc(__m256i acc, __m256i a, __m256i b, const int vnni) {
    if (vnni) {
        __asm__("vpdpwssd %2, %1, %0" : "+x"(acc) : "x"(a), "x"(b));
        return acc;
    }
    return _mm256_add_epi32(acc, _mm256_madd_epi16(a, b));
}

/* (hi, lo) accumulators of one row -> its pixel at o, clipped as clip8. The
 * lo accumulator started at lo_init() so it already holds the rounding 2^21.
 * Stores 4 bytes: for RGB the 4th is the next pixel's R, written after, so
 * the last pixel of an RGB row goes through hstore_last_avx2 instead. */
AVX2_INLINE uint32_t hpixel_avx2(__m256i h, __m256i l) {
    __m256i t = _mm256_add_epi32(_mm256_slli_epi32(h, 11), l);
    __m128i v = _mm_add_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256(t, 1));
    v = _mm_srai_epi32(v, PREC_BITS);
    v = _mm_packus_epi16(_mm_packs_epi32(v, v), v);  /* saturate to 0..255 */
    return (uint32_t)_mm_cvtsi128_si32(v);
}

AVX2_INLINE void hstore_avx2(__m256i h, __m256i l, uint8_t *o) {
    uint32_t px4 = hpixel_avx2(h, l);
    memcpy(o, &px4, 4);
}

AVX2_INLINE void hstore_last_avx2(__m256i h, __m256i l, uint8_t *o, int ch) {
    uint32_t px4 = hpixel_avx2(h, l);
    memcpy(o, &px4, (size_t)ch);
}

/* Initial lo accumulator: 2^21 (clip8's rounding) in lane 0's four words, so
 * that the two lanes' sum carries it once. */
AVX2_INLINE __m256i lo_init(void) {
    return _mm256_setr_epi32(1 << (PREC_BITS - 1), 1 << (PREC_BITS - 1), 1 << (PREC_BITS - 1),
                             1 << (PREC_BITS - 1), 0, 0, 0, 0);
}

AVX2_INLINE __m256i hmask_avx2(int ch) {
    return _mm256_loadu_si256((const __m256i *)(ch == 3 ? HMASK3 : HMASK4));
}

AVX2_INLINE void hrows4_avx2(const uint8_t *const *rows, uint8_t *const *outs, int ch,
                             int count, const hscratch *s, const int vnni,
                             const uint8_t *const *next) {
    const __m256i mask = hmask_avx2(ch);
    /* Prefetch the next block's rows, a few cache lines per output pixel, so
     * that a frame fresh from the camera (not in cache) streams in while this
     * block computes instead of stalling the next one (measured 10% on cold
     * 1080p frames). The last lines may lie past a buffer's end: harmless, a
     * prefetch never faults. */
    const size_t lines = s->max_read / 64 + 2;
    size_t fetched = 0;
    for (int i = 0; i < count; i++) {
        for (size_t due = (size_t)(i + 1) * lines / count; fetched < due; fetched++)
            for (int r = 0; r < 4; r++)
                _mm_prefetch((const char *)next[r] + fetched * 64, _MM_HINT_T0);
        __m256i h0 = _mm256_setzero_si256(), h1 = h0, h2 = h0, h3 = h0;
        __m256i l0 = lo_init(), l1 = l0, l2 = l0, l3 = l0;
        const __m256i *kv = (const __m256i *)(s->kv + (size_t)i * s->ngmax * 32);
        size_t at = s->boff[i], step = 4 * (size_t)ch;
        for (int g = 0; g < s->ng[i]; g++, at += step) {
            __m256i kh = _mm256_loadu_si256(kv + 2 * g), kl = _mm256_loadu_si256(kv + 2 * g + 1);
            HTAP_AVX2(0); HTAP_AVX2(1); HTAP_AVX2(2); HTAP_AVX2(3);
        }
        size_t at_out = (size_t)i * ch;
        if (ch == 4 || i + 1 < count) {
            hstore_avx2(h0, l0, outs[0] + at_out);
            hstore_avx2(h1, l1, outs[1] + at_out);
            hstore_avx2(h2, l2, outs[2] + at_out);
            hstore_avx2(h3, l3, outs[3] + at_out);
        } else {
            hstore_last_avx2(h0, l0, outs[0] + at_out, ch);
            hstore_last_avx2(h1, l1, outs[1] + at_out, ch);
            hstore_last_avx2(h2, l2, outs[2] + at_out, ch);
            hstore_last_avx2(h3, l3, outs[3] + at_out, ch);
        }
    }
}

AVX2_INLINE void hrows1_avx2(const uint8_t *const *rows, uint8_t *const *outs, int ch,
                             int count, const hscratch *s, const int vnni) {
    const __m256i mask = hmask_avx2(ch);
    for (int i = 0; i < count; i++) {
        __m256i h0 = _mm256_setzero_si256(), l0 = lo_init();
        const __m256i *kv = (const __m256i *)(s->kv + (size_t)i * s->ngmax * 32);
        size_t at = s->boff[i], step = 4 * (size_t)ch;
        for (int g = 0; g < s->ng[i]; g++, at += step) {
            __m256i kh = _mm256_loadu_si256(kv + 2 * g), kl = _mm256_loadu_si256(kv + 2 * g + 1);
            HTAP_AVX2(0);
        }
        if (ch == 4 || i + 1 < count)
            hstore_avx2(h0, l0, outs[0] + (size_t)i * ch);
        else
            hstore_last_avx2(h0, l0, outs[0] + (size_t)i * ch, ch);
    }
}

/* Horizontal pass: rows of src (src: column c0 of row 0; src_len bytes may
 * be read from src) -> sink rows. Blocks of 4 rows share each weight load;
 * a row whose 16-byte loads would pass the buffer's end is copied first. */
AVX2_INLINE void hpass_simd(const uint8_t *src, size_t stride, size_t src_len, int nrows,
                            int ch, int count, const hscratch *s, const row_sink *out,
                            const int vnni) {
    int y = 0;
    for (; y + 4 <= nrows && (size_t)(y + 3) * stride + s->max_read <= src_len; y += 4) {
        const uint8_t *rows[4], *next[4];
        uint8_t *outs[4];
        for (int r = 0; r < 4; r++) {
            rows[r] = src + (size_t)(y + r) * stride;
            next[r] = y + 4 + r < nrows ? rows[r] + 4 * stride : rows[r];
            outs[r] = sink_row(out, y + r, r);
        }
        hrows4_avx2(rows, outs, ch, count, s, vnni, next);
        for (int r = 0; r < 4; r++) sink_done(out, y + r, r);
    }
    for (; y < nrows; y++) {
        const uint8_t *row = src + (size_t)y * stride;
        size_t at = (size_t)y * stride;
        if (at + s->max_read > src_len) {
            memcpy(s->pad, row, src_len - at < s->max_read ? src_len - at : s->max_read);
            row = s->pad;
        }
        uint8_t *o = sink_row(out, y, 0);
        hrows1_avx2(&row, &o, ch, count, s, vnni);
        sink_done(out, y, 0);
    }
}

/* Two taps of the vertical pass on 32 bytes: bytes a (row t) and b (row
 * t + 1) interleave into int16 pairs, and pmaddwd with the pair (k_t, k_t+1)
 * adds both taps per lane (Pillow-SIMD's vertical scheme, exact weights).
 * h[q], l[q] accumulate bytes (4q..4q+3, 16+4q..16+4q+3): in-lane unpacks. */
AVX2_INLINE void vtaps_avx2(__m256i a, __m256i b, __m256i kh, __m256i kl, __m256i *h,
                            __m256i *l, const int vnni) {
    const __m256i zero = _mm256_setzero_si256();
    __m256i lo = _mm256_unpacklo_epi8(a, b), hi = _mm256_unpackhi_epi8(a, b);
    __m256i x[4] = {_mm256_unpacklo_epi8(lo, zero), _mm256_unpackhi_epi8(lo, zero),
                    _mm256_unpacklo_epi8(hi, zero), _mm256_unpackhi_epi8(hi, zero)};
    for (int q = 0; q < 4; q++) {
        if (vnni) {
            h[q] = macc(h[q], x[q], kh, 1);
            l[q] = macc(l[q], x[q], kl, 1);
        } else {  /* one accumulator, as in the horizontal kernel (h stays 0) */
            l[q] = _mm256_add_epi32(l[q], hl_madd(x[q], kh, kl));
        }
    }
}

/* One output row of the vertical pass, 32 bytes at a time. Needs
 * row_len >= 32; the last block overlaps the one before it (same bytes). */
AVX2_INLINE void vrow_simd(const uint8_t *r0, size_t stride, int n, const int32_t *kh2,
                           const int32_t *kl2, size_t row_len, uint8_t *o, const int vnni) {
    for (size_t j0 = 0; j0 < row_len; j0 += 32) {
        size_t j = j0 + 32 <= row_len ? j0 : row_len - 32;
        __m256i h[4], l[4];
        for (int q = 0; q < 4; q++) {  /* l starts at clip8's rounding 2^21 */
            h[q] = _mm256_setzero_si256();
            l[q] = _mm256_set1_epi32(1 << (PREC_BITS - 1));
        }
        const uint8_t *r = r0 + j;
        int p = 0;
        for (; 2 * p + 1 < n; p++, r += 2 * stride)
            vtaps_avx2(_mm256_loadu_si256((const __m256i *)r),
                       _mm256_loadu_si256((const __m256i *)(r + stride)),
                       _mm256_set1_epi32(kh2[p]), _mm256_set1_epi32(kl2[p]), h, l, vnni);
        if (n & 1)  /* the odd last tap pairs with a zero row (its weight is 0) */
            vtaps_avx2(_mm256_loadu_si256((const __m256i *)r), _mm256_setzero_si256(),
                       _mm256_set1_epi32(kh2[p]), _mm256_set1_epi32(kl2[p]), h, l, vnni);
        for (int q = 0; q < 4; q++)
            h[q] = _mm256_srai_epi32(_mm256_add_epi32(_mm256_slli_epi32(h[q], 11), l[q]),
                                     PREC_BITS);
        /* in-lane unpacks above and in-lane packs here undo each other */
        __m256i v = _mm256_packus_epi16(_mm256_packs_epi32(h[0], h[1]),
                                        _mm256_packs_epi32(h[2], h[3]));
        _mm256_storeu_si256((__m256i *)(o + j), v);
    }
}

/* normalize_row for RGB, 8 pixels at a time: pshufb picks each channel's
 * bytes from two overlapping 16-byte loads and vpgatherdd looks them up in
 * the same tables as the scalar loop (so the same floats). */
AVX2_FN static void normalize_row_avx2(const uint8_t *row, int width, int ch, const float *lut,
                                       float *r, float *g, float *b) {
    int x = 0;
    if (ch == 3) {
        /* pixel bytes 0..15 (lo) and 8..23 (hi) -> 8 indices per channel */
#define M_ _mm_setr_epi8
        const __m128i lo_r = M_(0, 3, 6, 9, 12, 15, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
        const __m128i hi_r = M_(-1, -1, -1, -1, -1, -1, 10, 13, -1, -1, -1, -1, -1, -1, -1, -1);
        const __m128i lo_g = M_(1, 4, 7, 10, 13, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
        const __m128i hi_g = M_(-1, -1, -1, -1, -1, 8, 11, 14, -1, -1, -1, -1, -1, -1, -1, -1);
        const __m128i lo_b = M_(2, 5, 8, 11, 14, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
        const __m128i hi_b = M_(-1, -1, -1, -1, -1, 9, 12, 15, -1, -1, -1, -1, -1, -1, -1, -1);
#undef M_
        for (; x + 8 <= width; x += 8) {
            const uint8_t *p = row + 3 * (size_t)x;
            __m128i lo = _mm_loadu_si128((const __m128i *)p);
            __m128i hi = _mm_loadu_si128((const __m128i *)(p + 8));
            __m256i ir = _mm256_cvtepu8_epi32(_mm_or_si128(_mm_shuffle_epi8(lo, lo_r),
                                                           _mm_shuffle_epi8(hi, hi_r)));
            __m256i ig = _mm256_cvtepu8_epi32(_mm_or_si128(_mm_shuffle_epi8(lo, lo_g),
                                                           _mm_shuffle_epi8(hi, hi_g)));
            __m256i ib = _mm256_cvtepu8_epi32(_mm_or_si128(_mm_shuffle_epi8(lo, lo_b),
                                                           _mm_shuffle_epi8(hi, hi_b)));
            _mm256_storeu_ps(r + x, _mm256_i32gather_ps(lut, ir, 4));
            _mm256_storeu_ps(g + x, _mm256_i32gather_ps(lut + 256, ig, 4));
            _mm256_storeu_ps(b + x, _mm256_i32gather_ps(lut + 512, ib, 4));
        }
    }
    normalize_row(row + (size_t)x * ch, width - x, ch, lut, r + x, g + x, b + x);
}

/* The two flavours of each pass (see macc). */
AVX2_FN static void hpass_avx2(const uint8_t *src, size_t stride, size_t src_len, int nrows,
                               int ch, int count, const hscratch *s, const row_sink *out) {
    hpass_simd(src, stride, src_len, nrows, ch, count, s, out, 0);
}

AVX2_FN static void hpass_vnni(const uint8_t *src, size_t stride, size_t src_len, int nrows,
                               int ch, int count, const hscratch *s, const row_sink *out) {
    hpass_simd(src, stride, src_len, nrows, ch, count, s, out, 1);
}

AVX2_FN static void vrow_avx2(const uint8_t *r0, size_t stride, int n, const int32_t *kh2,
                              const int32_t *kl2, size_t row_len, uint8_t *o) {
    vrow_simd(r0, stride, n, kh2, kl2, row_len, o, 0);
}

AVX2_FN static void vrow_vnni(const uint8_t *r0, size_t stride, int n, const int32_t *kh2,
                              const int32_t *kl2, size_t row_len, uint8_t *o) {
    vrow_simd(r0, stride, n, kh2, kl2, row_len, o, 1);
}
#endif

/* Horizontal pass: nrows rows of `src` (row stride `stride` bytes; src points
 * at source column c0 of its row 0, and src_len bytes from there are readable)
 * -> the `count` output columns, into the sink's rows. */
static void hpass(const uint8_t *src, size_t stride, size_t src_len, int nrows, int ch,
                  const axis_coeffs *cx, int count, const hscratch *s, const row_sink *out) {
#if HAVE_AVX2_KERNELS
    if (s->simd) {
        (s->simd == KERNELS_AVX512VNNI ? hpass_vnni : hpass_avx2)(src, stride, src_len, nrows,
                                                                  ch, count, s, out);
        return;
    }
#else
    (void)src_len;
#endif
    int kpad = cx->kpad;
    hrow3_fn fast = (ch == 3 && kpad / KPAD <= 10) ? HROW3[kpad / KPAD] : NULL;
    for (int y = 0; y < nrows; y++) {
        const uint8_t *row = src + (size_t)y * stride;
        uint8_t *o = sink_row(out, y, 0);
        deinterleave(row, s->ncols, ch, s->plane, s->plen);
        if (fast)
            fast(s->plane, s->plen, s->off, count, s->kh, s->kl, o);
        else if (ch == 3)
            hrow3_any(s->plane, s->plen, s->off, count, s->kh, s->kl, o, kpad);
        else
            hrow_any(s->plane, s->plen, s->off, count, s->kh, s->kl, o, kpad, ch);
        sink_done(out, y, 0);
    }
}

/* Vertical pass: the cy output rows from rows of `src` (row stride `stride`
 * bytes; its row 0 is source row y_base), row_len bytes each, into the sink.
 * acc is (row_len,) int32 scratch. */
static void vpass(const uint8_t *src, size_t stride, int y_base, size_t row_len,
                  const axis_coeffs *cy, int count, const vscratch *v, int32_t *acc,
                  const row_sink *out) {
    for (int i = 0; i < count; i++) {
        const uint8_t *r0 = src + (size_t)(cy->xmin[i] - y_base) * stride;
        uint8_t *o = sink_row(out, i, 0);
#if HAVE_AVX2_KERNELS
        if (v->simd && row_len >= 32)
            (v->simd == KERNELS_AVX512VNNI ? vrow_vnni : vrow_avx2)(
                r0, stride, cy->n[i], v->kh2 + (size_t)i * v->npmax,
                v->kl2 + (size_t)i * v->npmax, row_len, o);
        else
#endif
            vrow_portable(r0, stride, cy->n[i], cy->k + (size_t)i * cy->kpad, row_len, acc, o);
        sink_done(out, i, 0);
    }
}

typedef struct {
    int h, w, ch, out_h, out_w, filter, y0, x0, rh, rw, order;
} resize_args;

/* Pass order. Pillow <= 12 always resamples horizontally first. Pillow 13
 * runs the vertical pass first when the height shrinks by more than twice as
 * many pixels as the width (python-pillow/Pillow#9549; the rule was measured
 * against Pillow 13.0's output, the boundary included). The order changes the
 * intermediate rounding, so it must match. */
enum { ORDER_PILLOW13 = 0, ORDER_HORIZONTAL_FIRST = 1 };

static int vertical_first(const resize_args *a) {
    if (a->order == ORDER_HORIZONTAL_FIRST) return 0;
    return a->out_h < a->h && (a->h - a->out_h) > 2 * (a->w - a->out_w);
}

/* Scratch for one resize call, allocated with the GIL held (so a failure can
 * raise MemoryError) and freed after. */
typedef struct {
    axis_coeffs cx, cy;
    int need_h, need_v, vfirst;
    int y_first, y_last;   /* source rows read */
    int c1;                /* end of the source columns read */
    hscratch hs;
    vscratch vs;
    uint8_t *tmp;          /* intermediate of the first pass */
    size_t tmp_len;        /* its readable bytes (padding included) */
    int32_t *acc;
} resize_plan;

static void plan_free(resize_plan *p) {
    coeffs_free(&p->cx);
    coeffs_free(&p->cy);
    free(p->hs.kh); free(p->hs.kl); free(p->hs.off); free(p->hs.plane);
    free(p->hs.kv); free(p->hs.ng); free(p->hs.boff); free(p->hs.pad);
    free(p->vs.kh2); free(p->vs.kl2);
    free(p->tmp); free(p->acc);
    memset(p, 0, sizeof(*p));
}

/* The portable horizontal kernels' weights and row planes. */
static int hscratch_portable(hscratch *s, const axis_coeffs *cx, int count, int ch) {
    s->plen = s->ncols + cx->kpad;   /* taps past n read zeros */
    size_t kn = (size_t)count * cx->kpad;
    s->kh = malloc(kn * sizeof(int16_t));
    s->kl = malloc(kn * sizeof(int16_t));
    s->off = malloc((size_t)count * sizeof(int));
    s->plane = calloc((size_t)ch * s->plen, sizeof(int16_t));
    if (!s->kh || !s->kl || !s->off || !s->plane) return -1;
    split_weights(cx->k, kn, s->kh, s->kl);
    for (int i = 0; i < count; i++) s->off[i] = cx->xmin[i] - s->c0;
    return 0;
}

/* The AVX2 horizontal kernel's weights (see hscratch.kv). */
static int hscratch_simd(hscratch *s, const axis_coeffs *cx, int count, int ch) {
    int nmax = 1;
    for (int i = 0; i < count; i++) nmax = cx->n[i] > nmax ? cx->n[i] : nmax;
    s->ngmax = (nmax + 3) / 4;
    s->kv = calloc((size_t)count * s->ngmax * 32, sizeof(int16_t));
    s->ng = malloc((size_t)count * sizeof(int));
    s->boff = malloc((size_t)count * sizeof(size_t));
    if (!s->kv || !s->ng || !s->boff) return -1;
    s->max_read = 16;
    for (int i = 0; i < count; i++) {
        s->ng[i] = (cx->n[i] + 3) / 4;
        s->boff[i] = (size_t)(cx->xmin[i] - s->c0) * ch;
        size_t last = s->boff[i] + (size_t)(s->ng[i] - 1) * 4 * ch + 16;
        s->max_read = last > s->max_read ? last : s->max_read;
        for (int t = 0; t < cx->n[i]; t++) {
            int16_t hi, lo;
            split_weight(cx->k[(size_t)i * cx->kpad + t], &hi, &lo);
            int16_t *v = s->kv + ((size_t)i * s->ngmax + t / 4) * 32 + (t % 4 / 2) * 8 + t % 2;
            for (int rep = 0; rep < 4; rep++) {
                v[2 * rep] = hi;
                v[16 + 2 * rep] = lo;
            }
        }
    }
    s->pad = calloc(s->max_read, 1);
    return s->pad ? 0 : -1;
}

/* The AVX2 vertical kernel's weights (see vscratch). */
static int vscratch_simd(vscratch *v, const axis_coeffs *cy, int count) {
    v->npmax = (cy->kpad + 1) / 2;
    v->kh2 = calloc((size_t)count * v->npmax, sizeof(int32_t));
    v->kl2 = calloc((size_t)count * v->npmax, sizeof(int32_t));
    if (!v->kh2 || !v->kl2) return -1;
    for (int i = 0; i < count; i++) {
        for (int t = 0; t < cy->n[i]; t++) {
            int16_t hi, lo;
            split_weight(cy->k[(size_t)i * cy->kpad + t], &hi, &lo);
            int shift = 16 * (t % 2);  /* tap 2p in the low half, 2p + 1 in the high */
            v->kh2[(size_t)i * v->npmax + t / 2] |= (int32_t)((uint32_t)(uint16_t)hi << shift);
            v->kl2[(size_t)i * v->npmax + t / 2] |= (int32_t)((uint32_t)(uint16_t)lo << shift);
        }
    }
    return 0;
}

static int plan_build(resize_plan *p, const resize_args *a) {
    memset(p, 0, sizeof(*p));
    p->need_h = a->out_w != a->w;
    p->need_v = a->out_h != a->h;
    p->vfirst = p->need_h && p->need_v && vertical_first(a);
    p->y_first = a->y0;
    p->y_last = a->y0 + a->rh;
    p->hs.c0 = a->x0;
    p->c1 = a->x0 + a->rw;
    if (p->need_v) {
        if (coeffs_build(&p->cy, a->h, a->out_h, a->y0, a->rh, a->filter) < 0) goto oom;
        p->y_first = p->cy.xmin[0];
        p->y_last = p->cy.xmin[a->rh - 1] + p->cy.n[a->rh - 1];
        p->vs.simd = sums_fit_int32(&p->cy, a->rh) ? kernels : KERNELS_PORTABLE;
        if (p->vs.simd && vscratch_simd(&p->vs, &p->cy, a->rh) < 0) goto oom;
    }
    if (p->need_h) {
        axis_coeffs *cx = &p->cx;
        if (coeffs_build(cx, a->w, a->out_w, a->x0, a->rw, a->filter) < 0) goto oom;
        p->hs.c0 = cx->xmin[0];
        p->c1 = cx->xmin[a->rw - 1] + cx->n[a->rw - 1];
        p->hs.ncols = p->c1 - p->hs.c0;
        p->hs.simd = (a->ch == 3 || a->ch == 4) && sums_fit_int32(cx, a->rw) ? kernels
                                                                              : KERNELS_PORTABLE;
        if ((p->hs.simd ? hscratch_simd : hscratch_portable)(&p->hs, cx, a->rw, a->ch) < 0)
            goto oom;
    }
    /* intermediate: (source rows, region width) horizontal first, or
     * (region height, source columns) vertical first, then room for the
     * horizontal kernel's loads past its last row */
    size_t tmp_len = p->vfirst ? (size_t)a->rh * (p->c1 - p->hs.c0) * a->ch
                               : (size_t)(p->y_last - p->y_first) * a->rw * a->ch;
    p->tmp_len = tmp_len + p->hs.max_read;
    size_t acc_len = (size_t)(p->vfirst ? p->c1 - p->hs.c0 : a->rw) * a->ch;
    p->tmp = malloc(p->tmp_len ? p->tmp_len : 1);
    p->acc = malloc(acc_len * sizeof(int32_t));
    if (!p->tmp || !p->acc) goto oom;
    return 0;
oom:
    plan_free(p);
    PyErr_NoMemory();
    return -1;
}

/* The whole resize of a region into the sink; no GIL needed. src_len: the
 * bytes of src (h * w * ch). */
static void resize_run(const resize_plan *p, const resize_args *a, const uint8_t *src,
                       const row_sink *out) {
    size_t stride = (size_t)a->w * a->ch, row_len = (size_t)a->rw * a->ch;
    size_t src_len = (size_t)a->h * stride;
    size_t c0_at = (size_t)p->hs.c0 * a->ch;
    if (p->vfirst) {  /* region rows from the source columns the horizontal pass reads */
        size_t cols_len = (size_t)(p->c1 - p->hs.c0) * a->ch;
        row_sink mid = {.u8 = p->tmp, .stride = cols_len};
        vpass(src + c0_at, stride, 0, cols_len, &p->cy, a->rh, &p->vs, p->acc, &mid);
        hpass(p->tmp, cols_len, p->tmp_len, a->rh, a->ch, &p->cx, a->rw, &p->hs, out);
        return;
    }
    size_t rows_at = (size_t)p->y_first * stride;
    int nrows = p->y_last - p->y_first;
    if (!p->need_v) {  /* a single horizontal pass (or a copy) straight into the sink */
        if (p->need_h) {
            hpass(src + rows_at + c0_at, stride, src_len - rows_at - c0_at, nrows, a->ch,
                  &p->cx, a->rw, &p->hs, out);
        } else {
            for (int y = 0; y < nrows; y++) {
                memcpy(sink_row(out, y, 0), src + rows_at + y * stride + (size_t)a->x0 * a->ch,
                       row_len);
                sink_done(out, y, 0);
            }
        }
        return;
    }
    if (p->need_h) {
        row_sink mid = {.u8 = p->tmp, .stride = row_len};
        hpass(src + rows_at + c0_at, stride, src_len - rows_at - c0_at, nrows, a->ch, &p->cx,
              a->rw, &p->hs, &mid);
        vpass(p->tmp, row_len, p->y_first, row_len, &p->cy, a->rh, &p->vs, p->acc, out);
    } else {  /* width unchanged: vertical pass over the region's columns only */
        vpass(src + (size_t)a->x0 * a->ch, stride, 0, row_len, &p->cy, a->rh, &p->vs, p->acc,
              out);
    }
}

/* Argument checks shared by resize, resize_region and resize_normalize;
 * sets ValueError. dst_bytes: what dst must hold. */
static int resize_check(const resize_args *a, const Py_buffer *src, const Py_buffer *dst,
                        Py_ssize_t dst_bytes, const char *fn) {
    if (a->h <= 0 || a->w <= 0 || a->out_h <= 0 || a->out_w <= 0) {
        PyErr_Format(PyExc_ValueError, "%s: sizes must be positive; got %dx%d -> %dx%d (HxW)",
                     fn, a->h, a->w, a->out_h, a->out_w);
        return -1;
    }
    if (a->ch < 1 || a->ch > 4) {
        PyErr_Format(PyExc_ValueError, "%s: channels must be 1..4; got %d", fn, a->ch);
        return -1;
    }
    if (filter_support(a->filter) == 0.0) {
        PyErr_Format(PyExc_ValueError,
                     "%s: filter must be a Pillow resampling filter 1..5 (LANCZOS, BILINEAR, "
                     "BICUBIC, BOX, HAMMING); got %d", fn, a->filter);
        return -1;
    }
    if (a->order != ORDER_PILLOW13 && a->order != ORDER_HORIZONTAL_FIRST) {
        PyErr_Format(PyExc_ValueError,
                     "%s: order must be 0 (Pillow 13: vertical pass first when the height "
                     "shrinks much more) or 1 (horizontal first, Pillow <= 12); got %d",
                     fn, a->order);
        return -1;
    }
    if (a->y0 < 0 || a->x0 < 0 || a->rh <= 0 || a->rw <= 0 ||
        a->y0 + a->rh > a->out_h || a->x0 + a->rw > a->out_w) {
        PyErr_Format(PyExc_ValueError,
                     "%s: region rows %d..%d, cols %d..%d must lie inside the %dx%d output",
                     fn, a->y0, a->y0 + a->rh, a->x0, a->x0 + a->rw, a->out_h, a->out_w);
        return -1;
    }
    Py_ssize_t need_src = (Py_ssize_t)a->h * a->w * a->ch;
    if (src->len < need_src) {
        PyErr_Format(PyExc_ValueError,
                     "%s: src too short: expected %zd bytes for %dx%dx%d uint8, got %zd",
                     fn, need_src, a->h, a->w, a->ch, src->len);
        return -1;
    }
    if (dst->len < dst_bytes) {
        PyErr_Format(PyExc_ValueError, "%s: dst too short: expected %zd bytes, got %zd",
                     fn, dst_bytes, dst->len);
        return -1;
    }
    if (src->itemsize != 1) {
        PyErr_Format(PyExc_ValueError, "%s: src must be uint8; got itemsize %zd",
                     fn, src->itemsize);
        return -1;
    }
    return 0;
}

/* Buffers, checks, plan, then the resize without the GIL. `out` is the sink
 * with its destination pointer left NULL: it is dst's buffer (u8) or planes. */
static PyObject *resize_common(resize_args *a, PyObject *src_obj, PyObject *dst_obj,
                               row_sink *out, Py_ssize_t dst_bytes, Py_ssize_t dst_itemsize,
                               const char *fn) {
    Py_buffer src, dst;
    char name[64];
    snprintf(name, sizeof(name), "%s: src", fn);
    if (get_buffer(src_obj, &src, 0, name) < 0) return NULL;
    snprintf(name, sizeof(name), "%s: dst", fn);
    if (get_buffer(dst_obj, &dst, 1, name) < 0) {
        PyBuffer_Release(&src);
        return NULL;
    }
    resize_plan plan;
    PyObject *ret = NULL;
    if (resize_check(a, &src, &dst, dst_bytes, fn) < 0) goto done;
    if (dst.itemsize != dst_itemsize) {
        PyErr_Format(PyExc_ValueError, "%s: dst must be %s; got itemsize %zd", fn,
                     dst_itemsize == 1 ? "uint8" : "float32", dst.itemsize);
        goto done;
    }
    if (plan_build(&plan, a) < 0) goto done;
    uint8_t *rowbuf = NULL;
    if (out->lut) {  /* normalizing: a few rows of uint8 scratch, then planes */
        out->planes = (float *)dst.buf;
        rowbuf = malloc((size_t)SINK_SLOTS * out->stride);
        if (!rowbuf) {
            plan_free(&plan);
            PyErr_NoMemory();
            goto done;
        }
        out->rowbuf = rowbuf;
        out->normalize = normalize_row;
#if HAVE_AVX2_KERNELS
        if (kernels >= KERNELS_AVX2) out->normalize = normalize_row_avx2;
#endif
    } else {
        out->u8 = (uint8_t *)dst.buf;
    }
    Py_BEGIN_ALLOW_THREADS
    resize_run(&plan, a, (const uint8_t *)src.buf, out);
    Py_END_ALLOW_THREADS
    free(rowbuf);
    plan_free(&plan);
    ret = Py_None;
    Py_INCREF(ret);
done:
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    return ret;
}

static PyObject *resize_u8(resize_args *a, PyObject *src_obj, PyObject *dst_obj,
                           const char *fn) {
    row_sink out = {.stride = (size_t)a->rw * (a->ch > 0 ? a->ch : 1)};
    return resize_common(a, src_obj, dst_obj, &out, (Py_ssize_t)a->rh * a->rw * a->ch, 1, fn);
}

/* resize(src, h, w, channels, dst, out_h, out_w, filter[, order])
 * src: uint8 (h, w, channels) interleaved; dst: uint8 (out_h, out_w, channels).
 * order: 0 = Pillow 13's pass order (default), 1 = horizontal first (Pillow <= 12). */
static PyObject *resize(PyObject *self, PyObject *args) {
    PyObject *src_obj, *dst_obj;
    resize_args a;
    a.order = ORDER_PILLOW13;
    if (!PyArg_ParseTuple(args, "OiiiOiii|i", &src_obj, &a.h, &a.w, &a.ch, &dst_obj,
                          &a.out_h, &a.out_w, &a.filter, &a.order))
        return NULL;
    a.y0 = a.x0 = 0;
    a.rh = a.out_h;
    a.rw = a.out_w;
    return resize_u8(&a, src_obj, dst_obj, "resize");
}

/* resize_region(src, h, w, channels, dst, out_h, out_w, filter, y0, x0, rh, rw[, order])
 * Rows [y0, y0+rh) and columns [x0, x0+rw) of the out_h x out_w resize, into
 * dst uint8 (rh, rw, channels); equal to resize() then slicing, without
 * computing the pixels outside (the fused resize + center crop). */
static PyObject *resize_region(PyObject *self, PyObject *args) {
    PyObject *src_obj, *dst_obj;
    resize_args a;
    a.order = ORDER_PILLOW13;
    if (!PyArg_ParseTuple(args, "OiiiOiiiiiii|i", &src_obj, &a.h, &a.w, &a.ch, &dst_obj,
                          &a.out_h, &a.out_w, &a.filter, &a.y0, &a.x0, &a.rh, &a.rw, &a.order))
        return NULL;
    return resize_u8(&a, src_obj, dst_obj, "resize_region");
}

/* resize_normalize(src, h, w, channels, dst, out_h, out_w, filter, y0, x0, rh, rw,
 *                  scale, mean, std[, order])
 * resize_region then normalize_to_chw in one pass: src uint8 (h, w, 3|4)
 * RGB[A] (alpha ignored) -> dst float32 (3, rh, rw), equal bit for bit to the
 * two calls, with no uint8 image in between (rows go through L1 scratch). */
static PyObject *resize_normalize(PyObject *self, PyObject *args) {
    PyObject *src_obj, *dst_obj;
    resize_args a;
    double scale;
    float mean[3], std[3], lut[3 * 256];
    a.order = ORDER_PILLOW13;
    if (!PyArg_ParseTuple(args, "OiiiOiiiiiiid(fff)(fff)|i", &src_obj, &a.h, &a.w, &a.ch,
                          &dst_obj, &a.out_h, &a.out_w, &a.filter, &a.y0, &a.x0, &a.rh, &a.rw,
                          &scale, &mean[0], &mean[1], &mean[2], &std[0], &std[1], &std[2],
                          &a.order))
        return NULL;
    if (a.ch != 3 && a.ch != 4) {
        PyErr_Format(PyExc_ValueError,
                     "resize_normalize: channels must be 3 (RGB) or 4 (RGBA); got %d", a.ch);
        return NULL;
    }
    for (int c = 0; c < 3; c++) {
        if (!(std[c] != 0.0f)) {
            PyErr_SetString(PyExc_ValueError, "resize_normalize: std must be non-zero");
            return NULL;
        }
    }
    build_lut(lut, scale, mean, std);
    row_sink out = {.stride = (size_t)(a.rw > 0 ? a.rw : 1) * a.ch, .lut = lut,
                    .width = a.rw, .ch = a.ch, .npix = (size_t)(a.rh > 0 ? a.rh : 0) * a.rw};
    Py_ssize_t need = (Py_ssize_t)3 * a.rh * a.rw * (Py_ssize_t)sizeof(float);
    return resize_common(&a, src_obj, dst_obj, &out, need, sizeof(float), "resize_normalize");
}

/* kernels() -> name of the kernels in use; set_kernels(name) -> previous name.
 * For tests and benchmarks: every kernel gives the same pixels. Not thread
 * safe against a resize running at the same time (a plan reads it once). */
static PyObject *get_kernels(PyObject *self, PyObject *noargs) {
    return PyUnicode_FromString(KERNEL_NAMES[kernels]);
}

static PyObject *available_kernels(PyObject *self, PyObject *noargs) {
    int best = best_kernels();
    PyObject *names = PyTuple_New(best + 1);
    for (int i = 0; names && i <= best; i++)
        PyTuple_SET_ITEM(names, i, PyUnicode_FromString(KERNEL_NAMES[i]));
    return names;
}

static PyObject *set_kernels(PyObject *self, PyObject *args) {
    const char *name;
    if (!PyArg_ParseTuple(args, "s", &name)) return NULL;
    int want = -1;
    for (int i = 0; i <= KERNELS_LAST; i++)
        if (strcmp(name, KERNEL_NAMES[i]) == 0) want = i;
    if (want < 0 || want > best_kernels()) {
        PyErr_Format(PyExc_ValueError,
                     "set_kernels: expected one of this CPU's kernels (see available_kernels()); "
                     "got %R", PyTuple_GET_ITEM(args, 0));
        return NULL;
    }
    PyObject *prev = PyUnicode_FromString(KERNEL_NAMES[kernels]);
    kernels = want;
    return prev;
}

static PyMethodDef methods[] = {
    {"normalize_to_chw", normalize_to_chw, METH_VARARGS,
     "normalize_to_chw(src, height, width, channels, dst, scale, mean, std)\n\n"
     "uint8 HWC (RGB/RGBA) -> float32 CHW: (float32(v*scale) - mean[c]) / std[c], into dst."},
    {"resize", resize, METH_VARARGS,
     "resize(src, h, w, channels, dst, out_h, out_w, filter, order=0)\n\n"
     "uint8 (h, w, channels) -> uint8 (out_h, out_w, channels) into dst, equal to Pillow's\n"
     "Image.resize((out_w, out_h), filter) for filter 1..5 (LANCZOS, BILINEAR, BICUBIC, BOX,\n"
     "HAMMING). Channels are resized independently (no alpha premultiplication).\n"
     "order: 0 = Pillow 13's pass order, 1 = always horizontal first (Pillow <= 12)."},
    {"resize_region", resize_region, METH_VARARGS,
     "resize_region(src, h, w, channels, dst, out_h, out_w, filter, y0, x0, rh, rw, order=0)\n\n"
     "Rows y0..y0+rh, columns x0..x0+rw of resize(...), into dst uint8 (rh, rw, channels)."},
    {"resize_normalize", resize_normalize, METH_VARARGS,
     "resize_normalize(src, h, w, channels, dst, out_h, out_w, filter, y0, x0, rh, rw,\n"
     "                 scale, mean, std, order=0)\n\n"
     "resize_region(...) then normalize_to_chw(...) fused: uint8 (h, w, 3|4) -> float32\n"
     "(3, rh, rw) into dst, bit for bit equal to the two calls."},
    {"kernels", get_kernels, METH_NOARGS,
     "kernels() -> 'avx512vnni' | 'avx2' | 'portable': the resize kernels in use (the\n"
     "best this CPU has, unless set_kernels chose others)."},
    {"available_kernels", available_kernels, METH_NOARGS,
     "available_kernels() -> the kernel names this CPU can run, slowest first."},
    {"set_kernels", set_kernels, METH_VARARGS,
     "set_kernels(name) -> previous name. Tests and benchmarks only: all give equal pixels."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_cpreprocess",
    "C image preprocessing for the vlmedge runtime (see preprocess_ref.py for the reference).",
    -1, methods,
};

PyMODINIT_FUNC PyInit__cpreprocess(void) {
    kernels = best_kernels();
    return PyModule_Create(&module);
}
