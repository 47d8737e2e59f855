"""`ssh`: images on SSH servers, read and written over SFTP (see `driver`)."""
from .driver import SshDriver

DRIVERS = [SshDriver]
