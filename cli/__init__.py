"""The ``fusedmlp`` command line: ``train`` (the main job), ``bench`` and ``verify``."""
