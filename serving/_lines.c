/* The request path's log line, made in C: the bytes serving.logger.InferenceLogger.answered makes
 * in Python, in one call of a C method, with no Python frame.
 *
 * In Python the line is about ten interpreted steps on the model server's request path: a method
 * call, a row count, a queue check, a tuple of eleven, orjson.dumps with keywords, a newline check,
 * a bytes format, an append. Counted with callgrind, a call in a loop takes 8,200 instructions
 * here against 10,800 in Python (the loop included); in the model server the whole log adds about
 * 2 % to a small request's instructions (bench/log_instructions.py). orjson still encodes the head
 * (the same call, the same arguments), so both makers write the same bytes;
 * tests/unit/serving/test_logger.py checks it.
 *
 * The line: b"a" + the head + b"\t" + the request body as it came (its newlines made spaces: a
 * line per request) + b"\n", where the head is
 *   [schema_version, wall_s, latency_s, rows, "model", "version", "role", "request_id",
 *    "protocol", "row_input" or null, outputs]
 * (monitoring.events.answered_payload). Optional: where this module was not built, the model server
 * makes the same line in Python and says so (MLOPS_LOGS__LINES=python chooses that one too).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <string.h>

typedef struct {
    PyObject_HEAD
    PyObject *pending;   /* the queue of answered requests' lines (a deque) */
    PyObject *append;    /* its bound append */
    PyObject *on_drop;   /* called with the rows of a request dropped for a full queue */
    PyObject *dumps;     /* orjson.dumps */
    PyObject *default_;  /* dumps' default= */
    PyObject *option;    /* dumps' option= */
    PyObject *kwnames;   /* ("default", "option") */
    Py_ssize_t capacity;
    PyObject *schema_version;  /* an int */
    double wall_offset;  /* time.time() - time.perf_counter(), set again by the hand-over thread */
} Lines;

static int
Lines_traverse(Lines *self, visitproc visit, void *arg)
{
    Py_VISIT(self->pending);
    Py_VISIT(self->append);
    Py_VISIT(self->on_drop);
    Py_VISIT(self->dumps);
    Py_VISIT(self->default_);
    Py_VISIT(self->option);
    return 0;
}

static int
Lines_clear(Lines *self)
{
    Py_CLEAR(self->pending);
    Py_CLEAR(self->append);
    Py_CLEAR(self->on_drop);
    Py_CLEAR(self->dumps);
    Py_CLEAR(self->default_);
    Py_CLEAR(self->option);
    Py_CLEAR(self->kwnames);
    Py_CLEAR(self->schema_version);
    return 0;
}

static void
Lines_dealloc(Lines *self)
{
    PyObject_GC_UnTrack(self);
    Lines_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int
Lines_init(Lines *self, PyObject *args, PyObject *kwds)
{
    static char *keywords[] = {"pending", "capacity", "schema_version", "dumps", "default", "option",
                               "on_drop", NULL};
    PyObject *pending, *dumps, *default_, *option, *on_drop;
    PyObject *schema_version;
    Py_ssize_t capacity;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OnO!OOOO", keywords, &pending, &capacity,
                                     &PyLong_Type, &schema_version, &dumps, &default_, &option, &on_drop)) {
        return -1;
    }
    PyObject *append = PyObject_GetAttrString(pending, "append");
    if (append == NULL) {
        return -1;
    }
    /* Interned: orjson matches keyword names by identity. */
    PyObject *kwnames = PyTuple_New(2);
    PyObject *default_name = PyUnicode_InternFromString("default");
    PyObject *option_name = PyUnicode_InternFromString("option");
    if (kwnames == NULL || default_name == NULL || option_name == NULL) {
        Py_XDECREF(kwnames);
        Py_XDECREF(default_name);
        Py_XDECREF(option_name);
        Py_DECREF(append);
        return -1;
    }
    PyTuple_SET_ITEM(kwnames, 0, default_name);
    PyTuple_SET_ITEM(kwnames, 1, option_name);
    Lines_clear(self);
    Py_INCREF(pending);
    self->pending = pending;
    self->append = append;
    Py_INCREF(on_drop);
    self->on_drop = on_drop;
    Py_INCREF(dumps);
    self->dumps = dumps;
    Py_INCREF(default_);
    self->default_ = default_;
    Py_INCREF(option);
    self->option = option;
    self->kwnames = kwnames;
    self->capacity = capacity;
    Py_INCREF(schema_version);
    self->schema_version = schema_version;
    return 0;
}

static PyObject *Lines_line(Lines *self, double started, double ended, PyObject *const *args,
                            PyObject *outputs);

static PyObject *
Lines_answered(Lines *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 10) {
        PyErr_Format(PyExc_TypeError,
                     "answered(started, ended, model, version, role, request_id, protocol, body, "
                     "row_input, outputs) takes 10 arguments (%zd given)", nargs);
        return NULL;
    }
    double started = PyFloat_AsDouble(args[0]);
    if (started == -1.0 && PyErr_Occurred()) {
        return NULL;
    }
    double ended = PyFloat_AsDouble(args[1]);
    if (ended == -1.0 && PyErr_Occurred()) {
        return NULL;
    }
    PyObject *body = args[7];
    if (!PyBytes_Check(body)) {
        PyErr_Format(PyExc_TypeError, "body: expected bytes, not %.100s", Py_TYPE(body)->tp_name);
        return NULL;
    }
    PyObject *outputs = args[9];  /* a dict (the batcher's); another mapping is copied into one */
    if (PyDict_Check(outputs)) {
        Py_INCREF(outputs);
    } else {
        outputs = PyDict_New();
        if (outputs == NULL) {
            return NULL;
        }
        if (PyDict_Merge(outputs, args[9], 1) < 0) {
            Py_DECREF(outputs);
            return NULL;
        }
    }
    PyObject *line = Lines_line(self, started, ended, args, outputs);
    Py_DECREF(outputs);
    if (line == NULL) {
        return NULL;
    }
    if (line == Py_None) {  /* dropped and counted */
        return line;
    }
    PyObject *result = PyObject_CallOneArg(self->append, line);
    Py_DECREF(line);
    if (result == NULL) {
        return NULL;
    }
    Py_DECREF(result);
    Py_RETURN_NONE;
}

/* The line of an answered request; None when the queue is full (the request dropped and counted). */
static PyObject *
Lines_line(Lines *self, double started, double ended, PyObject *const *args, PyObject *outputs)
{
    PyObject *body = args[7];
    /* The rows: the first output's length (the batcher's slices: a row each). */
    Py_ssize_t rows = 0, position = 0;
    PyObject *key, *first;
    if (PyDict_Next(outputs, &position, &key, &first)) {
        rows = PyObject_Length(first);
        if (rows < 0) {
            return NULL;
        }
    }
    Py_ssize_t queued = PyObject_Length(self->pending);
    if (queued < 0) {
        return NULL;
    }
    PyObject *count = PyLong_FromSsize_t(rows);
    if (count == NULL) {
        return NULL;
    }
    if (queued >= self->capacity) {  /* full: drop and count, never wait */
        PyObject *result = PyObject_CallOneArg(self->on_drop, count);
        Py_DECREF(count);
        if (result == NULL) {
            return NULL;
        }
        Py_DECREF(result);
        Py_RETURN_NONE;  /* not a line */
    }
    /* The head, one orjson call as in Python: [schema_version, wall_s, latency_s, rows, model,
     * version, role, request_id, protocol, row_input, outputs]. */
    PyObject *head = PyTuple_New(11);
    if (head == NULL) {
        Py_DECREF(count);
        return NULL;
    }
    PyObject *wall = PyFloat_FromDouble(ended + self->wall_offset);
    PyObject *latency = PyFloat_FromDouble(ended - started);
    if (wall == NULL || latency == NULL) {
        Py_XDECREF(wall);
        Py_XDECREF(latency);
        Py_DECREF(count);
        Py_DECREF(head);
        return NULL;
    }
    Py_INCREF(self->schema_version);
    PyTuple_SET_ITEM(head, 0, self->schema_version);
    PyTuple_SET_ITEM(head, 1, wall);
    PyTuple_SET_ITEM(head, 2, latency);
    PyTuple_SET_ITEM(head, 3, count);
    for (int i = 2; i <= 6; i++) {  /* model, version, role, request_id, protocol */
        Py_INCREF(args[i]);
        PyTuple_SET_ITEM(head, i + 2, args[i]);
    }
    Py_INCREF(args[8]);  /* row_input */
    PyTuple_SET_ITEM(head, 9, args[8]);
    Py_INCREF(outputs);
    PyTuple_SET_ITEM(head, 10, outputs);

    /* dumps(head, default=..., option=...); the arguments on this stack (`default` runs Python). */
    PyObject *call[3] = {head, self->default_, self->option};
    PyObject *encoded = PyObject_Vectorcall(self->dumps, call, 1, self->kwnames);
    Py_DECREF(head);
    if (encoded == NULL) {
        return NULL;
    }
    if (!PyBytes_Check(encoded)) {
        Py_DECREF(encoded);
        PyErr_SetString(PyExc_TypeError, "dumps did not return bytes");
        return NULL;
    }
    /* b"a" + head + b"\t" + body, its newlines made spaces (JSON whitespace; one inside a string
     * is escaped), + b"\n": a line per request. */
    Py_ssize_t head_size = PyBytes_GET_SIZE(encoded), body_size = PyBytes_GET_SIZE(body);
    PyObject *line = PyBytes_FromStringAndSize(NULL, head_size + body_size + 3);
    if (line == NULL) {
        Py_DECREF(encoded);
        return NULL;
    }
    char *out = PyBytes_AS_STRING(line);
    *out++ = 'a';
    memcpy(out, PyBytes_AS_STRING(encoded), head_size);
    out += head_size;
    Py_DECREF(encoded);
    *out++ = '\t';
    memcpy(out, PyBytes_AS_STRING(body), body_size);
    for (char *newline = memchr(out, '\n', body_size); newline != NULL;
         newline = memchr(newline + 1, '\n', body_size - (newline + 1 - out))) {
        *newline = ' ';
    }
    out[body_size] = '\n';
    return line;
}

static PyMethodDef Lines_methods[] = {
    {"answered", (PyCFunction)(void (*)(void))Lines_answered, METH_FASTCALL,
     "answered(started, ended, model, version, role, request_id, protocol, body, row_input, outputs)\n"
     "--\n\nQueue the log line of an answered request (drop and count it when the queue is full)."},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef Lines_members[] = {
    {"wall_offset", T_DOUBLE, offsetof(Lines, wall_offset), 0,
     "time.time() - time.perf_counter(): added to `ended` for the line's wall-clock time"},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject LinesType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "serving._lines.Lines",
    .tp_doc = PyDoc_STR("Lines(pending, capacity, schema_version, dumps, default, option, on_drop)\n"
                        "The answered requests' log lines, made in C, queued on `pending`."),
    .tp_basicsize = sizeof(Lines),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Lines_init,
    .tp_dealloc = (destructor)Lines_dealloc,
    .tp_traverse = (traverseproc)Lines_traverse,
    .tp_clear = (inquiry)Lines_clear,
    .tp_methods = Lines_methods,
    .tp_members = Lines_members,
};

static struct PyModuleDef lines_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "serving._lines",
    .m_doc = "The request path's log line, made in C (see serving.logger).",
    .m_size = -1,
};

PyMODINIT_FUNC
PyInit__lines(void)
{
    if (PyType_Ready(&LinesType) < 0) {
        return NULL;
    }
    PyObject *module = PyModule_Create(&lines_module);
    if (module == NULL) {
        return NULL;
    }
    Py_INCREF(&LinesType);
    if (PyModule_AddObject(module, "Lines", (PyObject *)&LinesType) < 0) {
        Py_DECREF(&LinesType);
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
