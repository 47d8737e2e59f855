"""imgfs drivers, one module per format or protocol (installed as imgfs.drivers)."""
