// batch_read's request parsing in C (torch_deepstack/storage/pyrows.py loads it with ctypes.PyDLL: every call
// runs with the GIL held). Python spent ~1 us per request taking request tuples apart, checking them and finding
// each destination's address; here that is a few dozen ns. Only the plain case is handled: anything else makes
// the caller fall back to its Python loop, which decides (and reports errors) exactly as before.
#include <Python.h>
#include <structmember.h>  // T_OBJECT_EX: the kind of member a __slots__ entry is

#include <cstdint>
#include <cstdlib>
#include <cstring>

extern "C" {

// Buffer exports held while the reads run (a bytearray cannot be resized under them), released by ds_rows_release.
struct ds_views {
    Py_ssize_t n, cap;
    Py_buffer v[1];
};

static ds_views* views_new(Py_ssize_t cap) {
    ds_views* h = (ds_views*)malloc(sizeof(ds_views) + sizeof(Py_buffer) * (size_t)(cap > 0 ? cap : 1));
    if (h) {
        h->n = 0;
        h->cap = cap;
    }
    return h;
}

void ds_rows_release(void* handle) {
    ds_views* h = (ds_views*)handle;
    if (!h) return;
    for (Py_ssize_t i = 0; i < h->n; i++) PyBuffer_Release(&h->v[i]);
    free(h);
}

// Parses requests reqs[start:] (a list of tuples (file, offset, length[, out[, userdata]]) or ReadRequests).
// Per request: `file` exactly of type file_type and a key of which_of (dict File -> file index, whose chunk size
// is chunk_sizes[index]); offset and length ints >= 0; the request inside one chunk; out None (a zeroed
// bytearray of `length` bytes is made), a contiguous CPU tensor of type tensor_type (exactly; Py_None: no torch)
// or an object exporting a writable, C-contiguous buffer, of >= length bytes. Writes rows[5 * i] = (offset, length, address of out, 0, file index) and appends out (or the new
// bytearray) to `outs`. Returns the number of requests parsed; *status tells why it stopped early:
// 0 all parsed, 1 request at the returned index names a File not in which_of yet (the caller adds it and calls
// again from there), 2 the request is not a plain one (the caller uses its general loop for the batch),
// -1 a Python error is set. *views receives the handle of the buffer exports (release with ds_rows_release;
// one handle per call).
// A CPU tensor's address (its storage outlives the call: the request list holds the tensor), or 0 when it is
// not a contiguous CPU tensor of at least `len` bytes (then the Python loop decides).
static int64_t tensor_address(PyObject* t, int64_t len) {
    static PyObject *s_is_cpu = nullptr, *s_is_contiguous, *s_nbytes, *s_data_ptr;
    if (!s_is_cpu) {
        s_is_cpu = PyUnicode_InternFromString("is_cpu");
        s_is_contiguous = PyUnicode_InternFromString("is_contiguous");
        s_nbytes = PyUnicode_InternFromString("nbytes");
        s_data_ptr = PyUnicode_InternFromString("data_ptr");
        if (!s_is_cpu || !s_is_contiguous || !s_nbytes || !s_data_ptr) return 0;
    }
    int64_t addr = 0;
    PyObject *cpu = PyObject_GetAttr(t, s_is_cpu), *contig = nullptr, *nb = nullptr, *dp = nullptr;
    if (cpu == Py_True) contig = PyObject_CallMethodObjArgs(t, s_is_contiguous, nullptr);
    if (contig == Py_True) nb = PyObject_GetAttr(t, s_nbytes);
    if (nb && PyLong_Check(nb) && PyLong_AsLongLong(nb) >= len) dp = PyObject_CallMethodObjArgs(t, s_data_ptr, nullptr);
    if (dp && PyLong_Check(dp)) addr = (int64_t)PyLong_AsUnsignedLongLongMask(dp);
    Py_XDECREF(cpu);
    Py_XDECREF(contig);
    Py_XDECREF(nb);
    Py_XDECREF(dp);
    if (PyErr_Occurred()) {  // e.g. a sparse tensor's is_contiguous
        PyErr_Clear();
        addr = 0;
    }
    return addr;
}

Py_ssize_t ds_rows_parse(PyObject* reqs, Py_ssize_t start, PyObject* file_type, PyObject* request_type,
                         PyObject* tensor_type, PyObject* which_of, const int64_t* chunk_sizes, Py_ssize_t nfiles,
                         int64_t* rows, PyObject* outs, int64_t* status, void** views) {
    static PyObject *s_file = nullptr, *s_offset, *s_length, *s_out;
    if (!s_file) {
        s_file = PyUnicode_InternFromString("file");
        s_offset = PyUnicode_InternFromString("offset");
        s_length = PyUnicode_InternFromString("length");
        s_out = PyUnicode_InternFromString("out");
        if (!s_file || !s_offset || !s_length || !s_out) {
            *status = -1;
            return start;
        }
    }
    *status = 0;
    *views = nullptr;
    Py_ssize_t n = PyList_GET_SIZE(reqs);
    ds_views* h = views_new(n - start);
    if (!h) {
        PyErr_NoMemory();
        *status = -1;
        return start;
    }
    *views = h;
    Py_ssize_t i = start;
    for (; i < n; i++) {
        PyObject* r = PyList_GET_ITEM(reqs, i);
        PyObject *f, *off_o, *len_o, *out;
        PyObject *owned[4] = {nullptr, nullptr, nullptr, nullptr};
        if (PyTuple_CheckExact(r)) {
            Py_ssize_t k = PyTuple_GET_SIZE(r);
            if (k < 3 || k > 5) { *status = 2; break; }
            f = PyTuple_GET_ITEM(r, 0);
            off_o = PyTuple_GET_ITEM(r, 1);
            len_o = PyTuple_GET_ITEM(r, 2);
            out = k > 3 ? PyTuple_GET_ITEM(r, 3) : Py_None;
        } else if ((PyObject*)Py_TYPE(r) == request_type) {
            f = owned[0] = PyObject_GetAttr(r, s_file);
            off_o = owned[1] = PyObject_GetAttr(r, s_offset);
            len_o = owned[2] = PyObject_GetAttr(r, s_length);
            out = owned[3] = PyObject_GetAttr(r, s_out);
            if (!f || !off_o || !len_o || !out) {
                for (PyObject* o : owned) Py_XDECREF(o);
                *status = -1;
                break;
            }
        } else {
            *status = 2;
            break;
        }
        int st = 0;
        int64_t off = 0, len = 0, idx = -1, addr = 0;
        PyObject* keep_out = nullptr;  // new reference appended to outs
        if ((PyObject*)Py_TYPE(f) != file_type || !PyLong_CheckExact(off_o) || !PyLong_CheckExact(len_o)) {
            st = 2;
        } else {
            int ovf1 = 0, ovf2 = 0;
            off = PyLong_AsLongLongAndOverflow(off_o, &ovf1);
            len = PyLong_AsLongLongAndOverflow(len_o, &ovf2);
            if (ovf1 || ovf2 || off < 0 || len < 0) st = 2;
        }
        if (!st) {
            PyObject* w = PyDict_GetItemWithError(which_of, f);  // borrowed
            if (!w) {
                st = PyErr_Occurred() ? -1 : 1;
            } else {
                idx = PyLong_AsLongLong(w);
                if (idx < 0 || idx >= nfiles) st = 2;
            }
        }
        if (!st) {
            int64_t cs = chunk_sizes[idx];
            if (cs <= 0 || off % cs + len > cs) st = 2;  // crosses a chunk (or an odd layout): the general loop
        }
        if (!st && len == 0) st = 2;  // empty requests: the general loop validates their buffer
        if (!st) {
            if (out == Py_None) {
                keep_out = PyByteArray_FromStringAndSize(nullptr, (Py_ssize_t)len);
                if (!keep_out) {
                    st = -1;
                } else {
                    memset(PyByteArray_AS_STRING(keep_out), 0, (size_t)len);
                    addr = (int64_t)(uintptr_t)PyByteArray_AS_STRING(keep_out);
                    Py_buffer* v = &h->v[h->n];
                    if (PyObject_GetBuffer(keep_out, v, PyBUF_WRITABLE) < 0) {
                        st = -1;
                    } else {
                        h->n++;
                    }
                }
            } else if ((PyObject*)Py_TYPE(out) == tensor_type) {
                addr = tensor_address(out, len);
                if (addr) {
                    Py_INCREF(out);
                    keep_out = out;
                } else {
                    st = 2;
                }
            } else if (!PyObject_CheckBuffer(out)) {
                st = 2;  // anything else: the Python loop knows it
            } else {
                Py_buffer* v = &h->v[h->n];
                if (PyObject_GetBuffer(out, v, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) {
                    PyErr_Clear();  // read-only or strided: the general loop reports it per request
                    st = 2;
                } else if (v->len < len) {
                    PyBuffer_Release(v);
                    st = 2;
                } else {
                    h->n++;
                    addr = (int64_t)(uintptr_t)v->buf;
                    Py_INCREF(out);
                    keep_out = out;
                }
            }
        }
        for (PyObject* o : owned) Py_XDECREF(o);
        if (st) {
            Py_XDECREF(keep_out);
            *status = st;
            break;
        }
        int rc = PyList_Append(outs, keep_out);
        Py_DECREF(keep_out);
        if (rc < 0) {
            *status = -1;
            break;
        }
        int64_t* q = rows + 5 * (i - start);
        q[0] = off;
        q[1] = len;
        q[2] = addr;
        q[3] = 0;
        q[4] = idx;
    }
    return i;
}

// batch_read's results, made here instead of by ReadResult(...) calls (~0.29 us each in Python, ~0.05 here): one
// object per request of `result_type` (a class with exactly the __slots__ _request, nbytes, _data, error, _out,
// checked on first use), allocated and filled directly as __init__ would fill them: (reqs[i], rows[5 i + 3] (the
// byte count the read left in column 3), None, None, outs[i]). Returns a new list; Py_None when some count is
// negative (requests the general path must serve: the caller then makes the results itself); NULL with a Python
// error set on failure.
static Py_ssize_t slot_offset(PyObject* type, const char* name) {
    PyObject* d = PyObject_GetAttrString(type, name);
    Py_ssize_t off = -1;
    if (d && Py_IS_TYPE(d, &PyMemberDescr_Type)) {
        PyMemberDef* m = ((PyMemberDescrObject*)d)->d_member;
        if (m->type == T_OBJECT_EX && !(m->flags & READONLY)) off = m->offset;
    }
    Py_XDECREF(d);
    PyErr_Clear();
    return off;
}

PyObject* ds_rows_results(PyObject* reqs, PyObject* outs, const int64_t* rows, PyObject* result_type) {
    static PyObject* s_type = nullptr;  // the class the offsets below belong to (kept alive)
    static Py_ssize_t o_req, o_nbytes, o_data, o_error, o_out;
    if (result_type != s_type) {
        if (!PyType_Check(result_type)) {
            PyErr_SetString(PyExc_TypeError, "ds_rows_results: result_type is not a class");
            return nullptr;
        }
        PyTypeObject* t = (PyTypeObject*)result_type;
        Py_ssize_t offs[5] = {slot_offset(result_type, "_request"), slot_offset(result_type, "nbytes"),
                              slot_offset(result_type, "_data"), slot_offset(result_type, "error"),
                              slot_offset(result_type, "_out")};
        for (Py_ssize_t o : offs) {
            if (o < (Py_ssize_t)sizeof(PyObject) || o + (Py_ssize_t)sizeof(PyObject*) > t->tp_basicsize) {
                PyErr_SetString(PyExc_TypeError, "ds_rows_results: result_type lacks the expected __slots__");
                return nullptr;
            }
        }
        o_req = offs[0], o_nbytes = offs[1], o_data = offs[2], o_error = offs[3], o_out = offs[4];
        Py_INCREF(result_type);
        Py_XDECREF(s_type);
        s_type = result_type;
    }
    Py_ssize_t n = PyList_GET_SIZE(reqs);
    if (PyList_GET_SIZE(outs) != n) {
        PyErr_SetString(PyExc_ValueError, "ds_rows_results: reqs and outs differ in length");
        return nullptr;
    }
    for (Py_ssize_t i = 0; i < n; i++)
        if (rows[5 * i + 3] < 0) Py_RETURN_NONE;
    PyObject* list = PyList_New(n);
    if (!list) return nullptr;
    PyTypeObject* t = (PyTypeObject*)result_type;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject* nb = PyLong_FromLongLong(rows[5 * i + 3]);
        PyObject* o = nb ? t->tp_alloc(t, 0) : nullptr;  // zeroed (slots NULL) and GC-tracked
        if (!o) {
            Py_XDECREF(nb);
            Py_DECREF(list);
            return nullptr;
        }
        char* b = (char*)o;
        PyObject* req = PyList_GET_ITEM(reqs, i);
        PyObject* out = PyList_GET_ITEM(outs, i);
        Py_INCREF(req);
        Py_INCREF(out);
        Py_INCREF(Py_None);
        Py_INCREF(Py_None);
        *(PyObject**)(b + o_req) = req;
        *(PyObject**)(b + o_nbytes) = nb;
        *(PyObject**)(b + o_data) = Py_None;
        *(PyObject**)(b + o_error) = Py_None;
        *(PyObject**)(b + o_out) = out;
        PyList_SET_ITEM(list, i, o);
    }
    return list;
}

}  // extern "C"
