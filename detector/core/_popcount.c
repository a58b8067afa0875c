/* The population counters' request scopes in C (detector/core/population.py is the reference).
 *
 * Why: counting a request in its scopes (everything, its country, its number blocks) and reading
 * the population signals is ~20-27% of a replay's CPU in Python (the buckets as dicts of lists,
 * running totals and memos to avoid re-summing them, a dozen calls per request). Here each scope
 * keeps its buckets in one sorted C array and every read sums them directly (a few hundred
 * additions), in one call per request. The Python code stays the reference and the fallback:
 * ``PopulationView(native=False)``, or when this module is not built (``population.NATIVE``).
 * tests/unit/test_population_native.py drives both with the same random writes and compares
 * every read; the replay's decisions are byte-identical with either (bench/replay_fingerprint.py).
 *
 * Semantics kept from the reference (core/population.py):
 * - a scope keeps the newest MINUTES_KEPT minute buckets and HOURS_KEPT hour buckets ever written
 *   (bounded by count, never aged against one event's time): a new bucket beyond that evicts the
 *   smallest key, which may be the new one itself;
 * - ``newest`` is the largest bucket key ever written (prune reads the hours');
 * - a block scope ("B<k>:<region>:<prefix>") marks its prefix as touched in the view's
 *   ``blocks[(region, "B<k>")]`` dict with the newest hour it was counted in;
 * - reads are the sums the reference's running totals and memos stand for (its own tests check
 *   those against sums of the buckets), in the same floating-point operations in the same order;
 *   ratios are rounded to 3 places exactly as Python's round(x, 3) (round3).
 *
 * The objects hold no references that can form a cycle (str keys, int values, these scopes), so
 * none of them is tracked by the garbage collector.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <structmember.h>

#define MINUTES_KEPT 136
#define HOURS_KEPT 26
#define BASELINE_BLOCKS 12

typedef long long i64;

typedef struct {
    i64 key, n, f;
} Bucket;

typedef struct {
    Bucket *b;
    int len, cap;
    i64 newest;
} Buckets;

typedef struct {
    PyObject_HEAD
    Buckets mins, hrs;
    PyObject *seen;   /* block scopes: the view's touched-prefix dict of this level and region */
    PyObject *prefix; /* block scopes: this block's prefix */
} ScopeObject;

typedef struct {
    PyObject_HEAD
    PyObject *scopes; /* str -> ScopeObject */
    PyObject *blocks; /* the view's (region, level) -> {prefix: hour} */
} StoreObject;

static PyTypeObject ScopeType;

/* ---- buckets ------------------------------------------------------------------------------ */

static int buckets_add(Buckets *bs, i64 key, i64 n, i64 f, int kept)
{
    int i = bs->len - 1;
    while (i >= 0 && bs->b[i].key > key)
        i--;
    if (i >= 0 && bs->b[i].key == key) {
        bs->b[i].n += n;
        bs->b[i].f += f;
        return 0;
    }
    if (key > bs->newest)
        bs->newest = key;
    if (bs->len == bs->cap) {
        int cap = bs->cap ? bs->cap * 2 : 2;
        if (cap > kept + 1)
            cap = kept + 1;
        Bucket *nb = PyMem_Realloc(bs->b, (size_t)cap * sizeof(Bucket));
        if (nb == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        bs->b = nb;
        bs->cap = cap;
    }
    memmove(&bs->b[i + 2], &bs->b[i + 1], (size_t)(bs->len - i - 1) * sizeof(Bucket));
    bs->b[i + 1].key = key;
    bs->b[i + 1].n = n;
    bs->b[i + 1].f = f;
    bs->len++;
    if (bs->len > kept) { /* evict the oldest (smallest key) */
        memmove(&bs->b[0], &bs->b[1], (size_t)(bs->len - 1) * sizeof(Bucket));
        bs->len--;
    }
    return 0;
}

/* (requests, fresh) of the buckets lo <= key <= hi */
static void buckets_sum(const Buckets *bs, i64 lo, i64 hi, i64 *n, i64 *f)
{
    i64 sn = 0, sf = 0;
    for (int i = bs->len - 1; i >= 0; i--) {
        i64 k = bs->b[i].key;
        if (k > hi)
            continue;
        if (k < lo)
            break;
        sn += bs->b[i].n;
        sf += bs->b[i].f;
    }
    *n = sn;
    *f = sf;
}

/* ---- scope -------------------------------------------------------------------------------- */

static void scope_dealloc(ScopeObject *self)
{
    PyMem_Free(self->mins.b);
    PyMem_Free(self->hrs.b);
    Py_XDECREF(self->seen);
    Py_XDECREF(self->prefix);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *buckets_dict(const Buckets *bs)
{
    PyObject *d = PyDict_New();
    if (d == NULL)
        return NULL;
    for (int i = 0; i < bs->len; i++) {
        PyObject *k = PyLong_FromLongLong(bs->b[i].key);
        PyObject *v = Py_BuildValue("[LL]", bs->b[i].n, bs->b[i].f);
        if (k == NULL || v == NULL || PyDict_SetItem(d, k, v) < 0) {
            Py_XDECREF(k);
            Py_XDECREF(v);
            Py_DECREF(d);
            return NULL;
        }
        Py_DECREF(k);
        Py_DECREF(v);
    }
    return d;
}

static PyObject *scope_get_minutes(ScopeObject *self, void *closure)
{
    return buckets_dict(&self->mins);
}

static PyObject *scope_get_hours(ScopeObject *self, void *closure)
{
    return buckets_dict(&self->hrs);
}

static PyObject *scope_get_newest_minute(ScopeObject *self, void *closure)
{
    return PyLong_FromLongLong(self->mins.newest);
}

static PyObject *scope_get_newest_hour(ScopeObject *self, void *closure)
{
    return PyLong_FromLongLong(self->hrs.newest);
}

static PyGetSetDef scope_getset[] = {
    {"minutes", (getter)scope_get_minutes, NULL, "minute -> [requests, fresh] (a copy)", NULL},
    {"hours", (getter)scope_get_hours, NULL, "hour -> [requests, fresh] (a copy)", NULL},
    {"newest_minute", (getter)scope_get_newest_minute, NULL, NULL, NULL},
    {"newest_hour", (getter)scope_get_newest_hour, NULL, NULL, NULL},
    {NULL},
};

static PyTypeObject ScopeType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "detector.core._popcount.Scope",
    .tp_basicsize = sizeof(ScopeObject),
    .tp_dealloc = (destructor)scope_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "One request scope's minute and hour buckets (read-only views for tests).",
    .tp_getset = scope_getset,
};

/* A new scope for ``key``; a block scope is linked to its touched-prefix dict. */
static ScopeObject *scope_new(StoreObject *store, PyObject *key)
{
    ScopeObject *sc = PyObject_New(ScopeObject, &ScopeType);
    if (sc == NULL)
        return NULL;
    memset(&sc->mins, 0, sizeof(Buckets));
    memset(&sc->hrs, 0, sizeof(Buckets));
    sc->seen = NULL;
    sc->prefix = NULL;
    if (PyUnicode_GET_LENGTH(key) > 0 && PyUnicode_READ_CHAR(key, 0) == 'B') {
        /* level, region, prefix = key.split(":", 2) */
        Py_ssize_t len = PyUnicode_GET_LENGTH(key);
        Py_ssize_t i1 = PyUnicode_FindChar(key, ':', 0, len, 1);
        Py_ssize_t i2 = i1 >= 0 ? PyUnicode_FindChar(key, ':', i1 + 1, len, 1) : -1;
        if (i1 == -2 || i2 == -2) {
            Py_DECREF(sc);
            return NULL;
        }
        if (i1 < 0 || i2 < 0) {
            /* (the key is not quoted: it may hold part of a number) */
            PyErr_SetString(PyExc_ValueError, "not a block scope: expected B<k>:<region>:<prefix>");
            Py_DECREF(sc);
            return NULL;
        }
        PyObject *level = PyUnicode_Substring(key, 0, i1);
        PyObject *region = PyUnicode_Substring(key, i1 + 1, i2);
        PyObject *prefix = PyUnicode_Substring(key, i2 + 1, len);
        PyObject *rl = (level && region) ? PyTuple_Pack(2, region, level) : NULL;
        Py_XDECREF(level);
        Py_XDECREF(region);
        if (rl == NULL || prefix == NULL) {
            Py_XDECREF(rl);
            Py_XDECREF(prefix);
            Py_DECREF(sc);
            return NULL;
        }
        PyObject *seen = PyDict_GetItemWithError(store->blocks, rl); /* borrowed */
        if (seen == NULL) {
            if (PyErr_Occurred() || (seen = PyDict_New()) == NULL ||
                PyDict_SetItem(store->blocks, rl, seen) < 0) {
                Py_XDECREF(seen);
                Py_DECREF(rl);
                Py_DECREF(prefix);
                Py_DECREF(sc);
                return NULL;
            }
        }
        else {
            Py_INCREF(seen);
        }
        Py_DECREF(rl);
        sc->seen = seen;
        sc->prefix = prefix;
    }
    return sc;
}

/* Count n requests (f of them fresh) at ``minute`` in the scope ``key`` (created if new).
 * Returns the scope (a borrowed reference: the store's dict holds it), NULL on an error. */
static ScopeObject *store_add(StoreObject *self, PyObject *key, i64 minute, i64 n, i64 f)
{
    ScopeObject *sc = (ScopeObject *)PyDict_GetItemWithError(self->scopes, key);
    if (sc == NULL) {
        if (PyErr_Occurred())
            return NULL;
        sc = scope_new(self, key);
        if (sc == NULL)
            return NULL;
        if (PyDict_SetItem(self->scopes, key, (PyObject *)sc) < 0) {
            Py_DECREF(sc);
            return NULL;
        }
        Py_DECREF(sc); /* the dict holds it */
    }
    /* hour = minute // 60 (floor) */
    i64 hour = minute >= 0 ? minute / 60 : -((-minute + 59) / 60);
    if (buckets_add(&sc->mins, minute, n, f, MINUTES_KEPT) < 0)
        return NULL;
    if (buckets_add(&sc->hrs, hour, n, f, HOURS_KEPT) < 0)
        return NULL;
    if (sc->seen != NULL) { /* if seen.get(prefix, -1) < hour: seen[prefix] = hour */
        PyObject *was = PyDict_GetItemWithError(sc->seen, sc->prefix);
        if (was == NULL && PyErr_Occurred())
            return NULL;
        int older = 1;
        if (was != NULL) {
            i64 w = PyLong_AsLongLong(was);
            if (w == -1 && PyErr_Occurred())
                return NULL;
            older = w < hour;
        }
        if (older) {
            PyObject *h = PyLong_FromLongLong(hour);
            if (h == NULL || PyDict_SetItem(sc->seen, sc->prefix, h) < 0) {
                Py_XDECREF(h);
                return NULL;
            }
            Py_DECREF(h);
        }
    }
    return sc;
}

/* ---- reads -------------------------------------------------------------------------------- */

typedef struct {
    double enter, exit_, short_min;
} SurgePolicy;

static i64 floordiv60(i64 m)
{
    return m >= 0 ? m / 60 : -((-m + 59) / 60);
}

/* ascending, in place (a dozen or two values: no qsort and its allocation) */
static void sort_i64(i64 *v, int n)
{
    for (int i = 1; i < n; i++) {
        i64 x = v[i];
        int j = i - 1;
        while (j >= 0 && v[j] > x) {
            v[j + 1] = v[j];
            j--;
        }
        v[j + 1] = x;
    }
}

/* Python's round(x, 3), exactly: the double nearest to the decimal x rounded to 3 places (half
 * to even on x's exact binary value). Where x * 1000 is not within 1e-6 of a half integer, the
 * integer k nearest to the exact product is the one nearest to the computed one (its error is
 * below |x * 1000| * 2^-53), and k / 1000.0 is the double nearest to k/1000 (one correctly
 * rounded division of exact operands). Anything else (near a tie, huge, not finite) asks
 * Python's round. Returns a new reference. */
static PyObject *round3(double x)
{
    double y = x * 1000.0;
    if (isfinite(y) && fabs(y) < 1e9) {
        double fl = floor(y), frac = y - fl;
        if (fabs(frac - 0.5) > 1e-6)
            return PyFloat_FromDouble((frac < 0.5 ? fl : fl + 1.0) / 1000.0);
    }
    PyObject *f = PyFloat_FromDouble(x);
    if (f == NULL)
        return NULL;
    PyObject *r = PyObject_CallMethod(f, "__round__", "i", 3);
    Py_DECREF(f);
    return r;
}

/* population._surge: (count over the last 10 min, raw ratio to the baseline, surging) */
static void surge(ScopeObject *sc, i64 m, i64 start, double min_baseline, double factor,
                  const SurgePolicy *p, i64 *c10_out, double *ratio_out, int *surging_out)
{
    if (sc == NULL) {
        *c10_out = 0;
        *ratio_out = 0.0;
        *surging_out = 0;
        return;
    }
    i64 live = 0, c10p = 0, c2p = 0, earlier = 0;
    i64 blocks[BASELINE_BLOCKS + 1];
    memset(blocks, 0, sizeof(blocks));
    int kmax = 0;
    for (int k = 1; k <= BASELINE_BLOCKS; k++) {
        if (m - 10 * k - 9 < start)
            break; /* before the deployment started: unknown, not zero */
        kmax = k;
    }
    const Buckets *bs = &sc->mins;
    for (int i = bs->len - 1; i >= 0; i--) {
        i64 key = bs->b[i].key;
        if (key > m)
            continue;
        i64 d = m - key;
        if (d > 10 * BASELINE_BLOCKS + 9)
            break;
        i64 n = bs->b[i].n;
        if (d == 0)
            live += n;
        else if (d <= 9) {
            c10p += n;
            if (d == 1)
                c2p += n;
        }
        else {
            blocks[d / 10] += n; /* block k: minutes m-10k-9 .. m-10k */
            if (d <= 29)
                earlier += n;
        }
    }
    double base = min_baseline;
    if (kmax > 0) { /* the lower median of the blocks there is history for */
        sort_i64(&blocks[1], kmax);
        double med = (double)blocks[1 + (kmax - 1) / 2];
        if (med > base)
            base = med;
    }
    if (m - start >= 24 * 60) { /* a day of history: its mean, and the same hour yesterday */
        i64 h = floordiv60(m), day = 0, yest = 0, f;
        buckets_sum(&sc->hrs, h - 24, h - 1, &day, &f);
        buckets_sum(&sc->hrs, h - 24, h - 24, &yest, &f);
        double a = (double)day / 144.0, b = (double)yest / 6.0;
        if (a > base)
            base = a;
        if (b > base)
            base = b;
    }
    i64 c10 = c10p + live;
    base = base * factor;
    double ratio = (double)c10 / base;
    *c10_out = c10;
    if (ratio >= p->enter) {
        *ratio_out = ratio;
        *surging_out = 1;
        return;
    }
    i64 c2 = c2p + live;
    double floor2 = p->enter * base / 5.0;
    if (p->short_min > floor2)
        floor2 = p->short_min;
    if ((double)c2 >= floor2) {
        double r2 = 5.0 * (double)c2 / base;
        *ratio_out = r2 > ratio ? r2 : ratio;
        *surging_out = 1;
        return;
    }
    *ratio_out = ratio;
    *surging_out = ratio >= p->exit_ && (double)earlier >= p->enter * base;
}

/* population._day_hour: (requests, fresh) over the 24 h and over the 60 minutes ending at m */
static void day_hour(ScopeObject *sc, i64 m, i64 h, i64 *n24, i64 *f24, i64 *n1h, i64 *f1h)
{
    buckets_sum(&sc->hrs, h - 23, h, n24, f24);
    buckets_sum(&sc->mins, m - 59, m, n1h, f1h);
}

/* ---- the store ---------------------------------------------------------------------------- */

static PyObject *store_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *blocks;
    static char *kwlist[] = {"blocks", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!", kwlist, &PyDict_Type, &blocks))
        return NULL;
    StoreObject *self = (StoreObject *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->scopes = PyDict_New();
    if (self->scopes == NULL) {
        Py_DECREF(self);
        return NULL;
    }
    Py_INCREF(blocks);
    self->blocks = blocks;
    return (PyObject *)self;
}

static void store_dealloc(StoreObject *self)
{
    Py_XDECREF(self->scopes);
    Py_XDECREF(self->blocks);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int as_i64(PyObject *o, i64 *out)
{
    i64 v = PyLong_AsLongLong(o);
    if (v == -1 && PyErr_Occurred())
        return -1;
    *out = v;
    return 0;
}

static int as_double(PyObject *o, double *out)
{
    double v = PyFloat_AsDouble(o);
    if (v == -1.0 && PyErr_Occurred())
        return -1;
    *out = v;
    return 0;
}

/* add(key, minute, n, fresh) */
static PyObject *store_add_py(StoreObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    i64 minute, n, f;
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "add(key, minute, n, fresh)");
        return NULL;
    }
    if (!PyUnicode_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "a scope key is a str");
        return NULL;
    }
    if (as_i64(args[1], &minute) < 0 || as_i64(args[2], &n) < 0 || as_i64(args[3], &f) < 0)
        return NULL;
    if (store_add(self, args[0], minute, n, f) == NULL)
        return NULL;
    Py_RETURN_NONE;
}

static ScopeObject *lookup(StoreObject *self, PyObject *key, int *err)
{
    ScopeObject *sc = (ScopeObject *)PyDict_GetItemWithError(self->scopes, key);
    *err = sc == NULL && PyErr_Occurred();
    return sc;
}

/* surge(key, m, start, min_baseline, factor, enter, exit, short_min)
 *   -> (count 10 min, ratio rounded to 3 places, surging), or None without the scope */
static PyObject *store_surge(StoreObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    i64 m, start, c10;
    double minb, factor, ratio;
    SurgePolicy p;
    int err, on;
    if (nargs != 8) {
        PyErr_SetString(PyExc_TypeError,
                        "surge(key, m, start, min_baseline, factor, enter, exit, short_min)");
        return NULL;
    }
    if (as_i64(args[1], &m) < 0 || as_i64(args[2], &start) < 0 || as_double(args[3], &minb) < 0 ||
        as_double(args[4], &factor) < 0 || as_double(args[5], &p.enter) < 0 ||
        as_double(args[6], &p.exit_) < 0 || as_double(args[7], &p.short_min) < 0)
        return NULL;
    ScopeObject *sc = lookup(self, args[0], &err);
    if (err)
        return NULL;
    if (sc == NULL)
        Py_RETURN_NONE;
    surge(sc, m, start, minb, factor, &p, &c10, &ratio, &on);
    PyObject *r = round3(ratio);
    if (r == NULL)
        return NULL;
    return Py_BuildValue("LNO", c10, r, on ? Py_True : Py_False);
}

/* ---- the PopulationCounts record ----------------------------------------------------------
 *
 * count_read returns a core.population.PopulationCounts (registered once by set_counts_type):
 * its 11 slots filled as its constructor fills them (a frozen slotted dataclass: object.__new__,
 * then each slot's value stored through the slot's member descriptor; here straight at the
 * descriptor's offset), without a call into Python per request. */
#define N_COUNTS 11
static PyTypeObject *counts_type = NULL;
static Py_ssize_t counts_offset[N_COUNTS];

/* set_counts_type(cls, names): ``names`` = the 11 field names in order, each a slot of cls */
static PyObject *set_counts_type(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 || !PyType_Check(args[0]) || !PyTuple_Check(args[1]) ||
        PyTuple_GET_SIZE(args[1]) != N_COUNTS) {
        PyErr_SetString(PyExc_TypeError, "set_counts_type(cls, the 11 field names)");
        return NULL;
    }
    PyTypeObject *cls = (PyTypeObject *)args[0];
    Py_ssize_t offsets[N_COUNTS];
    for (int i = 0; i < N_COUNTS; i++) {
        PyObject *d = PyObject_GetAttr((PyObject *)cls, PyTuple_GET_ITEM(args[1], i));
        if (d == NULL)
            return NULL;
        if (!Py_IS_TYPE(d, &PyMemberDescr_Type) ||
            ((PyMemberDescrObject *)d)->d_member->type != T_OBJECT_EX ||
            ((PyMemberDescrObject *)d)->d_member->flags != 0) {
            Py_DECREF(d);
            PyErr_Format(PyExc_TypeError, "%R is not a writable object slot of %R",
                         PyTuple_GET_ITEM(args[1], i), cls);
            return NULL;
        }
        offsets[i] = ((PyMemberDescrObject *)d)->d_member->offset;
        Py_DECREF(d);
    }
    Py_INCREF(cls);
    Py_XSETREF(counts_type, cls);
    memcpy(counts_offset, offsets, sizeof(offsets));
    Py_RETURN_NONE;
}

/* A new counts record holding the 11 values (references stolen, all non-NULL); NULL on error
 * (the values are released). */
static PyObject *new_counts(PyObject **values)
{
    PyObject *obj = counts_type != NULL ? counts_type->tp_alloc(counts_type, 0) : NULL;
    if (obj == NULL) {
        if (counts_type == NULL)
            PyErr_SetString(PyExc_RuntimeError, "set_counts_type was not called");
        for (int i = 0; i < N_COUNTS; i++)
            Py_DECREF(values[i]);
        return NULL;
    }
    for (int i = 0; i < N_COUNTS; i++)
        *(PyObject **)((char *)obj + counts_offset[i]) = values[i];
    return obj;
}

/* count_read(keys, mask, m, h, fresh, start, country_key, g_factor, c_factor, params)
 *
 * Count one request (``fresh`` 1 or 0) at minute m in each scope keys[i] whose bit i is set in
 * ``mask``, then read population.read's signals for ``keys`` (scopes() order; each key looked up
 * once). ``params``: the policy's (global min baseline, country min baseline, surge enter, surge
 * exit, surge short min, prefix floor 24 h, prefix floor 1 h, concentration factor, child share,
 * fresh share). Returns a PopulationCounts (``country_key`` None, no region: the global fields
 * only, the others at their defaults), the ratios rounded as population.read rounds them. */
#define MAX_KEYS 16
#define N_PARAMS 10

static PyObject *store_count_read(StoreObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    i64 mask, m, h, fresh, start;
    double g_factor, c_factor, pr[N_PARAMS];
    int err;
    if (nargs != 10) {
        PyErr_SetString(PyExc_TypeError, "count_read takes 10 arguments");
        return NULL;
    }
    PyObject *keys = args[0], *country_key = args[6], *params = args[9];
    if (!PyTuple_Check(keys) || PyTuple_GET_SIZE(keys) > MAX_KEYS) {
        PyErr_SetString(PyExc_TypeError, "keys: a tuple of at most 16 scope keys");
        return NULL;
    }
    if (!PyTuple_Check(params) || PyTuple_GET_SIZE(params) != N_PARAMS) {
        PyErr_SetString(PyExc_TypeError, "params: a tuple of 10 numbers");
        return NULL;
    }
    if (as_i64(args[1], &mask) < 0 || as_i64(args[2], &m) < 0 || as_i64(args[3], &h) < 0 ||
        as_i64(args[4], &fresh) < 0 || as_i64(args[5], &start) < 0 ||
        as_double(args[7], &g_factor) < 0 || as_double(args[8], &c_factor) < 0)
        return NULL;
    for (int i = 0; i < N_PARAMS; i++)
        if (as_double(PyTuple_GET_ITEM(params, i), &pr[i]) < 0)
            return NULL;
    const double g_min = pr[0], c_min = pr[1], floor24 = pr[5], floor1h = pr[6];
    const double conc_factor = pr[7], child_share = pr[8], fresh_share = pr[9];
    SurgePolicy p = {pr[2], pr[3], pr[4]};
    Py_ssize_t nk = PyTuple_GET_SIZE(keys);
    ScopeObject *found[MAX_KEYS];
    for (Py_ssize_t i = 0; i < nk; i++) {
        PyObject *key = PyTuple_GET_ITEM(keys, i);
        if (!PyUnicode_Check(key)) {
            PyErr_SetString(PyExc_TypeError, "a scope key is a str");
            return NULL;
        }
        if (mask >> i & 1) {
            if ((found[i] = store_add(self, key, m, 1, fresh)) == NULL)
                return NULL;
        }
        else {
            found[i] = lookup(self, key, &err);
            if (err)
                return NULL;
        }
    }
    static PyObject *global_key = NULL;
    if (global_key == NULL && (global_key = PyUnicode_InternFromString("*")) == NULL)
        return NULL;
    i64 g10, c10;
    double gf, cf;
    int gs, cs;
    ScopeObject *sc = lookup(self, global_key, &err);
    if (err)
        return NULL;
    surge(sc, m, start, g_min, g_factor, &p, &g10, &gf, &gs);
    if (country_key == Py_None) { /* the other fields at their defaults: 0, 0.0, False */
        PyObject *v[N_COUNTS];
        v[1] = round3(gf);
        if (v[1] == NULL)
            return NULL;
        v[0] = PyLong_FromLongLong(g10);
        v[3] = PyLong_FromLong(0);
        v[6] = PyLong_FromLong(0);
        v[4] = PyFloat_FromDouble(0.0);
        v[7] = PyFloat_FromDouble(0.0);
        v[8] = PyFloat_FromDouble(0.0);
        if (!v[0] || !v[3] || !v[6] || !v[4] || !v[7] || !v[8]) {
            for (int i = 0; i < 9; i++)
                if (i != 2 && i != 5)
                    Py_XDECREF(v[i]);
            return NULL;
        }
        v[2] = Py_NewRef(gs ? Py_True : Py_False);
        v[5] = Py_NewRef(Py_False);
        v[9] = Py_NewRef(Py_False);
        v[10] = Py_NewRef(Py_False);
        return new_counts(v);
    }
    ScopeObject *country = lookup(self, country_key, &err);
    if (err)
        return NULL;
    surge(country, m, start, c_min, c_factor, &p, &c10, &cf, &cs);
    i64 c24 = 0, c1h = 0, unused;
    if (country != NULL)
        day_hour(country, m, h, &c24, &unused, &c1h, &unused);
    i64 best_n = 0, child24 = -1, child1h = -1;
    double best_conc = 0.0, best_share = 0.0;
    int concentrated = 0, surging_prefix = 0;
    for (Py_ssize_t i = 0; i < nk; i++) {
        PyObject *key = PyTuple_GET_ITEM(keys, i);
        if (PyUnicode_GET_LENGTH(key) == 0 || PyUnicode_READ_CHAR(key, 0) != 'B')
            continue;
        ScopeObject *b = found[i];
        if (b == NULL)
            continue;
        Py_ssize_t touched = b->seen != NULL ? PyDict_GET_SIZE(b->seen) : 1;
        if (touched < 1)
            touched = 1;
        i64 n24, f24, n1h, f1h;
        day_hour(b, m, h, &n24, &f24, &n1h, &f1h);
        /* a block is this request's business only if its own sub-block holds a fair share */
        double need24 = child_share * (double)n24, need1h = child_share * (double)n1h;
        int mine24 = child24 < 0 || (double)child24 >= (need24 > 2.0 ? need24 : 2.0);
        int mine1h = child1h < 0 || (double)child1h >= (need1h > 2.0 ? need1h : 2.0);
        child24 = n24;
        child1h = n1h;
        double per24 = (double)c24 / (double)touched;
        double conc = (double)n24 / (per24 >= 1.0 ? per24 : 1.0);
        double share = n24 ? (double)f24 / (double)n24 : 0.0;
        if (conc > best_conc && mine24) {
            best_n = n24;
            best_conc = conc;
            best_share = share;
        }
        if (mine24 && (double)n24 >= floor24 && conc >= conc_factor && share >= fresh_share)
            concentrated = 1;
        if (mine1h && (double)n1h >= floor1h) {
            double per1h = (double)c1h / (double)touched;
            if ((double)n1h / (per1h >= 1.0 ? per1h : 1.0) >= conc_factor) {
                if (n1h == 0) {
                    PyErr_SetString(PyExc_ZeroDivisionError, "division by zero");
                    return NULL;
                }
                if ((double)f1h / (double)n1h >= fresh_share)
                    surging_prefix = 1;
            }
        }
    }
    PyObject *v[N_COUNTS] = {
        PyLong_FromLongLong(g10), round3(gf), Py_NewRef(gs ? Py_True : Py_False),
        PyLong_FromLongLong(c10), round3(cf), Py_NewRef(cs ? Py_True : Py_False),
        PyLong_FromLongLong(best_n), round3(best_conc), round3(best_share),
        Py_NewRef(concentrated ? Py_True : Py_False), Py_NewRef(surging_prefix ? Py_True : Py_False)};
    for (int i = 0; i < N_COUNTS; i++) {
        if (v[i] == NULL) {
            for (int j = 0; j < N_COUNTS; j++)
                Py_XDECREF(v[j]);
            return NULL;
        }
    }
    return new_counts(v);
}

/* spend(key, m, start) -> (units of the minutes m-59 .. m, units of the hours h-23 .. h, typical
 * hour), or None without the scope: spend._limits' figures of a spend scope ("$..."): the
 * typical hour is the lower median of the hours h-24 .. h-1 the view saw from their start (0 for
 * an hour without a bucket; 0 when there is none). */
static PyObject *store_spend(StoreObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    i64 m, start, sh, sd, f;
    int err;
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "spend(key, m, start)");
        return NULL;
    }
    if (as_i64(args[1], &m) < 0 || as_i64(args[2], &start) < 0)
        return NULL;
    ScopeObject *sc = lookup(self, args[0], &err);
    if (err)
        return NULL;
    if (sc == NULL)
        Py_RETURN_NONE;
    i64 h = floordiv60(m);
    buckets_sum(&sc->mins, m - 59, m, &sh, &f);
    buckets_sum(&sc->hrs, h - 23, h, &sd, &f);
    i64 values[24];
    int nv = 0;
    for (i64 b = h - 24; b < h; b++) {
        if (b * 60 >= start) {
            i64 n, unused;
            buckets_sum(&sc->hrs, b, b, &n, &unused);
            values[nv++] = n;
        }
    }
    i64 typ = 0;
    if (nv > 0) {
        sort_i64(values, nv);
        typ = values[(nv - 1) / 2];
    }
    return Py_BuildValue("LLL", sh, sd, typ);
}

/* prune(hour) -> scopes dropped: those whose newest hour is HOURS_KEPT or more before ``hour`` */
static PyObject *store_prune(StoreObject *self, PyObject *arg)
{
    i64 hour;
    if (as_i64(arg, &hour) < 0)
        return NULL;
    PyObject *dead = PyList_New(0);
    if (dead == NULL)
        return NULL;
    Py_ssize_t pos = 0;
    PyObject *key, *value;
    while (PyDict_Next(self->scopes, &pos, &key, &value)) {
        if (((ScopeObject *)value)->hrs.newest <= hour - HOURS_KEPT && PyList_Append(dead, key) < 0) {
            Py_DECREF(dead);
            return NULL;
        }
    }
    Py_ssize_t n = PyList_GET_SIZE(dead);
    for (Py_ssize_t i = 0; i < n; i++) {
        if (PyDict_DelItem(self->scopes, PyList_GET_ITEM(dead, i)) < 0) {
            Py_DECREF(dead);
            return NULL;
        }
    }
    Py_DECREF(dead);
    return PyLong_FromSsize_t(n);
}

static PyObject *store_keys(StoreObject *self, PyObject *unused)
{
    return PyDict_Keys(self->scopes);
}

static PyObject *store_get(StoreObject *self, PyObject *key)
{
    int err;
    ScopeObject *sc = lookup(self, key, &err);
    if (err)
        return NULL;
    if (sc == NULL)
        Py_RETURN_NONE;
    Py_INCREF(sc);
    return (PyObject *)sc;
}

static Py_ssize_t store_len(StoreObject *self)
{
    return PyDict_GET_SIZE(self->scopes);
}

static PyMethodDef store_methods[] = {
    {"add", (PyCFunction)(void (*)(void))store_add_py, METH_FASTCALL,
     "add(key, minute, n, fresh): count n requests (fresh of them from fresh IPs)"},
    {"surge", (PyCFunction)(void (*)(void))store_surge, METH_FASTCALL,
     "surge(key, m, start, min_baseline, factor, enter, exit, short_min)"},
    {"count_read", (PyCFunction)(void (*)(void))store_count_read, METH_FASTCALL,
     "count one request and read its population signals (see population.py)"},
    {"spend", (PyCFunction)(void (*)(void))store_spend, METH_FASTCALL,
     "spend(key, m, start) -> (units 60 min, units 24 h, typical hour) of a spend scope"},
    {"prune", (PyCFunction)store_prune, METH_O, "prune(hour) -> scopes dropped"},
    {"keys", (PyCFunction)store_keys, METH_NOARGS, "the scope keys"},
    {"get", (PyCFunction)store_get, METH_O, "the scope of a key, or None"},
    {NULL},
};

static PySequenceMethods store_as_sequence = {
    .sq_length = (lenfunc)store_len,
};

static PyTypeObject StoreType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "detector.core._popcount.Store",
    .tp_basicsize = sizeof(StoreObject),
    .tp_dealloc = (destructor)store_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Store(blocks): the request scopes of a PopulationView (see population.py).",
    .tp_methods = store_methods,
    .tp_as_sequence = &store_as_sequence,
    .tp_new = store_new,
};

static PyMethodDef module_methods[] = {
    {"set_counts_type", (PyCFunction)(void (*)(void))set_counts_type, METH_FASTCALL,
     "set_counts_type(cls, names): the record count_read returns (PopulationCounts)"},
    {NULL},
};

static struct PyModuleDef popcount_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "detector.core._popcount",
    .m_doc = "The population counters' request scopes in C (core/population.py is the reference).",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC PyInit__popcount(void)
{
    if (PyType_Ready(&ScopeType) < 0 || PyType_Ready(&StoreType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&popcount_module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&StoreType);
    if (PyModule_AddObject(m, "Store", (PyObject *)&StoreType) < 0 ||
        PyModule_AddIntConstant(m, "MINUTES_KEPT", MINUTES_KEPT) < 0 ||
        PyModule_AddIntConstant(m, "HOURS_KEPT", HOURS_KEPT) < 0) {
        Py_DECREF(&StoreType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
