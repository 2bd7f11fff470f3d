# Declarations that let Cython compile routing.py into C (see setup.py):
# the .py stays the source, and runs as it is when the extension is not built.
cimport cython


@cython.final
cdef class RoutingTable:
    cdef public object assignment
    cdef public object generation
    cdef public str failover
    cdef list _req_tags
    cdef dict _resp_tags
    cdef dict _candidates
    cdef tuple _pods
    cdef list _any
    cdef dict _fixed
    cdef const unsigned long long[:] _starts
    cdef const long long[:] _index
    cdef int _shift
    cdef const unsigned int[:] _owner
    cdef const unsigned long long[:] _epoch
    cdef const unsigned int[:] _backup
    cdef tuple _combos
    cdef Py_ssize_t _count

    cpdef lookup(self, bytes key)
    @cython.locals(lo=Py_ssize_t, hi=Py_ssize_t, mid=Py_ssize_t, i=Py_ssize_t, b=Py_ssize_t)
    cpdef route_at(self, unsigned long long pos)
    @cython.locals(i=Py_ssize_t)
    cpdef bytes request_tag(self, route, pod)
    cpdef bytes response_tag(self, pod)
    cpdef tuple candidates(self, route)
    cpdef tuple _with_backups(self, route)
    cpdef fixed_route(self, str pod_id)
