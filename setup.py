"""The one compiled part: PBKDF2 one block at a time and the AF merge, for
LUKS opens (drivers/luks/_kdf.c, and why, in kdf.py).  Everything else is in
setup.cfg.  The extension is optional: where it cannot be built (no
compiler, no OpenSSL headers) imgfs installs without it and derives keys
with `cryptography` alone, on one core."""
from setuptools import Extension, setup

setup(ext_modules=[
    Extension("imgfs.drivers.luks._kdf", ["drivers/luks/_kdf.c"],
              libraries=["crypto"], optional=True),
])
