"""Powertools for AWS Lambda's API Gateway resolvers, as their users write them: `http` for
an HTTP API or a function URL (payload format 2.0), `rest` for a REST API (format 1.0).
The tests bundle the aws_lambda_powertools package beside this file, as a zip would."""

import json

from aws_lambda_powertools.event_handler import (
    APIGatewayHttpResolver,
    APIGatewayRestResolver,
    Response,
)

http_app = APIGatewayHttpResolver()
rest_app = APIGatewayRestResolver()


def routes(app, kind):
    @app.get("/items/<item>")
    def get_item(item):
        event = app.current_event
        return {
            "resolver": kind,
            "item": item,
            "q": event.get_query_string_value("q"),
            "agent": event.get_header_value("user-agent"),
        }

    @app.post("/items")
    def post_item():
        return Response(
            status_code=201,
            content_type="application/json",
            body=json.dumps({"resolver": kind, "posted": app.current_event.json_body}),
        )


routes(http_app, "http")
routes(rest_app, "rest")


def http(event, context):
    return http_app.resolve(event, context)


def rest(event, context):
    return rest_app.resolve(event, context)
