"""The modules the three scripts are built from, one concern each (see docs/code-layout.md)."""
