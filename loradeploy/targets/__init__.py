"""Target plugins, one per runtime (see ``loradeploy.registry``), and the built-in profile YAMLs
(``profiles/``, read by :mod:`loradeploy.profile`)."""
