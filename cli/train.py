"""Placeholder: `fusedmlp train` is being implemented."""


def add_arguments(parser):
    pass


def run(args):
    raise SystemExit("fusedmlp train is not implemented yet")
