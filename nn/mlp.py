"""Placeholder: being implemented."""


def MLP(*args, **kwargs):
    raise NotImplementedError("MLP is not implemented yet")
