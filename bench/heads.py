"""Request-head rewrite: the pure-Python reference against its compiled twin.

    taskset -c 1 python bench/heads.py            # 5 repeats of 200,000 calls each
    taskset -c 1 python bench/heads.py --number 50000

Times one call of ``rewrite_request`` (proxy/http1/heads.py and
proxy/http1/_cheads.pyx) on the head wrk sends in bench/peers.py (5 headers)
and on a browser-like head (14 headers, a Via, an X-Forwarded-For), best of
the repeats, in µs. No sockets: this is the Python work per request that the
twin takes over, not a throughput figure.
"""

from __future__ import annotations

import argparse
import timeit

from proxy.http1 import _cheads, heads

POLICY = heads.RequestPolicy()
WRK = [
    (b"Host", b"127.0.0.1:8080"),
    (b"User-Agent", b"wrk"),
    (b"Accept", b"*/*"),
    (b"X-Routing-Key", b"key-1234"),
    (b"Connection", b"keep-alive"),
]
BROWSER = [
    (b"Host", b"app.example.com"),
    (b"User-Agent", b"Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"),
    (b"Accept", b"text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"),
    (b"Accept-Language", b"en-US,en;q=0.5"),
    (b"Accept-Encoding", b"gzip, deflate, br"),
    (b"Referer", b"https://app.example.com/home"),
    (b"Cookie", b"session=0123456789abcdef0123456789abcdef; theme=dark"),
    (b"X-Routing-Key", b"tenant-42"),
    (b"Via", b"1.1 edge"),
    (b"X-Forwarded-For", b"203.0.113.7"),
    (b"Connection", b"keep-alive"),
    (b"Upgrade-Insecure-Requests", b"1"),
    (b"Sec-Fetch-Dest", b"document"),
    (b"Sec-Fetch-Mode", b"navigate"),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--number", type=int, default=200_000, help="calls per repeat (default 200,000)")
    ap.add_argument("--repeat", type=int, default=5, help="repeats; the best is reported (default 5)")
    args = ap.parse_args()
    print(f"{'head':<9} {'pure µs':>8} {'native µs':>10} {'ratio':>6}")
    for name, hdrs in (("wrk", WRK), ("browser", BROWSER)):
        call = (b"GET", b"/items/42?x=1", "1.1", True, False, hdrs, POLICY, b"127.0.0.1")
        assert heads.rewrite_request(*call).facts() == _cheads.rewrite_request(*call).facts()
        out = []
        for fn in (heads.rewrite_request, _cheads.rewrite_request):
            best = min(timeit.repeat(lambda fn=fn, call=call: fn(*call), number=args.number, repeat=args.repeat))
            out.append(best / args.number * 1e6)
        print(f"{name:<9} {out[0]:>8.2f} {out[1]:>10.2f} {out[1] / out[0]:>6.2f}")


if __name__ == "__main__":
    main()
