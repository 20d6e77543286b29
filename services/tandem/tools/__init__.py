"""Developer tools that are not part of any service (e.g. building the bundled tiny model)."""
