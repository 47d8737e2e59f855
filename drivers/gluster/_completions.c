/*
 * libgfapi's completion callback in C, so that no Python runs on
 * libgfapi's threads.
 *
 * libgfapi reports each asynchronous request's end by calling a function
 * on one of its own threads.  Written in Python (ctypes), that function
 * needs the GIL, and waits for it while the trio thread holds it: longest
 * while the mount keeps trio's loop awake (imgfs/spin.py), which is why
 * gluster could not busy-poll.  Here the callback only appends (key,
 * result, errno) to a queue under a mutex and signals an eventfd; the trio
 * thread, woken by the eventfd, takes the whole queue with collect().
 * Together fileno() and collect() are foreign_io's CompletionEvents.
 *
 * One queue for the process, as libgfapi may call back at any time, for any
 * volume.  It grows as needed; if it cannot (out of memory), the completion
 * is lost and its request ends by its timeout.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/eventfd.h>
#include <unistd.h>

typedef struct {
    long long key;
    long long result;
    int error;
} finished_t;

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static finished_t *queue;
static size_t queued, capacity;
static int event_fd = -1;

/* glfs_io_cbk: (glfs_fd_t *, ssize_t, struct glfs_stat *pre,
 * struct glfs_stat *post, void *data); data carries the request's key. */
static void
on_complete(void *fd, ssize_t result, void *pre, void *post, void *data)
{
    int error = errno;
    int appended = 0;
    (void)fd, (void)pre, (void)post;
    pthread_mutex_lock(&lock);
    if (queued == capacity) {
        size_t larger = capacity ? 2 * capacity : 256;
        finished_t *grown = realloc(queue, larger * sizeof *queue);
        if (grown != NULL) {
            queue = grown;
            capacity = larger;
        }
    }
    if (queued < capacity) {
        queue[queued++] = (finished_t){(long long)(intptr_t)data, result, error};
        appended = 1;
    }
    pthread_mutex_unlock(&lock);
    if (appended) {
        uint64_t one = 1;
        (void)!write(event_fd, &one, sizeof one);
    }
}

static PyObject *
callback(PyObject *self, PyObject *unused)
{
    return PyLong_FromVoidPtr((void *)on_complete);
}

static PyObject *
fileno_(PyObject *self, PyObject *unused)
{
    return PyLong_FromLong(event_fd);
}

static PyObject *
collect(PyObject *self, PyObject *unused)
{
    uint64_t count;
    (void)!read(event_fd, &count, sizeof count);  /* EAGAIN when not signalled */
    pthread_mutex_lock(&lock);
    PyObject *finished = PyList_New((Py_ssize_t)queued);
    if (finished != NULL) {
        for (size_t i = 0; i < queued; i++) {
            PyObject *item = Py_BuildValue("(LLi)", queue[i].key, queue[i].result,
                                           queue[i].error);
            if (item == NULL) {
                Py_CLEAR(finished);
                break;
            }
            PyList_SET_ITEM(finished, (Py_ssize_t)i, item);
        }
        if (finished != NULL)
            queued = 0;
    }
    pthread_mutex_unlock(&lock);
    return finished;
}

static PyMethodDef methods[] = {
    {"callback", callback, METH_NOARGS,
     "callback() -> int: the address of the glfs_io_cbk to give libgfapi (its "
     "data argument is the request's key)"},
    {"fileno", fileno_, METH_NOARGS,
     "fileno() -> int: an eventfd, readable once completions are queued"},
    {"collect", collect, METH_NOARGS,
     "collect() -> [(key, result, errno)]: every completion queued since the "
     "last call"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_completions",
    "libgfapi's completion callback in C (see _completions.c).", -1, methods,
};

PyMODINIT_FUNC
PyInit__completions(void)
{
    if (event_fd < 0) {
        event_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
        if (event_fd < 0)
            return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyModule_Create(&module);
}
