"""The environment every command gets, on either host (tiny: `domubackup serve` imports it)."""

import re

BASE_ENV = {"LC_ALL": "C", "LANG": "C", "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "LVM_SUPPRESS_FD_WARNINGS": "1"}

ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
