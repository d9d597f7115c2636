"""The function `kindling bench` invokes: it does nothing, so that the numbers measure
the platform (scheduler, Runtime API, isolation), not the function."""


def handler(event, context):
    return None
