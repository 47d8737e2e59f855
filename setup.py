"""The compiled parts, both for LUKS and both linking OpenSSL's libcrypto:
PBKDF2 one block at a time and the AF merge, for opens (drivers/luks/_kdf.c,
and why, in kdf.py), and the AES sector cipher of every read and write
(drivers/luks/_sectors.c).  Everything else is in setup.cfg.  The extensions
are optional: where they cannot be built (no compiler, no OpenSSL headers)
imgfs installs without them, derives keys with `cryptography` alone, on one
core, and encrypts sectors with the Python path (drivers/luks/crypto.py)."""
from setuptools import Extension, setup

setup(ext_modules=[
    Extension("imgfs.drivers.luks._kdf", ["drivers/luks/_kdf.c"],
              libraries=["crypto"], optional=True),
    Extension("imgfs.drivers.luks._sectors", ["drivers/luks/_sectors.c"],
              libraries=["crypto"], optional=True),
])
