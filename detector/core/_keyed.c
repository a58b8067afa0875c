/* HMAC-SHA256 keyed hashes of identifiers, memoized, in C with OpenSSL's SHA-256
 * (detector/core/pii.py is the reference: its Python code is the fallback, and the tests
 * compare both with the standard library's hmac).
 *
 * Why: a replay hashes ~2.4 new identifiers per request (addresses, numbers, ranges); in Python
 * a miss is two copies of prepared hashlib states, two updates, two digests and an int: ~1.6 us,
 * ~3-4% of a replay. Here the prepared states are plain SHA256_CTX structs copied with an
 * assignment (SHA256_Init/Update/Final: deprecated in OpenSSL 3 in favour of EVP, whose
 * per-call context copies cost more than the hash of a short identifier; still in OpenSSL 3).
 *
 * Keyed(key).hash(text) -> int: the first 8 bytes (big-endian) of HMAC-SHA256(key, text encoded
 * as UTF-8 with lone surrogates passed through), RFC 2104 as hmac does it (a key longer than the
 * 64-byte block hashed first); memoized per text in a dict emptied when it holds ``memo_max``.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <openssl/crypto.h>
#include <openssl/sha.h>
#include <string.h>

#define BLOCK 64

typedef struct {
    PyObject_HEAD
    SHA256_CTX inner, outer; /* after the key XOR the inner / outer pad */
    PyObject *memo;          /* str -> int */
    Py_ssize_t memo_max;
} KeyedObject;

static PyObject *keyed_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    Py_buffer key;
    Py_ssize_t memo_max = 1 << 17;
    static char *kwlist[] = {"key", "memo_max", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "y*|n", kwlist, &key, &memo_max))
        return NULL;
    if (memo_max < 1) {
        PyBuffer_Release(&key);
        PyErr_SetString(PyExc_ValueError, "memo_max must be at least 1");
        return NULL;
    }
    unsigned char k[BLOCK], pad[BLOCK];
    memset(k, 0, BLOCK);
    if (key.len > BLOCK)
        SHA256(key.buf, (size_t)key.len, k);
    else
        memcpy(k, key.buf, (size_t)key.len);
    PyBuffer_Release(&key);
    KeyedObject *self = (KeyedObject *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->memo = PyDict_New();
    if (self->memo == NULL) {
        Py_DECREF(self);
        return NULL;
    }
    self->memo_max = memo_max;
    for (int i = 0; i < BLOCK; i++)
        pad[i] = k[i] ^ 0x36;
    SHA256_Init(&self->inner);
    SHA256_Update(&self->inner, pad, BLOCK);
    for (int i = 0; i < BLOCK; i++)
        pad[i] = k[i] ^ 0x5C;
    SHA256_Init(&self->outer);
    SHA256_Update(&self->outer, pad, BLOCK);
    OPENSSL_cleanse(k, BLOCK);
    OPENSSL_cleanse(pad, BLOCK);
    return (PyObject *)self;
}

static void keyed_dealloc(KeyedObject *self)
{
    OPENSSL_cleanse(&self->inner, sizeof(SHA256_CTX));
    OPENSSL_cleanse(&self->outer, sizeof(SHA256_CTX));
    Py_XDECREF(self->memo);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *keyed_hash(KeyedObject *self, PyObject *text)
{
    if (!PyUnicode_Check(text)) {
        PyErr_SetString(PyExc_TypeError, "hash: an identifier is a str");
        return NULL;
    }
    PyObject *hit = PyDict_GetItemWithError(self->memo, text);
    if (hit != NULL) {
        Py_INCREF(hit);
        return hit;
    }
    if (PyErr_Occurred())
        return NULL;
    PyObject *encoded = NULL;
    Py_ssize_t len;
    const char *data = PyUnicode_AsUTF8AndSize(text, &len);
    if (data == NULL) { /* lone surrogates: passed through, as "surrogatepass" encodes them */
        PyErr_Clear();
        encoded = PyUnicode_AsEncodedString(text, "utf-8", "surrogatepass");
        if (encoded == NULL)
            return NULL;
        data = PyBytes_AS_STRING(encoded);
        len = PyBytes_GET_SIZE(encoded);
    }
    unsigned char digest[SHA256_DIGEST_LENGTH];
    SHA256_CTX ctx = self->inner;
    SHA256_Update(&ctx, data, (size_t)len);
    SHA256_Final(digest, &ctx);
    ctx = self->outer;
    SHA256_Update(&ctx, digest, SHA256_DIGEST_LENGTH);
    SHA256_Final(digest, &ctx);
    OPENSSL_cleanse(&ctx, sizeof(ctx));
    Py_XDECREF(encoded);
    unsigned long long h = 0;
    for (int i = 0; i < 8; i++)
        h = (h << 8) | digest[i];
    PyObject *out = PyLong_FromUnsignedLongLong(h);
    if (out == NULL)
        return NULL;
    if (PyDict_GET_SIZE(self->memo) >= self->memo_max)
        PyDict_Clear(self->memo);
    if (PyDict_SetItem(self->memo, text, out) < 0) {
        Py_DECREF(out);
        return NULL;
    }
    return out;
}

static PyObject *keyed_clear(KeyedObject *self, PyObject *unused)
{
    PyDict_Clear(self->memo);
    Py_RETURN_NONE;
}

static Py_ssize_t keyed_len(KeyedObject *self)
{
    return PyDict_GET_SIZE(self->memo);
}

static PyMethodDef keyed_methods[] = {
    {"hash", (PyCFunction)keyed_hash, METH_O,
     "hash(text) -> the first 8 bytes of HMAC-SHA256(key, text) as an int (memoized)"},
    {"clear", (PyCFunction)keyed_clear, METH_NOARGS, "empty the memo"},
    {NULL},
};

static PySequenceMethods keyed_as_sequence = {
    .sq_length = (lenfunc)keyed_len,
};

static PyTypeObject KeyedType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "detector.core._keyed.Keyed",
    .tp_basicsize = sizeof(KeyedObject),
    .tp_dealloc = (destructor)keyed_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Keyed(key, memo_max=131072): memoized HMAC-SHA256 keyed hashes (see pii.py).",
    .tp_methods = keyed_methods,
    .tp_as_sequence = &keyed_as_sequence,
    .tp_new = keyed_new,
};

static struct PyModuleDef keyed_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "detector.core._keyed",
    .m_doc = "HMAC-SHA256 keyed hashes of identifiers in C (core/pii.py is the reference).",
    .m_size = -1,
};

PyMODINIT_FUNC PyInit__keyed(void)
{
    if (PyType_Ready(&KeyedType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&keyed_module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&KeyedType);
    if (PyModule_AddObject(m, "Keyed", (PyObject *)&KeyedType) < 0) {
        Py_DECREF(&KeyedType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
