"""One folder per runtime (``plugins/<runtime>/``): its exporter, its session, its LoRA storage
formats and its own options. A folder imports nothing of another plugin; the rest of loradeploy
reaches a plugin only through :mod:`loradeploy.registry` (module paths, loaded lazily).
"""
