"""Placeholder: being implemented."""


def SGD(*args, **kwargs):
    raise NotImplementedError("SGD is not implemented yet")
