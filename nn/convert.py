"""Placeholder: being implemented."""


def convert(*args, **kwargs):
    raise NotImplementedError("convert is not implemented yet")
