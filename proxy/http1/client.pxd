# Declarations that let Cython compile client.py into C (see setup.py):
# the .py stays the source, and runs as it is when the extension is not built.
cimport cython
cimport proxy.runtime
from proxy.http1._cheads cimport RequestHead
from proxy.http1.exchange cimport Exchange
from proxy.http1.upstream cimport Pool, UpstreamConnection


@cython.final
cdef class ClientProtocol:
    cdef public proxy.runtime.Runtime runtime
    cdef public object loop
    cdef public object transport
    cdef public object parser
    cdef public Exchange exchange
    cdef public Exchange parsing
    cdef public object queue
    cdef public int paused_mask
    cdef public bint write_paused
    cdef public double deadline
    cdef public object timer
    cdef public int timer_kind
    cdef public Py_ssize_t head_bytes
    cdef public tuple reject
    cdef public bytes final_error
    cdef public tuple final_refusal
    cdef public bint dead
    cdef public bint closed
    cdef public bytes peer
    cdef public bint upgrading
    cdef public UpstreamConnection tunnel
    cdef public bint client_eof
    cdef public Exchange ready
    cdef public list wbuf
    cdef public list held
    cdef public Py_ssize_t held_size
    cdef public object send_timer
    cdef public Py_ssize_t send_mark
    cdef public Exchange counting

    cpdef data_received(self, bytes data)
    cpdef _arm_send(self)
    cpdef on_message_begin(self)
    cpdef on_url(self, bytes url)
    cpdef on_header(self, bytes name, bytes value)
    @cython.locals(h=RequestHead)
    cpdef on_headers_complete(self)
    cpdef on_body(self, bytes body)
    cpdef _body(self, Exchange ex, bytes data)
    cpdef on_message_complete(self)
    cpdef _dispatch(self, Exchange ex)
    cpdef _choose(self, Exchange ex)
    cpdef bint retry(self, Exchange ex, str reason, tuple error)
    cpdef connect(self, Exchange ex, Pool pool)
    cpdef _attach(self, Exchange ex, UpstreamConnection conn)
    cpdef _hold(self, bytes data)
    cpdef _count_body(self, bytes data)
    cpdef start_tunnel(self, UpstreamConnection conn)
    cpdef exchange_done(self, Exchange ex)
    cpdef _next(self)
    cpdef bint last_while_draining(self)
    cpdef double _idle_time(self)
    cpdef _error(self, Exchange ex, int status, str code, str detail)
    cpdef _fail_connection(self, int status, str code, str detail)
    cpdef _count_refusal(self, Exchange ex, int status, str code)
    cpdef _write_final_error(self)
    cpdef write(self, bytes data)
    cpdef cork(self)
    cpdef uncork(self)
    cpdef write_eof(self)
    cpdef close(self)
    cpdef abort(self)
    cpdef pause_reading_for(self, int reason)
    cpdef resume_reading_for(self, int reason)
    cpdef _arm(self, int kind, double seconds)
