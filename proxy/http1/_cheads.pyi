from .heads import RequestHead, RequestPolicy

def rewrite_request(
    method: bytes,
    url: bytes,
    version: str,
    keep_alive: bool,
    upgrading: bool,
    headers: list[tuple[bytes, bytes]],
    policy: RequestPolicy,
    peer: bytes,
) -> RequestHead: ...
def rewrite_response(headers: list[tuple[bytes, bytes]]) -> tuple[bytes, bytes, bytes | None]: ...
def host_is_valid(value: bytes) -> bool: ...
