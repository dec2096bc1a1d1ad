"""pipeline.watch.summary: what a watch run did, as a table, as JSON, and as an exit code.

Exit codes, for schedulers (cron, systemd, CI):

====  ==================================================================================
0     the run finished and found nothing new (no site failed)
3     the run finished with new findings (no site failed)
4     some sites failed (they are retried next run; the others ran); no new findings
5     some sites failed, and others have new findings
2     configuration error: bad sites file, config or option; nothing ran
1     the run could not start (another run holds the lock, the data folder is unwritable)
====  ==================================================================================
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["SiteReport", "WatchSummary", "format_table", "EXIT_NOTHING_NEW",
           "EXIT_NEW_FINDINGS", "EXIT_SITES_FAILED", "EXIT_NEW_AND_FAILED", "EXIT_CONFIG",
           "EXIT_CANNOT_START"]

EXIT_NOTHING_NEW = 0
EXIT_CANNOT_START = 1
EXIT_CONFIG = 2
EXIT_NEW_FINDINGS = 3
EXIT_SITES_FAILED = 4
EXIT_NEW_AND_FAILED = 5


@dataclass
class SiteReport:
    """One site's part of a run. ``status``: ``ok``, ``failed`` or ``not due``."""

    site_id: str
    name: str
    status: str = "not due"
    new_imagery: int = 0
    analyses: int = 0
    adopted: int = 0
    unusable: int = 0
    new_findings: list[str] = field(default_factory=list)
    continued_findings: list[str] = field(default_factory=list)
    run_dirs: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class WatchSummary:
    """A whole run: per-site reports and the new findings (id, site, kind, score, where)."""

    run_id: int
    started_utc: str
    finished_utc: str
    state_path: str
    scheduler: str
    sites: list[SiteReport]
    new_findings: list[dict[str, Any]] = field(default_factory=list)
    stale_lock_pid: int | None = None
    warnings: list[dict[str, Any]] = field(default_factory=list)  # {kind, message, count}

    @property
    def failed(self) -> list[SiteReport]:
        """Sites that failed this run."""
        return [s for s in self.sites if s.status == "failed"]

    @property
    def exit_code(self) -> int:
        """0 nothing new, 3 new findings, 4 sites failed, 5 both (see the module docstring)."""
        if self.failed:
            return EXIT_NEW_AND_FAILED if self.new_findings else EXIT_SITES_FAILED
        return EXIT_NEW_FINDINGS if self.new_findings else EXIT_NOTHING_NEW

    def totals(self) -> dict[str, int]:
        """Counts over all sites."""
        checked = [s for s in self.sites if s.status != "not due"]
        return {"sites": len(self.sites), "checked": len(checked), "failed": len(self.failed),
                "new_imagery": sum(s.new_imagery for s in self.sites),
                "analyses": sum(s.analyses for s in self.sites),
                "adopted": sum(s.adopted for s in self.sites),
                "unusable": sum(s.unusable for s in self.sites),
                "new_findings": len(self.new_findings),
                "continued_findings": sum(len(s.continued_findings) for s in self.sites)}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (what ``--json`` prints)."""
        return {"run_id": self.run_id, "started_utc": self.started_utc,
                "finished_utc": self.finished_utc, "state": self.state_path,
                "scheduler": self.scheduler, "exit_code": self.exit_code,
                "totals": self.totals(), "stale_lock_pid": self.stale_lock_pid,
                "new_findings": self.new_findings, "warnings": self.warnings,
                "sites": [asdict(s) for s in self.sites]}


def format_table(summary: WatchSummary) -> str:
    """A fixed-width table of the checked sites, a totals line, the failures and the run's
    warnings, each distinct one once with its count (for stderr)."""
    rows = [("site", "status", "new imagery", "analyses", "new findings", "seconds")]
    for s in summary.sites:
        if s.status == "not due":
            continue
        rows.append((s.name[:32], s.status, str(s.new_imagery),
                     f"{s.analyses}" + (f" ({s.adopted} resumed)" if s.adopted else ""),
                     str(len(s.new_findings)), f"{s.seconds:.1f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip()
             for r in rows]
    t = summary.totals()
    lines.append(f"{t['checked']} of {t['sites']} site(s) checked, {t['failed']} failed, "
                 f"{t['new_imagery']} new imagery, {t['analyses']} analysed, "
                 f"{t['new_findings']} new finding(s); exit {summary.exit_code}")
    for s in summary.failed:
        for error in s.errors:
            lines.append(f"failed {s.name}: {error}")
    for w in summary.warnings:
        times = f" ({w['count']} times)" if w["count"] > 1 else ""
        lines.append(f"{w['kind']}{times}: {w['message']}")
    return "\n".join(lines)
