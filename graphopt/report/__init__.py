"""What the user reads about a compile: the PassManager's instruments (drift, per-pass dumps, verify) and the
dump directory's index (report.json, report.html, report.md)."""
from .html import SCHEMA, VERSION, render, write_report
from .instruments import MeasureDrift, Verify, WriteDumps, default_instruments

__all__ = ["MeasureDrift", "SCHEMA", "VERSION", "Verify", "WriteDumps", "default_instruments", "render", "write_report"]
