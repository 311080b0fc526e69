"""The freeze window's vocabulary: its modes, settings, report, and the argvs it journals.
Pure; jobs/freeze.py runs the window (see its docstring for the rules)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from . import errors

MODES = ("none", "agent", "hooks", "hooks+agent")  # config.consistency
POLICIES = ("fail", "continue")  # config.freeze_on_failure
DEFAULT_HOOK_DIR = "/etc/domubackup/freeze.d"

# Names skipped in the hook directory (like run-parts: editor and package-manager leftovers).
SKIP_SUFFIXES = ("~", ".disabled")
SKIP_INFIXES = (".dpkg-",)  # .dpkg-old, .dpkg-dist, .dpkg-new, .dpkg-tmp, ...

TAIL_LINES = 10
TAIL_CHARS = 2000


@dataclass(frozen=True)
class FreezeSettings:
    mode: str = "none"
    hook_dir: str = DEFAULT_HOOK_DIR
    hook_timeout: float = 30  # seconds, per script and phase
    max_window: float = 10  # seconds, freeze done -> thaw done, enforced by the watchdog
    agent_timeout: int = 10  # seconds, virDomain.agentSetResponseTimeout
    agent_mountpoints: tuple[str, ...] = ()  # empty: all guest filesystems
    on_failure: str = "fail"  # fail | continue

    def __post_init__(self):
        if self.mode not in MODES:
            raise errors.ConfigError(f"freeze mode {self.mode!r} is unknown",
                                     hint="use one of " + ", ".join(MODES))
        if self.on_failure not in POLICIES:
            raise errors.ConfigError(f"freeze on_failure {self.on_failure!r} is unknown",
                                     hint="use one of " + ", ".join(POLICIES))
        for name in ("hook_timeout", "max_window", "agent_timeout"):
            if not getattr(self, name) > 0:
                raise errors.ConfigError(f"freeze {name} must be > 0, not {getattr(self, name)!r}")
        object.__setattr__(self, "agent_mountpoints", tuple(self.agent_mountpoints))

    @property
    def uses_hooks(self) -> bool:
        return self.mode in ("hooks", "hooks+agent")

    @property
    def uses_agent(self) -> bool:
        return self.mode in ("agent", "hooks+agent")


@dataclass
class HookResult:
    name: str
    phase: str  # freeze | thaw
    exit_code: int | None  # None: timed out or could not be started
    duration: float  # seconds
    output_tail: str = ""
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


@dataclass
class FreezeReport:
    domu: str
    mode: str
    on_failure: str = "fail"
    level: str = "crash"  # crash | filesystem | application
    window_ms: int | None = None  # freeze done -> thaw done
    hooks: list[HookResult] = field(default_factory=list)
    skipped_hooks: list[str] = field(default_factory=list)  # "NAME: reason"
    agent_frozen: int | None = None  # filesystems fsFreeze reported
    agent_thawed: int | None = None  # filesystems fsThaw reported
    watchdog_fired: bool = False
    freeze_failed: bool = False
    thaw_failed: bool = False
    error: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def summary(self) -> str:
        what = []
        hooks_ok = sum(1 for h in self.hooks if h.phase == "freeze" and h.ok)
        if hooks_ok:
            what.append(f"{hooks_ok} hook(s)")
        if self.agent_frozen:
            what.append(f"{self.agent_frozen} filesystem(s) via agent")
        text = f"{self.domu}: {self.level}-consistent (mode {self.mode}"
        text += (": " + ", ".join(what) + ")") if what and not self.freeze_failed else ")"
        if self.window_ms is not None:
            text += f", frozen {self.window_ms} ms"
        if self.watchdog_fired:
            text += "; watchdog thawed the guest"
        if self.freeze_failed:
            text += f"; freeze failed ({self.error}), " + (
                "went on crash-consistent" if self.on_failure == "continue" else "run failed")
        elif self.error:
            text += f"; FAILED: {self.error}"
        if self.thaw_failed:
            text += "; THAW FAILED: guest may still be frozen, run `domubackup cleanup`"
        return text

    def to_json(self) -> dict:
        data = dataclasses.asdict(self)
        data["summary"] = self.summary
        return data


# --- argv builders (pure; the undo argvs go to the close journal) ---------------------------

def hook_argv(domu: str, script, phase: str) -> list[str]:
    """How a hook is run: ``env`` carries the variables, so the journaled undo runs the same way."""
    if phase not in ("freeze", "thaw"):
        raise ValueError(f"hook phase must be freeze or thaw, not {phase!r}")
    return ["env", f"DOMUBACKUP_DOMU={domu}", f"DOMUBACKUP_PHASE={phase}", str(script), phase]


def hook_undo_argv(domu: str, script) -> list[str]:
    return hook_argv(domu, script, "thaw")


def agent_freeze_argv(uri: str, domu: str, mountpoints=()) -> list[str]:
    """The virsh equivalent of the agent freeze (recorded in the journal; not run)."""
    return ["virsh", "-c", uri, "domfsfreeze", domu, *(w for m in mountpoints for w in ("--mountpoint", m))]


def agent_undo_argv(uri: str, domu: str) -> list[str]:
    return ["virsh", "-c", uri, "domfsthaw", domu]
