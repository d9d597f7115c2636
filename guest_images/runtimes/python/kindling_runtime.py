"""Kindling's Python runtime (stdlib only).

Loads `_HANDLER` (`module.function`, the module found under LAMBDA_TASK_ROOT), then
loops over the Lambda Runtime API at AWS_LAMBDA_RUNTIME_API: fetch an event, call the
handler with a Lambda-style context, post its JSON result or its error as
{errorMessage, errorType, stackTrace}. Failures while loading the handler go to
/runtime/init/error, after which the process exits, as the Runtime API asks.
"""

import http.client
import importlib
import json
import logging
import os
import socket
import sys
import time
import traceback

API_PREFIX = "/2018-06-01/runtime"
TRACE_ENV = "_X_AMZN_TRACE_ID"


class RuntimeApiClient:
    """One keep-alive HTTP/1.1 connection to the Runtime API, with TCP_NODELAY."""

    def __init__(self, address):
        host, _, port = address.rpartition(":")
        self._host, self._port = host, int(port)
        self._conn = None

    def _connection(self):
        if self._conn is None:
            self._conn = http.client.HTTPConnection(self._host, self._port)
            self._conn.connect()
            self._conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return self._conn

    def _request(self, method, path, body=None, headers=None):
        # A keep-alive connection may have been closed by the other side while idle:
        # such a request never reached it, so it is sent once more on a new connection.
        for attempt in (1, 2):
            try:
                conn = self._connection()
                # A bytes body goes out in the same send() as the head.
                conn.request(method, API_PREFIX + path, body=body, headers=headers or {})
                resp = conn.getresponse()
                return resp.status, resp.headers, resp.read()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self._conn = None
                if attempt == 2:
                    raise

    def next(self):
        status, headers, body = self._request("GET", "/invocation/next")
        if status != 200:
            raise RuntimeError(f"/next answered {status}: {body!r}")
        return headers, body

    def _post(self, path, body, headers):
        headers = {"Content-Type": "application/json", **headers}
        status, _, answer = self._request("POST", path, body, headers)
        if status >= 300:
            # The host refused the result (e.g. too large): this invocation is lost, the
            # next one may still work.
            print(f"[ERROR] POST {path}: {status} {answer.decode(errors='replace')}",
                  file=sys.stderr)
        return status

    def response(self, request_id, body):
        return self._post(f"/invocation/{request_id}/response", body, {})

    def error(self, request_id, error):
        return self._post(f"/invocation/{request_id}/error", to_json(error),
                          {"Lambda-Runtime-Function-Error-Type": "Unhandled"})

    def init_error(self, error):
        return self._post("/init/error", to_json(error),
                          {"Lambda-Runtime-Function-Error-Type": error["errorType"]})


def to_json(value):
    return json.dumps(value).encode()


def error_body(exc, error_type=None, message=None):
    """The Lambda error JSON of an exception, with its traceback as a list of lines."""
    frames = traceback.extract_tb(exc.__traceback__)
    return {
        "errorMessage": str(exc) if message is None else message,
        "errorType": error_type or type(exc).__name__,
        "stackTrace": traceback.format_list(frames),
    }


def log_error(error):
    print(f"[ERROR] {error['errorType']}: {error['errorMessage']}", file=sys.stderr)
    for line in error.get("stackTrace", []):
        print(line.rstrip("\n"), file=sys.stderr)


class CognitoIdentity:
    def __init__(self, data):
        self.cognito_identity_id = data.get("cognitoIdentityId")
        self.cognito_identity_pool_id = data.get("cognitoIdentityPoolId")


class Client:
    def __init__(self, data):
        self.installation_id = data.get("installation_id")
        self.app_title = data.get("app_title")
        self.app_version_name = data.get("app_version_name")
        self.app_version_code = data.get("app_version_code")
        self.app_package_name = data.get("app_package_name")


class ClientContext:
    def __init__(self, data):
        self.client = Client(data["client"]) if data.get("client") else None
        self.custom = data.get("custom")
        self.env = data.get("env")


def parse_json_header(headers, name):
    raw = headers.get(name)
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return None


class LambdaContext:
    """The context object of the AWS Python runtime, with the same attribute names."""

    def __init__(self, headers):
        env = os.environ
        self.aws_request_id = headers.get("Lambda-Runtime-Aws-Request-Id")
        self.invoked_function_arn = headers.get("Lambda-Runtime-Invoked-Function-Arn")
        self.function_name = env.get("AWS_LAMBDA_FUNCTION_NAME")
        self.function_version = env.get("AWS_LAMBDA_FUNCTION_VERSION")
        # A string, as in AWS's own runtime.
        self.memory_limit_in_mb = env.get("AWS_LAMBDA_FUNCTION_MEMORY_SIZE")
        self.log_group_name = env.get("AWS_LAMBDA_LOG_GROUP_NAME")
        self.log_stream_name = env.get("AWS_LAMBDA_LOG_STREAM_NAME")
        self.tenant_id = headers.get("Lambda-Runtime-Aws-Tenant-Id")
        identity = parse_json_header(headers, "Lambda-Runtime-Cognito-Identity")
        self.identity = CognitoIdentity(identity) if identity else None
        client_context = parse_json_header(headers, "Lambda-Runtime-Client-Context")
        self.client_context = ClientContext(client_context) if client_context else None
        self._deadline_ms = int(headers.get("Lambda-Runtime-Deadline-Ms") or 0)

    def get_remaining_time_in_millis(self):
        return max(0, self._deadline_ms - int(time.time() * 1000))


def set_trace_id(value):
    """Expose the invocation's trace id as os.environ['_X_AMZN_TRACE_ID'].

    The ordinary `os.environ[k] = v` calls setenv(3), and glibc keeps every value ever
    set, so a runtime living across many invocations would grow by one string each time.
    The value is kept in Python's view of the environment only; child processes started
    with os.environ as their environment still see it.
    """
    data = getattr(os.environ, "_data", None)
    if data is None:  # not CPython's os._Environ: fall back to the ordinary way
        if value is None:
            os.environ.pop(TRACE_ENV, None)
        else:
            os.environ[TRACE_ENV] = value
        return
    key = os.environ.encodekey(TRACE_ENV)
    if value is None:
        data.pop(key, None)
    else:
        data[key] = os.environ.encodevalue(value)


class RequestIdFilter(logging.Filter):
    """Adds the request id in flight to log records, as Lambda's log format shows it."""

    request_id = ""

    def filter(self, record):
        record.aws_request_id = RequestIdFilter.request_id
        return True


def install_logging():
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(
        "[%(levelname)s]\t%(asctime)s.%(msecs)03dZ\t%(aws_request_id)s\t%(message)s",
        "%Y-%m-%dT%H:%M:%S"))
    handler.formatter.converter = time.gmtime
    handler.addFilter(RequestIdFilter())
    logging.getLogger().addHandler(handler)


def load_handler(spec, task_root):
    """Imports `module.function` and returns the function, or raises TypedError."""
    module_name, sep, function_name = spec.rpartition(".")
    if not sep or not module_name or not function_name:
        raise TypedError("Runtime.MalformedHandlerName",
                        f"Bad handler '{spec}': not enough values to unpack (expected 2, got 1)")
    if task_root not in sys.path:
        sys.path.insert(0, task_root)
    module_name = module_name.replace("/", ".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise TypedError("Runtime.ImportModuleError",
                        f"Unable to import module '{module_name}': {e}") from e
    except SyntaxError as e:
        raise TypedError("Runtime.UserCodeSyntaxError", f"Syntax error in module '{module_name}': {e}") from e
    handler = getattr(module, function_name, None)
    if handler is None:
        raise TypedError("Runtime.HandlerNotFound",
                        f"Handler '{function_name}' missing on module '{module_name}'")
    return handler


class TypedError(Exception):
    """A failure with its Lambda error type (`Runtime.ImportModuleError`, ...)."""

    def __init__(self, error_type, message):
        super().__init__(message)
        self.error_type = error_type


def invoke(client, handler, headers, body):
    request_id = headers.get("Lambda-Runtime-Aws-Request-Id")
    set_trace_id(headers.get("Lambda-Runtime-Trace-Id"))
    RequestIdFilter.request_id = request_id
    try:
        try:
            event = json.loads(body) if body else None
        except ValueError as e:
            raise TypedError("Runtime.UnmarshalError", f"Unable to unmarshal input: {e}") from e
        result = handler(event, LambdaContext(headers))
        try:
            payload = to_json(result)
        except (TypeError, ValueError) as e:
            raise TypedError("Runtime.MarshalError", f"Unable to marshal response: {e}") from e
    except Exception as e:  # any failure of the function becomes its error result
        error = error_body(e, getattr(e, "error_type", None))
        log_error(error)
        client.error(request_id, error)
    else:
        client.response(request_id, payload)
    finally:
        RequestIdFilter.request_id = ""


def main():
    client = RuntimeApiClient(os.environ["AWS_LAMBDA_RUNTIME_API"])
    install_logging()
    try:
        handler = load_handler(os.environ.get("_HANDLER", ""),
                               os.environ.get("LAMBDA_TASK_ROOT", "/var/task"))
    except Exception as e:  # anything the function's module raises while loading
        error = error_body(e, getattr(e, "error_type", None))
        log_error(error)
        client.init_error(error)
        sys.exit(1)
    while True:
        headers, body = client.next()
        invoke(client, handler, headers, body)


if __name__ == "__main__":
    main()
