"""The compiled parts.  For LUKS, both linking OpenSSL's libcrypto: PBKDF2
one block at a time and the AF merge, for opens (drivers/luks/_kdf.c, and
why, in kdf.py), and the AES sector cipher of every read and write
(drivers/luks/_sectors.c).  For gluster, libgfapi's completion callback
(drivers/gluster/_completions.c).  Everything else is in setup.cfg.  The
extensions are optional: where they cannot be built (no compiler, no
OpenSSL headers) imgfs installs without them, derives keys with
`cryptography` alone, on one core, encrypts sectors with the Python path
(drivers/luks/crypto.py) and takes gluster's completions with a callback
in Python (drivers/gluster/gfapi.py)."""
from setuptools import Extension, setup

setup(ext_modules=[
    Extension("imgfs.drivers.luks._kdf", ["drivers/luks/_kdf.c"],
              libraries=["crypto"], optional=True),
    Extension("imgfs.drivers.luks._sectors", ["drivers/luks/_sectors.c"],
              libraries=["crypto"], optional=True),
    Extension("imgfs.drivers.gluster._completions", ["drivers/gluster/_completions.c"],
              optional=True),
])
