# imgfs — `make help` lists the targets.
# Everything a fresh Debian machine needs is installed by `make deps`
# (called by demo, test and install), so two commands get a working mount.

VENV      ?= .venv
# Debian's own Python: every user (the tests mount as nobody too) can run it.
PYTHON    ?= $(shell [ -x /usr/bin/python3 ] && echo /usr/bin/python3 || echo python3)
PY        := $(VENV)/bin/python
PREFIX    ?= /usr/local
MANDIR    ?= $(PREFIX)/share/man
SBINDIR   ?= /sbin
PYTEST_ARGS ?=

# Run time: FUSE, and what pyfuse3 and our LUKS extension (libssl-dev) need
# to build; libssh-4 for ssh:// sources (the ssh driver's SSH library, loaded
# with ctypes), libgfapi0 for gluster://.
# Test oracles: the real tools every test compares against
# (qemu-img/qemu-io/qemu-nbd, qemu-storage-daemon, nbdkit, cryptsetup,
# dosfstools, mtools, 7-Zip, sshd with ssh-agent and ssh-keygen, tgtd,
# glusterd, nginx, fio).
APT_RUNTIME := fuse3 libfuse3-dev pkg-config gcc python3-dev python3-venv libssl-dev \
               libssh-4 libgfapi0
APT_DEMO    := fdisk e2fsprogs util-linux mount
APT_TEST    := qemu-utils qemu-system-common qemu-block-extra nbdkit fio \
               dosfstools mtools cryptsetup-bin 7zip openssh-server openssh-client tgt \
               man-db groff-base xfsprogs btrfs-progs glusterfs-server nginx-light tinyproxy
# VMDK: images from writers other than QEMU (bximage -imgmode=vmware4,
# Debian's VMDKstream module) for tests/drivers/test_vmdk.py
APT_TEST    += python3-vmdkstream

.PHONY: help deps deps-test venv demo test test-fast install uninstall bench lint typecheck clean

# iscsi:// sources: libiscsi at run time; for the tests its headers (a unit
# test compares the binding's struct layout with them) and its tools
# (iscsi-ls, iscsi-inq, iscsi-perf) for debugging against tgtd.
APT_RUNTIME += libiscsi7
APT_TEST    += libiscsi-dev libiscsi-bin
# bochs and cloop images for the tests: bximage (package bochs) and
# create_compressed_fs (cloop-utils) make them.
APT_TEST    += bochs cloop-utils
# rbd: sources: librados and librbd at run time; a one-node Ceph cluster
# (mon, osd, mgr) for the tests.
APT_RUNTIME += librbd1 librados2
APT_TEST    += ceph-mon ceph-osd ceph-mgr ceph-common
# LUKS serpent and twofish: Nettle at run time (drivers/luks/nettle.py); for
# the tests its headers (a unit test compares the context sizes with them)
# and libgcrypt, an independent implementation the ciphers are checked with.
APT_RUNTIME += libnettle8
APT_TEST    += nettle-dev libgcrypt20
# dmg: dmg2img, an independent reader of the chunk kinds QEMU on Debian
# cannot read (bzip2, ADC).
APT_TEST    += dmg2img

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | sort

define apt_install
	@missing=$$(for p in $(1); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null \
	    | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	    echo "installing Debian packages:" $$missing; \
	    $(SUDO) apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing >/dev/null; \
	fi
endef
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

deps:  ## Debian packages needed to build and run imgfs
	$(call apt_install,$(APT_RUNTIME) $(APT_DEMO))

deps-test: deps  ## plus the test oracles
	$(call apt_install,$(APT_TEST))

$(VENV)/.installed: setup.cfg setup.py pyproject.toml drivers/luks/_kdf.c drivers/luks/_sectors.c
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test,dev]'
	touch $@

# An editable install leaves our modules uncompiled, and where
# PYTHONDONTWRITEBYTECODE is set (as on our CI machine) Python never caches
# them: every imgfs start then compiled ~60 modules, 80 ms of a mount's
# latency.  compileall writes the caches anyway (only changed files again).
venv: deps $(VENV)/.installed  ## the virtualenv with imgfs installed (editable)
	@$(PY) -m compileall -q imgfs drivers >/dev/null

demo: venv  ## make a sample disk image, mount it, look inside, unmount
	@PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash tests/demo.sh

test: deps-test venv  ## install everything, then run the whole test suite
	IMGFS_REQUIRE_ORACLES=1 PATH="$(CURDIR)/$(VENV)/bin:$$PATH" \
	    $(PY) -m pytest -q -rs $(PYTEST_ARGS) tests

test-fast: venv  ## unit tests only
	$(PY) -m pytest -q tests/unit

install: deps  ## install system-wide: imgfs on PATH, mount.imgfs in /sbin, man pages
	$(PYTHON) -m venv /opt/imgfs
	/opt/imgfs/bin/pip install -q .
	ln -sf /opt/imgfs/bin/imgfs $(PREFIX)/bin/imgfs
	ln -sf /opt/imgfs/bin/mount.imgfs $(SBINDIR)/mount.imgfs
	install -d $(MANDIR)/man1 $(MANDIR)/man7 $(MANDIR)/man8
	install -m 644 man/imgfs.1 $(MANDIR)/man1/
	install -m 644 man/imgfs-formats.7 $(MANDIR)/man7/
	install -m 644 man/mount.imgfs.8 $(MANDIR)/man8/
	-mandb -q 2>/dev/null

uninstall:  ## undo make install
	rm -rf /opt/imgfs $(PREFIX)/bin/imgfs $(SBINDIR)/mount.imgfs
	rm -f $(MANDIR)/man1/imgfs.1 $(MANDIR)/man7/imgfs-formats.7 $(MANDIR)/man8/mount.imgfs.8

bench: deps-test venv  ## imgfs against qemu-storage-daemon's FUSE export (ARGS=--quick, --case fat|all ...)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) bench/run.py $(ARGS)

lint: venv  ## ruff
	$(VENV)/bin/ruff check imgfs drivers tests bench

typecheck: venv  ## mypy
	$(VENV)/bin/mypy imgfs drivers

clean:  ## remove the virtualenv and caches
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
