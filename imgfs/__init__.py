"""imgfs: disk images (qcow2, vmdk, vhdx, luks, raw, ...) mounted as flat raw files."""

__version__ = "0.1.0"
