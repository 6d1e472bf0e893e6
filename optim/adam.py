"""Placeholder: being implemented."""


def Adam(*args, **kwargs):
    raise NotImplementedError("Adam is not implemented yet")


def AdamW(*args, **kwargs):
    raise NotImplementedError("AdamW is not implemented yet")
