"""`http` / `https`: images on web servers, read with HTTP/1.1 range requests.

* url.py: URLs parsed, shown without passwords, joined (pure);
* wire.py: HTTP/1.1 on the wire: request heads written, answer heads
  parsed, bodies framed, strictly and within bounds (pure).  Our own, not
  h11: with one small range per request, h11's per-event machinery was
  the largest CPU cost of a read (figures: bench/README.md);
* connection.py: one connection: a socket of our own (http) or trio's
  SSLStream (https), a receive buffer, answers read into the caller's
  buffer;
* client.py: a pool of persistent connections, redirects, the size and
  the file's version (ETag / Last-Modified);
* readahead.py: the read-ahead cache of `readahead`-sized windows;
* driver.py: the two drivers and QEMU's curl options.
"""
from .driver import DRIVERS

__all__ = ["DRIVERS"]
