# The C type of a rewritten request head, for the compiled client protocol.

cdef class RequestHead:
    cdef public bytes method
    cdef public bytes url
    cdef public bint http11
    cdef public bint keep_alive
    cdef public bint close_after
    cdef public object key
    cdef public object req_length
    cdef public bint chunked
    cdef public bint upgrade
    cdef public object body_left
    cdef public bint host_given
    cdef public bytes head
    cdef public tuple reject
    cdef public tuple refuse
