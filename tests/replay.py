"""A runner that answers read-only probes from captured tool outputs (fixtures/tools)."""

from domubackup.hosts.runner import Runner


class ReplayRunner(Runner):
    """Answers argv tuples from a table {argv: (exit_code, stdout, stderr)}; anything else fails
    the test: a probe must never run a command that is not in the table."""

    def __init__(self, table, host="dom0a"):
        super().__init__(host)
        self.table = {tuple(k): v for k, v in table.items()}
        self.calls = []

    def _execute(self, argv, env, input, timeout):
        self.calls.append(argv)
        assert env["LC_ALL"] == "C"
        if argv not in self.table:
            raise AssertionError(f"unexpected command {argv}")
        return self.table[argv]
