"""Placeholder: `fusedmlp bench` is being implemented."""


def add_arguments(parser):
    pass


def run(args):
    raise SystemExit("fusedmlp bench is not implemented yet")
