"""`iscsi`: iSCSI LUNs through libiscsi (see `driver`)."""
from .driver import DRIVERS, IscsiDriver

__all__ = ["DRIVERS", "IscsiDriver"]
