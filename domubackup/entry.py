"""The `domubackup` program. The helpers that a run executes on either Dom0 (``mount-in``,
``umount-in``, ``read-in``: see safepath) start without importing the rest of the tool
(libvirt, lxml, the CLI: about 2 s under the lab's emulation, 0.2 s without them)."""

import sys


def main() -> int:
    from . import safepath

    if len(sys.argv) > 1 and sys.argv[1] in safepath.COMMANDS:
        return safepath.main(sys.argv[1:])
    from .cli import main as cli_main

    return cli_main()
