"""Command-line entry points (thin: parse, then call the library)."""
