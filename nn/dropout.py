"""Placeholder: being implemented."""


def Dropout(*args, **kwargs):
    raise NotImplementedError("Dropout is not implemented yet")


def Dropout2d(*args, **kwargs):
    raise NotImplementedError("Dropout2d is not implemented yet")
