"""qemu-img's whole-image tools beyond create/info/check/convert: compare,
commit, rebase, measure and amend.  Each module holds one tool's logic,
free of argparse; `imgfs.commands` is the CLI glue that calls them."""
