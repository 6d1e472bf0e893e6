"""Placeholder: being implemented."""


def Softmax(*args, **kwargs):
    raise NotImplementedError("Softmax is not implemented yet")


def LogSoftmax(*args, **kwargs):
    raise NotImplementedError("LogSoftmax is not implemented yet")
