"""Placeholder: `fusedmlp verify` is being implemented."""


def add_arguments(parser):
    pass


def run(args):
    raise SystemExit("fusedmlp verify is not implemented yet")
