# Declarations that let Cython compile upstream.py into C (see setup.py):
# the .py stays the source, and runs as it is when the extension is not built.
cimport cython
cimport proxy.http1.exchange


@cython.final
cdef class UpstreamConnection:
    cdef public Pool pool
    cdef public object transport
    cdef public object parser
    cdef public proxy.http1.exchange.Exchange exchange
    cdef public list headers
    cdef public bytes reason
    cdef public object resp_length
    cdef public bint resp_chunked
    cdef public bint interim
    cdef public bint in_body
    cdef public bint reused
    cdef public double idle_since
    cdef public bint closed
    cdef public bint got_bytes
    cdef public double deadline
    cdef public object timer
    cdef public bint tunnel
    cdef public bint head_only
    cdef public object loop
    cdef public bint paused
    cdef public bint eof
    cdef public bint write_blocked
    cdef public bint head_end

    cpdef data_received(self, bytes data)
    cpdef _end_at_head(self, proxy.http1.exchange.Exchange ex, bytes data)
    cpdef on_message_begin(self)
    cpdef on_status(self, bytes reason)
    cpdef on_header(self, bytes name, bytes value)
    cpdef on_headers_complete(self)
    cpdef on_body(self, bytes body)
    cpdef on_message_complete(self)
    cpdef send(self, proxy.http1.exchange.Exchange ex, bytes data, bint head_only)
    cpdef write(self, bytes data)
    cpdef writelines(self, list data)
    cpdef write_eof(self)
    cpdef pause_reading(self)
    cpdef resume_reading(self)
    cpdef release(self)
    cpdef discard(self)
    cpdef _cancel_timer(self)


@cython.final
cdef class Pool:
    cdef public object loop
    cdef public str pod_id
    cdef public str host
    cdef public int port
    cdef public list idle
    cdef public double connect_timeout
    cdef public double response_timeout
    cdef public double idle_timeout
    cdef public Py_ssize_t max_idle
    cdef public Py_ssize_t opened
    cdef public bint closed

    cpdef UpstreamConnection take(self)
    cpdef put(self, UpstreamConnection conn)
    cpdef sweep(self, double now)


# A C type, so it exists as soon as this module starts loading: the compiled
# modules import each other's types in a cycle (client, exchange, upstream,
# runtime), and runtime.py imports this class by name.
@cython.final
cdef class Upstreams:
    cdef public object loop
    cdef public object settings
    cdef public dict pools
    cdef public object _sweeper

    cpdef Pool pool(self, str pod_id, str host, int port)
