# Declarations that let Cython compile runtime.py into C (see setup.py): the
# data plane reads these fields as C struct members. The .py stays the source,
# and runs as it is when the extension is not built.
cimport cython
cimport proxy.metrics
cimport proxy.routing


@cython.final
cdef class Runtime:
    cdef public object settings
    cdef public object loop
    cdef public bint response_headers
    cdef public str missing_key
    cdef public double header_timeout
    cdef public double body_timeout
    cdef public double idle_timeout
    cdef public double send_timeout
    cdef public object request_policy
    cdef public double timer_step
    cdef public proxy.routing.RoutingTable table
    cdef public object upstreams
    cdef public set connections
    cdef public bint closing
    cdef public proxy.metrics.Stats stats
    cdef public object health
    cdef public object fail_statuses
    cdef public Py_ssize_t retries
    cdef public double request_budget
    cdef public bint access_log
    cdef public bint access_log_keys
    cdef public Py_ssize_t request_count
    cdef public str id_prefix
    cdef public object shared
    cdef public object collector
    cdef public object table_loaded_at
    cdef public object last_reload_error
    cdef public object admin_port
    cdef public object offload
    cdef public set _background

    cpdef pool_for(self, pod)
