"""A module that fails while it is imported (the function's init phase)."""
raise RuntimeError("no configuration for this stage")


def handler(event, context):
    return "never"
