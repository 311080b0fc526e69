"""The `domubackup` program. The helpers that a run executes on either Dom0 (``mount-in``,
``umount-in``, ``read-in``: see safepath; ``receive-blocks``, ``block-digests``, ``send-blocks``,
``copy-blocks``: see blockcopy; ``thin-delta``, ``thin-base``: see thin) start without importing the rest of the tool
(libvirt, lxml, the CLI: about 2 s under the lab's emulation, 0.2 s without them)."""

import os
import sys


def main() -> int:
    if sys.argv[1:2] == ["serve"]:  # once per request of a client's key: see hosts/serve.py
        from .hosts import serve

        return serve.main(sys.argv[1:])
    if sys.argv[1:] == ["serve-session"]:  # a client's requests over one channel, no forced command
        from .hosts import serve

        return serve.session(serve.unjudged)
    if sys.argv[1:2] in (["thin-delta"], ["thin-base"]):
        from .hosts import thin

        return thin.main(sys.argv[1:])
    from .hosts import safepath

    if len(sys.argv) > 1 and sys.argv[1] in safepath.COMMANDS:
        return safepath.main(sys.argv[1:])
    from .hosts import blockcopy

    if len(sys.argv) > 1 and sys.argv[1] in blockcopy.COMMANDS:
        return blockcopy.main(sys.argv[1:])
    from .cli import main as cli_main

    try:
        return cli_main()
    except BrokenPipeError:
        # argparse's --help/--version into a closed pipe (`domubackup --help | true`): Debian
        # 12's Python 3.11.2 lets the error out of parse_args (later 3.11 releases ignore it);
        # the CLI's own output handles a closed pipe itself. Exit 0 like --help, and point
        # stdout at /dev/null so that the interpreter's last flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
