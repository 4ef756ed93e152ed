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
 * Computes dst[c, y, x] = (src[y, x, c] * scale - mean[c]) / std[c], exactly
 * as HF's rescale then normalize (in float32; multiplication by 1/std is NOT
 * used, so results equal numpy's division bit for bit).
 */
static PyObject *normalize_to_chw(PyObject *self, PyObject *args) {
    PyObject *src_obj, *dst_obj;
    Py_ssize_t h, w, ch;
    float scale, mean[3], std[3];
    if (!PyArg_ParseTuple(args, "OnnnOf(fff)(fff)", &src_obj, &h, &w, &ch, &dst_obj, &scale,
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
            for (int v = 0; v < 256; v++) lut[v] = ((float)v * scale - mean[c]) / std[c];
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

static PyMethodDef methods[] = {
    {"normalize_to_chw", normalize_to_chw, METH_VARARGS,
     "normalize_to_chw(src, height, width, channels, dst, scale, mean, std)\n\n"
     "uint8 HWC (RGB/RGBA) -> float32 CHW: (v*scale - mean[c]) / std[c], into dst."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_cpreprocess",
    "C image preprocessing for the vlmedge runtime (see preprocess_ref.py for the reference).",
    -1, methods,
};

PyMODINIT_FUNC PyInit__cpreprocess(void) { return PyModule_Create(&module); }
