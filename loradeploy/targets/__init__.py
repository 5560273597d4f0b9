"""What every runtime's exporter implements (:mod:`.common`: the ``Target`` contract), and the
built-in profile YAMLs (``profiles/``, read by :mod:`loradeploy.profile`). The exporters
themselves live in their runtime's folder, ``loradeploy/plugins/<rt>/``."""
