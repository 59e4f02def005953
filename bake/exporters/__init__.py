"""Exporters: plan + model → files. They never fold; they write what the passes left in memory.
Every exporter writes into a staging directory (`staging.staged`) that replaces `--out` when complete."""

from __future__ import annotations

from .staging import check_file_out, check_out, clear_stale, staged

__all__ = ["check_file_out", "check_out", "clear_stale", "staged"]
