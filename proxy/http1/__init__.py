"""HTTP/1.1 on both sides of the proxy: the client protocol, the exchange,
pod connections and their pools, and the wire constants they share."""
