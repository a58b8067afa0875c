/* The isolation forest's walk and explanation credits in C (detector/core/model.py's
 * PackedForest is the reference: its numpy code is the fallback and what the tests compare).
 *
 * Why: numpy walks the forest level by level for a whole batch, ~8 array operations a level
 * whatever the batch (14 levels), and gathers a (trees, rows, features) block for the credits:
 * ~11% of a replay's CPU. One row's path through one tree is ~10 dependent steps; here each
 * (tree, row) is walked to its leaf, tree by tree (a tree's nodes stay in cache) and 8 rows side
 * by side (independent chains of loads overlap), and the credits are summed tree by tree.
 *
 * Exactness: the walk takes the same comparisons on the same float32 values and thresholds
 * (``x > thr``, NaN going where ``nan_right`` says), so it ends on the same leaf; the credits
 * are added in float64 tree after tree from the first tree's value, the order of numpy's
 * reduction along the trees' axis, so the sums are bit-identical (tests/unit/test_model.py).
 *
 * Arrays come in through the buffer protocol (no numpy headers at build time); their lengths
 * are checked, and every index read from them is checked against the array it indexes, so a
 * malformed model raises instead of reading out of bounds.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

typedef long long i64;

#define GROUP 8 /* rows walked side by side */

static int get(PyObject *o, Py_buffer *b, Py_ssize_t itemsize, int writable, const char *what)
{
    if (PyObject_GetBuffer(o, b, PyBUF_C_CONTIGUOUS | (writable ? PyBUF_WRITABLE : 0)) < 0)
        return -1;
    if (b->itemsize != itemsize) {
        PyErr_Format(PyExc_TypeError, "%s: expected items of %zd bytes, got %zd", what, itemsize,
                     b->itemsize);
        PyBuffer_Release(b);
        return -1;
    }
    return 0;
}

#define NITEMS(b) ((b).len / (b).itemsize)

typedef struct {
    int arg;              /* which argument */
    Py_ssize_t itemsize;  /* its items' size in bytes */
    int writable;
    const char *name;
} Spec;

static void release_all(Py_buffer *b, int n)
{
    while (n-- > 0)
        PyBuffer_Release(&b[n]);
}

/* The buffers of the arguments ``spec`` names, into b[0 .. n-1]; on an error none is held. */
static int get_all(PyObject *const *args, const Spec *spec, Py_buffer *b, int n)
{
    for (int i = 0; i < n; i++) {
        if (get(args[spec[i].arg], &b[i], spec[i].itemsize, spec[i].writable, spec[i].name) < 0) {
            release_all(b, i);
            return -1;
        }
    }
    return 0;
}

/* walk(code int64[N], thr float32[N], nan_right bool[N], to_global int64[N], n_trees,
 *      feat_bits, max_depth, X float32[rows * n_features], n_features, out int64[n_trees * rows],
 *      leaf_value float64[N], depths float64[rows])
 *
 * PackedForest.leaves: for tree t and row r, out[t * rows + r] = the global index of the leaf
 * row r reaches from the tree's root (walk index t); depths[r] = the sum over the trees, in
 * order, of leaf_value at those leaves (numpy's cumsum along the trees: the same additions). */
static PyObject *walk(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 12) {
        PyErr_SetString(PyExc_TypeError, "walk takes 12 arguments");
        return NULL;
    }
    i64 n_trees = PyLong_AsLongLong(args[4]), bits = PyLong_AsLongLong(args[5]);
    i64 max_depth = PyLong_AsLongLong(args[6]), nf = PyLong_AsLongLong(args[8]);
    if (PyErr_Occurred())
        return NULL;
    if (bits < 1 || bits > 32 || nf < 1 || n_trees < 0 || max_depth < 0) {
        PyErr_SetString(PyExc_ValueError, "walk: bad forest shape");
        return NULL;
    }
    enum { CODE, THR, NAN_RIGHT, TO_GLOBAL, X, OUT, LVAL, DEP, NB };
    static const Spec spec[NB] = {
        {0, 8, 0, "code"}, {1, 4, 0, "thr"}, {2, 1, 0, "nan_right"}, {3, 8, 0, "to_global"},
        {7, 4, 0, "X"}, {9, 8, 1, "out"}, {10, 8, 0, "leaf_value"}, {11, 8, 1, "depths"}};
    Py_buffer b[NB];
    if (get_all(args, spec, b, NB) < 0)
        return NULL;
    PyObject *result = NULL;
    Py_ssize_t n = NITEMS(b[CODE]);
    Py_ssize_t rows = NITEMS(b[X]) / nf;
    if (NITEMS(b[THR]) != n || NITEMS(b[NAN_RIGHT]) != n || NITEMS(b[TO_GLOBAL]) != n ||
        n_trees > n || NITEMS(b[X]) != rows * nf || NITEMS(b[OUT]) != n_trees * rows ||
        NITEMS(b[LVAL]) != n || NITEMS(b[DEP]) != rows) {
        PyErr_SetString(PyExc_ValueError, "walk: array lengths disagree");
        goto done;
    }
    {
        const int64_t *cd = b[CODE].buf, *tg = b[TO_GLOBAL].buf;
        const float *th = b[THR].buf, *xs = b[X].buf;
        const unsigned char *nr = b[NAN_RIGHT].buf;
        const double *lv = b[LVAL].buf;
        int64_t *o = b[OUT].buf;
        double *dp = b[DEP].buf;
        const int64_t mask = ((int64_t)1 << bits) - 1;
        int bad = 0;
        Py_BEGIN_ALLOW_THREADS
        /* Tree by tree (its nodes stay in cache), GROUP rows at a time: their paths are
         * independent chains of loads, which the processor overlaps. */
        for (i64 t = 0; t < n_trees && !bad; t++) {
            for (Py_ssize_t r0 = 0; r0 < rows && !bad; r0 += GROUP) {
                int g = rows - r0 < GROUP ? (int)(rows - r0) : GROUP;
                int64_t node[GROUP];
                const float *row[GROUP];
                for (int i = 0; i < g; i++) {
                    node[i] = t;
                    row[i] = xs + (r0 + i) * nf;
                }
                /* max_depth steps for every path, without a branch on the data: a leaf is its
                 * own child and never goes right (threshold +inf, NaN left), so a path that
                 * reached its leaf stays there, as in the numpy walk. */
                for (i64 d = 0; d < max_depth; d++) {
                    for (int i = 0; i < g; i++) {
                        int64_t at = node[i], c = cd[at], child = c >> bits, f = c & mask;
                        if (child < 0 || child >= n || (child != at && child + 1 >= n) || f >= nf)
                            bad = 1;
                        float v = row[i][bad ? 0 : f];
                        node[i] = bad ? at : child + ((v > th[at]) | ((v != v) & nr[at]));
                    }
                    if (bad)
                        break;
                }
                for (int i = 0; i < g && !bad; i++) {
                    int64_t gl = tg[node[i]];
                    if (gl < 0 || gl >= n)
                        bad = 1;
                    else {
                        o[t * rows + r0 + i] = gl;
                        if (t == 0)
                            dp[r0 + i] = lv[gl];
                        else
                            dp[r0 + i] += lv[gl];
                    }
                }
            }
        }
        Py_END_ALLOW_THREADS
        if (bad) {
            PyErr_SetString(PyExc_ValueError, "walk: a node or feature index out of range");
            goto done;
        }
    }
    result = Py_NewRef(Py_None);
done:
    release_all(b, NB);
    return result;
}

/* credits(leaf_slot int64[N], leaf_credit float32[L * n_features], n_features,
 *         leaves int64[n_trees * rows], n_trees, out float64[rows * n_features])
 *
 * PackedForest.contributions before the division by the number of trees: per row, the sum over
 * the trees (in order, in float64, from the first tree's value) of the credits of its leaf. */
static PyObject *credits(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "credits takes 6 arguments");
        return NULL;
    }
    i64 nf = PyLong_AsLongLong(args[2]), n_trees = PyLong_AsLongLong(args[4]);
    if (PyErr_Occurred())
        return NULL;
    if (nf < 1 || n_trees < 1) {
        PyErr_SetString(PyExc_ValueError, "credits: bad forest shape");
        return NULL;
    }
    enum { SLOT, CREDIT, LEAVES, OUT, NB };
    static const Spec spec[NB] = {
        {0, 8, 0, "leaf_slot"}, {1, 4, 0, "leaf_credit"}, {3, 8, 0, "leaves"}, {5, 8, 1, "out"}};
    Py_buffer b[NB];
    if (get_all(args, spec, b, NB) < 0)
        return NULL;
    PyObject *result = NULL;
    Py_ssize_t n = NITEMS(b[SLOT]), n_leaves = NITEMS(b[CREDIT]) / nf;
    Py_ssize_t rows = NITEMS(b[LEAVES]) / n_trees;
    if (NITEMS(b[CREDIT]) != n_leaves * nf || NITEMS(b[LEAVES]) != n_trees * rows ||
        NITEMS(b[OUT]) != rows * nf) {
        PyErr_SetString(PyExc_ValueError, "credits: array lengths disagree");
        goto done;
    }
    {
        const int64_t *sl = b[SLOT].buf, *lv = b[LEAVES].buf;
        const float *cr = b[CREDIT].buf;
        double *o = b[OUT].buf;
        int bad = 0;
        Py_BEGIN_ALLOW_THREADS
        /* Tree by tree (its leaves' credits are adjacent and stay in cache), each row's sums
         * in ``out``: per (row, feature) the same additions in the same order as row by row. */
        for (i64 t = 0; t < n_trees && !bad; t++) {
            const int64_t *lt = lv + t * rows;
            for (Py_ssize_t r = 0; r < rows; r++) {
                int64_t leaf = lt[r];
                if (leaf < 0 || leaf >= n || sl[leaf] < 0 || sl[leaf] >= n_leaves) {
                    bad = 1;
                    break;
                }
                const float *c = cr + sl[leaf] * nf;
                double *acc = o + r * nf;
                if (t == 0) {
                    for (i64 f = 0; f < nf; f++)
                        acc[f] = (double)c[f];
                }
                else {
                    for (i64 f = 0; f < nf; f++)
                        acc[f] += (double)c[f];
                }
            }
        }
        Py_END_ALLOW_THREADS
        if (bad) {
            PyErr_SetString(PyExc_ValueError, "credits: a leaf index out of range");
            goto done;
        }
    }
    result = Py_NewRef(Py_None);
done:
    release_all(b, NB);
    return result;
}

/* rows(X list of lists, n_features, out float32[len(X) * n_features]): numpy's
 * np.ascontiguousarray(np.asarray(X), dtype=np.float32) for a list of equal-length lists of
 * Python floats or ints (each number to a double, then to the nearest float32, as numpy
 * converts); anything else raises TypeError or ValueError (the caller then asks numpy). */
static PyObject *rows(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "rows takes 3 arguments");
        return NULL;
    }
    PyObject *X = args[0];
    i64 nf = PyLong_AsLongLong(args[1]);
    if (nf == -1 && PyErr_Occurred())
        return NULL;
    if (!PyList_Check(X)) {
        PyErr_SetString(PyExc_TypeError, "rows: a list of rows");
        return NULL;
    }
    Py_buffer out;
    if (get(args[2], &out, 4, 1, "out") < 0)
        return NULL;
    Py_ssize_t n = PyList_GET_SIZE(X);
    if (NITEMS(out) != n * nf) {
        PyErr_SetString(PyExc_ValueError, "rows: out has the wrong length");
        goto fail;
    }
    float *o = out.buf;
    for (Py_ssize_t r = 0; r < n; r++) {
        PyObject *row = PyList_GET_ITEM(X, r);
        if (!PyList_Check(row) || PyList_GET_SIZE(row) != nf) {
            PyErr_SetString(PyExc_ValueError, "rows: a row is not a list of n_features numbers");
            goto fail;
        }
        for (i64 f = 0; f < nf; f++) {
            PyObject *v = PyList_GET_ITEM(row, f);
            double d;
            if (PyFloat_CheckExact(v))
                d = PyFloat_AS_DOUBLE(v);
            else if (PyLong_CheckExact(v)) {
                d = PyLong_AsDouble(v);
                if (d == -1.0 && PyErr_Occurred())
                    goto fail;
            }
            else {
                PyErr_SetString(PyExc_TypeError, "rows: a value is not a float or an int");
                goto fail;
            }
            o[r * nf + f] = (float)d;
        }
    }
    PyBuffer_Release(&out);
    Py_RETURN_NONE;
fail:
    PyBuffer_Release(&out);
    return NULL;
}

static PyMethodDef forest_methods[] = {
    {"rows", (PyCFunction)(void (*)(void))rows, METH_FASTCALL,
     "rows(X, n_features, out): a list of rows to float32, as numpy converts it"},
    {"walk", (PyCFunction)(void (*)(void))walk, METH_FASTCALL,
     "walk(code, thr, nan_right, to_global, n_trees, feat_bits, max_depth, X, n_features, out, "
     "leaf_value, depths)"},
    {"credits", (PyCFunction)(void (*)(void))credits, METH_FASTCALL,
     "credits(leaf_slot, leaf_credit, n_features, leaves, n_trees, out)"},
    {NULL},
};

static struct PyModuleDef forest_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "detector.core._forest",
    .m_doc = "The isolation forest's walk and credits in C (core/model.py is the reference).",
    .m_size = -1,
    .m_methods = forest_methods,
};

PyMODINIT_FUNC PyInit__forest(void)
{
    return PyModule_Create(&forest_module);
}
