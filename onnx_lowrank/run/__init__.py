"""One compression run: its stages and the records they pass on, the rank modes, `inspect`, and the parts of
the report the stages assemble."""
