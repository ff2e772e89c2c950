"""Serving an export: ``exported`` loads it, ``predict`` (``hrnet predict``) classifies files
with it, ``server`` (``hrnet serve``) puts it behind KServe's model server."""
