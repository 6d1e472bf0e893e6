"""Placeholder: being implemented."""


def Linear(*args, **kwargs):
    raise NotImplementedError("Linear is not implemented yet")


def LinearReLU(*args, **kwargs):
    raise NotImplementedError("LinearReLU is not implemented yet")
