"""Figures and the report page, drawn from the tables (no torch)."""
