"""Pipeline stages of skystack, one module per stage (see docs/architecture.md)."""
