"""The handler that tests/functions/own-bootstrap/bootstrap serves."""


def handler(event, context):
    return {"served_by": "own bootstrap", "event": event}
