"""Target plugins, one per runtime (see ``common.TARGETS``), and target profiles."""
