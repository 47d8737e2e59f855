"""`http` / `https`: images on web servers, read with HTTP/1.1 range requests.

* url.py: URLs parsed, shown without passwords, joined (pure);
* client.py: h11 over trio streams, a pool of persistent connections,
  redirects, the size and the file's version (ETag / Last-Modified);
* readahead.py: the read-ahead cache of `readahead`-sized windows;
* driver.py: the two drivers and QEMU's curl options.
"""
from .driver import DRIVERS

__all__ = ["DRIVERS"]
