"""`http` / `https`: images on web servers, read with HTTP/1.1 range requests.

* url.py: URLs parsed, shown without passwords, joined (pure);
* client.py: h11 over trio streams, a pool of persistent connections,
  redirects, the size and the file's version (ETag / Last-Modified).
  h11 because it does no I/O of its own: it runs on trio's sockets and
  SSLStream with nothing in between (a client library brings its own
  connection handling and costs more per request; see bench/README.md);
* readahead.py: the read-ahead cache of `readahead`-sized windows;
* driver.py: the two drivers and QEMU's curl options.
"""
from .driver import DRIVERS

__all__ = ["DRIVERS"]
