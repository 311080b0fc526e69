"""domubackup: keep a replica of each running DomU's disks on a peer Dom0."""

__version__ = "0.1.0"
