# Declarations that let Cython compile exchange.py into C (see setup.py):
# the .py stays the source, and runs as it is when the extension is not built.
cimport cython
cimport proxy.http1.client
cimport proxy.http1.upstream
cimport proxy.routing


@cython.final
cdef class Exchange:
    cdef public proxy.http1.client.ClientProtocol client
    cdef public list headers
    cdef public bytes url
    cdef public bytes method
    cdef public bint http11
    cdef public bint keep_alive
    cdef public bint upgrade
    cdef public bint head_done
    cdef public bint req_done
    cdef public bint req_chunked
    cdef public object req_length
    cdef public Py_ssize_t body_bytes
    cdef public bytes head
    cdef public list pending
    cdef public Py_ssize_t pending_size
    cdef public proxy.http1.upstream.UpstreamConnection conn
    cdef public bint sent
    cdef public object route
    cdef public proxy.routing.RoutingTable table
    cdef public tuple error
    cdef public bint resp_started
    cdef public bint out_chunked
    cdef public bint close_after
    cdef public bint retried
    cdef public double started
    cdef public int status
    cdef public object pod
    cdef public list tried
    cdef public tuple last_error
    cdef public object key
    cdef public object body_left

    cpdef client_write(self, bytes data)
    cpdef client_write_eof(self)
    cpdef upstream_interim(self, int status, bytes reason, list headers)
    cpdef upstream_head(self, proxy.http1.upstream.UpstreamConnection conn, int status, bytes reason, list headers)
    cpdef upstream_body(self, bytes data)
    cpdef upstream_done(self, proxy.http1.upstream.UpstreamConnection conn, bint reusable)
    cpdef bint retry_safe(self, bint after_send)
    cpdef upstream_failed(self, proxy.http1.upstream.UpstreamConnection conn, int status, str code, str detail)
    cpdef upstream_upgraded(self, proxy.http1.upstream.UpstreamConnection conn, bytes rest)
    cpdef upstream_tunnel_closed(self)
