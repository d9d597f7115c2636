"""Handlers for tests/sandbox_e2e/python_ric.rs, run by awslambdaric: an answer with what
the client's context holds, and a failure with a type of its own."""
import platform


class PaymentDeclined(Exception):
    pass


def answers(event, context):
    return {
        "event": event,
        "requestId": context.aws_request_id,
        "functionName": context.function_name,
        "arn": context.invoked_function_arn,
        "remainingOk": 0 < context.get_remaining_time_in_millis() <= 20_000,
        "python": platform.python_version(),
        "runtime": type(context).__module__,
    }


def _charge(card):
    raise PaymentDeclined(f"declined: {card}")


def fails(event, context):
    _charge(event["card"])
