"""Stage 4, report: every model scored on validation and test, with intervals, as report.md, report.json and
report.html; the bad cases fed to the next round (feedback.py) and the toy's claims (claims.py)."""
from .write import write_report

__all__ = ["write_report"]
