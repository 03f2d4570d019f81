"""Built-in passes, one per file; each registers itself with :func:`sparsec.registry.register_pass`."""
