# Declarations that let Cython compile metrics.py into C (see setup.py): the
# data plane counts each response with C calls. The .py stays the source, and
# runs as it is when the extension is not built.
cimport cython


@cython.final
cdef class Stats:
    cdef public dict by_pod
    cdef public list latency
    cdef public double latency_sum
    cdef public dict errors
    cdef public dict reloads
    cdef public object last_reload_ok
    cdef public Py_ssize_t retries
    cdef public dict failovers

    cpdef failover(self, str reason)
    cpdef response(self, str pod_id, int status, double seconds)
    cpdef error(self, str code)
