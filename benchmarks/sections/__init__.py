"""One module per section of the report; each has `run(bench) -> list[Section]`."""
