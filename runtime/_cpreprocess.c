/*
 * vlmedge.runtime._cpreprocess: per-image work of the HF image processors, in C.
 *
 * Every function reads a caller's buffer and writes into a caller-provided
 * buffer (no allocation per frame), checks sizes before touching memory, and
 * releases the GIL while it computes, so camera threads run in parallel.
 * The numpy reference of each function is in preprocess_ref.py; the tests
 * hold the two to each other.
 *
 * Portable C99, no intrinsics: it builds with gcc on x86-64 and aarch64, and
 * -O3 vectorises the inner loops on both.
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
        for (int c = 0; c < 3; c++) {
            float lut[256];
            for (int v = 0; v < 256; v++) lut[v] = ((float)((double)v * scale) - mean[c]) / std[c];
            float *plane = d + (Py_ssize_t)c * npix;
            const uint8_t *sc = s + c;
            for (Py_ssize_t i = 0; i < npix; i++) plane[i] = lut[sc[i * ch]];
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
static void split_weights(const int32_t *k, size_t len, int16_t *kh, int16_t *kl) {
    for (size_t j = 0; j < len; j++) {
        int32_t hi = k[j] >= 0 ? (k[j] >> 11) : -((-k[j] + 2047) >> 11);  /* floor(k / 2048) */
        kh[j] = (int16_t)hi;
        kl[j] = (int16_t)(k[j] - hi * 2048);
    }
}

static inline uint8_t combine(int32_t sum_hi, int32_t sum_lo) {
    return clip8((int64_t)sum_hi * 2048 + sum_lo + (1 << (PREC_BITS - 1)));
}

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

/* Scratch of the horizontal pass (allocated with the GIL held). */
typedef struct {
    int16_t *kh, *kl;   /* (count, kpad) split weights */
    int *off;           /* (count,) first tap's index in the planes */
    int16_t *plane;     /* (ch, plen) one deinterleaved source row, zero tail */
    int plen, c0, ncols;
} hscratch;

/* Horizontal pass: nrows rows of `src` (row stride `stride` bytes; its byte 0
 * is source column x_origin) -> the cx output columns, into out (nrows, count,
 * ch) uint8. Only source columns [c0, c0 + ncols) are read. */
static void hpass(const uint8_t *src, size_t stride, int x_origin, int nrows, int ch,
                  const axis_coeffs *cx, int count, const hscratch *s, uint8_t *out) {
    int kpad = cx->kpad;
    hrow3_fn fast = (ch == 3 && kpad / KPAD <= 10) ? HROW3[kpad / KPAD] : NULL;
    for (int y = 0; y < nrows; y++) {
        const uint8_t *row = src + (size_t)y * stride + (size_t)(s->c0 - x_origin) * ch;
        uint8_t *o = out + (size_t)y * count * ch;
        deinterleave(row, s->ncols, ch, s->plane, s->plen);
        if (fast)
            fast(s->plane, s->plen, s->off, count, s->kh, s->kl, o);
        else if (ch == 3)
            hrow3_any(s->plane, s->plen, s->off, count, s->kh, s->kl, o, kpad);
        else
            hrow_any(s->plane, s->plen, s->off, count, s->kh, s->kl, o, kpad, ch);
    }
}

/* Vertical pass: the cy output rows from rows of `src` (row stride `stride`
 * bytes; its row 0 is source row y_base), row_len bytes each, into dst
 * (count, row_len). acc is (row_len,) int32 scratch. */
HOT_CLONES static void vpass(const uint8_t *src, size_t stride, int y_base, size_t row_len,
                  const axis_coeffs *cy, int count, int32_t *restrict acc, uint8_t *dst) {
    for (int i = 0; i < count; i++) {
        const int32_t *k = cy->k + (size_t)i * cy->kpad;
        for (size_t j = 0; j < row_len; j++) acc[j] = 1 << (PREC_BITS - 1);
        for (int t = 0; t < cy->n[i]; t++) {
            const uint8_t *restrict r = src + (size_t)(cy->xmin[i] + t - y_base) * stride;
            int32_t kt = k[t];
            for (size_t j = 0; j < row_len; j++) acc[j] += (int32_t)r[j] * kt;
        }
        uint8_t *restrict o = dst + (size_t)i * row_len;
        for (size_t j = 0; j < row_len; j++) o[j] = clip8(acc[j]);
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
    uint8_t *tmp;          /* intermediate of the first pass */
    int32_t *acc;
} resize_plan;

static void plan_free(resize_plan *p) {
    coeffs_free(&p->cx);
    coeffs_free(&p->cy);
    free(p->hs.kh); free(p->hs.kl); free(p->hs.off); free(p->hs.plane);
    free(p->tmp); free(p->acc);
    memset(p, 0, sizeof(*p));
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
    }
    if (p->need_h) {
        axis_coeffs *cx = &p->cx;
        if (coeffs_build(cx, a->w, a->out_w, a->x0, a->rw, a->filter) < 0) goto oom;
        p->hs.c0 = cx->xmin[0];
        p->c1 = cx->xmin[a->rw - 1] + cx->n[a->rw - 1];
        p->hs.ncols = p->c1 - p->hs.c0;
        p->hs.plen = p->hs.ncols + cx->kpad;   /* taps past n read zeros */
        size_t kn = (size_t)a->rw * cx->kpad;
        p->hs.kh = malloc(kn * sizeof(int16_t));
        p->hs.kl = malloc(kn * sizeof(int16_t));
        p->hs.off = malloc((size_t)a->rw * sizeof(int));
        p->hs.plane = calloc((size_t)a->ch * p->hs.plen, sizeof(int16_t));
        if (!p->hs.kh || !p->hs.kl || !p->hs.off || !p->hs.plane) goto oom;
        split_weights(cx->k, kn, p->hs.kh, p->hs.kl);
        for (int i = 0; i < a->rw; i++) p->hs.off[i] = cx->xmin[i] - p->hs.c0;
    }
    /* intermediate: (source rows, region width) horizontal first, or
     * (region height, source columns) vertical first */
    size_t tmp_len = p->vfirst ? (size_t)a->rh * (p->c1 - p->hs.c0) * a->ch
                               : (size_t)(p->y_last - p->y_first) * a->rw * a->ch;
    size_t acc_len = (size_t)(p->vfirst ? p->c1 - p->hs.c0 : a->rw) * a->ch;
    p->tmp = malloc(tmp_len ? tmp_len : 1);
    p->acc = malloc(acc_len * sizeof(int32_t));
    if (!p->tmp || !p->acc) goto oom;
    return 0;
oom:
    plan_free(p);
    PyErr_NoMemory();
    return -1;
}

/* The whole resize of a region; no GIL needed. */
static void resize_run(const resize_plan *p, const resize_args *a, const uint8_t *src,
                       uint8_t *dst) {
    size_t stride = (size_t)a->w * a->ch, row_len = (size_t)a->rw * a->ch;
    if (p->vfirst) {  /* region rows from the source columns the horizontal pass reads */
        size_t cols_len = (size_t)(p->c1 - p->hs.c0) * a->ch;
        vpass(src + (size_t)p->hs.c0 * a->ch, stride, 0, cols_len, &p->cy, a->rh, p->acc,
              p->tmp);
        hpass(p->tmp, cols_len, p->hs.c0, a->rh, a->ch, &p->cx, a->rw, &p->hs, dst);
        return;
    }
    const uint8_t *rows = src + (size_t)p->y_first * stride;
    int nrows = p->y_last - p->y_first;
    if (!p->need_v) {  /* a single horizontal pass (or a copy) straight into dst */
        if (p->need_h) {
            hpass(rows, stride, 0, nrows, a->ch, &p->cx, a->rw, &p->hs, dst);
        } else {
            for (int y = 0; y < nrows; y++)
                memcpy(dst + (size_t)y * row_len, rows + y * stride + (size_t)a->x0 * a->ch,
                       row_len);
        }
        return;
    }
    if (p->need_h) {
        hpass(rows, stride, 0, nrows, a->ch, &p->cx, a->rw, &p->hs, p->tmp);
        vpass(p->tmp, row_len, p->y_first, row_len, &p->cy, a->rh, p->acc, dst);
    } else {  /* width unchanged: vertical pass over the region's columns only */
        vpass(src + (size_t)a->x0 * a->ch, stride, 0, row_len, &p->cy, a->rh, p->acc, dst);
    }
}

/* Argument checks shared by resize and resize_region; sets ValueError. */
static int resize_check(const resize_args *a, const Py_buffer *src, const Py_buffer *dst,
                        const char *fn) {
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
    Py_ssize_t need_dst = (Py_ssize_t)a->rh * a->rw * a->ch;
    if (src->len < need_src) {
        PyErr_Format(PyExc_ValueError,
                     "%s: src too short: expected %zd bytes for %dx%dx%d uint8, got %zd",
                     fn, need_src, a->h, a->w, a->ch, src->len);
        return -1;
    }
    if (dst->len < need_dst) {
        PyErr_Format(PyExc_ValueError,
                     "%s: dst too short: expected %zd bytes for %dx%dx%d uint8, got %zd",
                     fn, need_dst, a->rh, a->rw, a->ch, dst->len);
        return -1;
    }
    if (src->itemsize != 1 || dst->itemsize != 1) {
        PyErr_Format(PyExc_ValueError, "%s: src and dst must be uint8; got itemsizes %zd, %zd",
                     fn, src->itemsize, dst->itemsize);
        return -1;
    }
    return 0;
}

static PyObject *resize_common(resize_args *a, PyObject *src_obj, PyObject *dst_obj,
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
    if (resize_check(a, &src, &dst, fn) == 0 && plan_build(&plan, a) == 0) {
        Py_BEGIN_ALLOW_THREADS
        resize_run(&plan, a, (const uint8_t *)src.buf, (uint8_t *)dst.buf);
        Py_END_ALLOW_THREADS
        plan_free(&plan);
        ret = Py_None;
        Py_INCREF(ret);
    }
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    return ret;
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
    return resize_common(&a, src_obj, dst_obj, "resize");
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
    return resize_common(&a, src_obj, dst_obj, "resize_region");
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
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_cpreprocess",
    "C image preprocessing for the vlmedge runtime (see preprocess_ref.py for the reference).",
    -1, methods,
};

PyMODINIT_FUNC PyInit__cpreprocess(void) { return PyModule_Create(&module); }
