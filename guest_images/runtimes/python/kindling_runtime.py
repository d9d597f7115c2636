"""Kindling's Python runtime (stdlib only), behaving as AWS's awslambdaric does.

Loads `_HANDLER` (`module.function`, the module found under LAMBDA_TASK_ROOT; a deeper
`module.attr.function` is found through the module's attributes), then loops over the
Lambda Runtime API at AWS_LAMBDA_RUNTIME_API: fetch an event, call the handler with a
Lambda-style context, post its JSON result (a `bytes` result as it is) or its error as
{errorMessage, errorType, requestId, stackTrace}, the stack trace holding the function's
frames only. Failures while loading the handler go to /runtime/init/error, after which
the process exits, as the Runtime API asks.
"""

import _socket
import json
import os
import sys
import time

API_PREFIX = "/2018-06-01/runtime"
TRACE_ENV = "_X_AMZN_TRACE_ID"
# Frames of this file lead every traceback: error results leave them out.
RUNTIME_FILE = os.path.abspath(__file__)
# Bounds on what the Runtime API's answers may hold before the runtime gives up on them.
MAX_LINE = 64 << 10
MAX_HEADERS = 100


class Headers(dict):
    """Response headers by case-insensitive name (the last of a repeated one wins)."""

    def get(self, name, default=None):
        return super().get(name.lower(), default)


class Connection:
    """A TCP connection (TCP_NODELAY) with the buffered reads an HTTP client needs.

    Built on the interpreter's `_socket`: the `socket` module wraps it in enums and
    `selectors`, a tenth of a python function's cold start, for nothing used here.
    """

    def __init__(self, host, port):
        self._buffer = bytearray()
        self._sock = None
        failure = None
        for family, kind, proto, _, address in _socket.getaddrinfo(
                host, port, 0, _socket.SOCK_STREAM):
            sock = _socket.socket(family, kind, proto)
            try:
                sock.connect(address)
            except OSError as e:
                sock.close()
                failure = e
                continue
            sock.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, 1)
            self._sock = sock
            return
        raise failure or ConnectionError(f"{host}:{port} has no address")

    def close(self):
        self._sock.close()

    def sendall(self, data):
        self._sock.sendall(data)

    def _fill(self, wanted=0):
        """Reads what has arrived (up to `wanted` bytes at once, between 64 KiB and 1 MiB)
        into the buffer; False at the end of the stream."""
        data = self._sock.recv(min(max(wanted, 1 << 16), 1 << 20))
        self._buffer += data
        return bool(data)

    def _take(self, size):
        data = bytes(self._buffer[:size])
        del self._buffer[:size]
        return data

    def readline(self, limit):
        """The next line with its b"\\n", at most `limit` bytes (shorter at the end)."""
        while (end := self._buffer.find(b"\n", 0, limit)) < 0:
            if len(self._buffer) >= limit or not self._fill():
                return self._take(limit)
        return self._take(end + 1)

    def read(self, size=None):
        """`size` bytes (fewer at the end of the stream), or everything until the end."""
        while (size is None or len(self._buffer) < size) and self._fill(
                0 if size is None else size - len(self._buffer)):
            pass
        return self._take(len(self._buffer) if size is None else size)


class RuntimeApiClient:
    """One keep-alive HTTP/1.1 connection to the Runtime API.

    It speaks only the HTTP/1.1 the Runtime API answers with (Content-Length or chunked
    bodies), on a plain socket: `http.client` would import `ssl` and the `email` package
    first, about a third of a python function's cold start.
    """

    def __init__(self, address):
        host, _, port = address.rpartition(":")
        self._address = (host, int(port))
        self._host_header = f"Host: {address}\r\n".encode()
        self._conn = None

    def _connect(self):
        if self._conn is None:
            self._conn = Connection(*self._address)

    def _close(self):
        if self._conn is not None:
            self._conn.close()
        self._conn = None

    def _request(self, method, path, body=None, headers=None):
        head = [f"{method} {API_PREFIX}{path} HTTP/1.1\r\n".encode(), self._host_header]
        for name, value in (headers or {}).items():
            head.append(f"{name}: {value}\r\n".encode("latin-1"))
        if body is not None:
            head.append(f"Content-Length: {len(body)}\r\n".encode())
        # The head and a body go out in one send().
        message = b"".join(head) + b"\r\n" + (body or b"")
        # A keep-alive connection may have been closed by the other side while idle:
        # such a request never reached it, so it is sent once more on a new connection.
        for attempt in (1, 2):
            try:
                self._connect()
                self._conn.sendall(message)
                return self._read_response()
            except ConnectionError:
                self._close()
                if attempt == 2:
                    raise

    def _line(self):
        line = self._conn.readline(MAX_LINE + 1)
        if not line:
            raise ConnectionResetError("the Runtime API closed the connection")
        if len(line) > MAX_LINE or not line.endswith(b"\r\n"):
            raise ValueError("the Runtime API sent a line too long or cut short")
        return line[:-2]

    def _read_response(self):
        version, _, rest = self._line().partition(b" ")
        if not version.startswith(b"HTTP/1."):
            raise ValueError(f"the Runtime API answered {version[:40]!r}, not HTTP/1.x")
        status = int(rest[:3])
        headers = Headers()
        while line := self._line():
            if len(headers) == MAX_HEADERS:
                raise ValueError("the Runtime API sent too many headers")
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        if "chunked" in headers.get("Transfer-Encoding", "").lower():
            body = self._read_chunked()
        elif status in (204, 304) or status < 200:
            body = b""
        elif "content-length" in headers:
            body = self._read_exactly(int(headers["content-length"]))
        else:
            body = self._conn.read()
            self._close()
        if headers.get("Connection", "").lower() == "close":
            self._close()
        return status, headers, body

    def _read_exactly(self, size):
        data = self._conn.read(size)
        if len(data) != size:
            raise ConnectionResetError("the Runtime API closed the connection mid-body")
        return data

    def _read_chunked(self):
        chunks = []
        while size := int(self._line().partition(b";")[0], 16):
            chunks.append(self._read_exactly(size))
            self._line()
        while self._line():  # trailers, up to the empty line
            pass
        return b"".join(chunks)

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

    def response(self, request_id, body, content_type):
        return self._post(f"/invocation/{request_id}/response", body,
                          {"Content-Type": content_type})

    def error(self, request_id, error):
        return self._post(f"/invocation/{request_id}/error", to_json(error),
                          {"Lambda-Runtime-Function-Error-Type": "Unhandled"})

    def init_error(self, error):
        return self._post("/init/error", to_json(error),
                          {"Lambda-Runtime-Function-Error-Type": error["errorType"]})


def to_json(value):
    return json.dumps(value).encode()


def marshal(result):
    """The response body and its content type: `bytes` go as they are, as in awslambdaric."""
    if isinstance(result, bytes):
        return result, "application/unknown"
    try:
        return to_json(result), "application/json"
    except (TypeError, ValueError) as e:
        raise TypedError("Runtime.MarshalError", f"Unable to marshal response: {e}") from e


def error_body(exc, request_id=""):
    """The Lambda error JSON of an exception. The runtime's own frames are left out of the
    stack trace, as AWS's runtime leaves out its own; a TypedError has none of the
    function's frames, only the trace it carries."""
    if isinstance(exc, TypedError):
        error_type, trace = exc.error_type, exc.trace
    else:
        import traceback  # only errors need it: not on every cold start

        frames = traceback.extract_tb(exc.__traceback__)
        while frames and os.path.abspath(frames[0].filename) == RUNTIME_FILE:
            frames.pop(0)
        error_type, trace = type(exc).__name__, traceback.format_list(frames)
    return {
        "errorMessage": str(exc),
        "errorType": error_type,
        "requestId": request_id,
        "stackTrace": trace,
    }


def log_error(error):
    lines = [f"[ERROR] {error['errorType']}: {error['errorMessage']}",
             "Traceback (most recent call last):"]
    lines += [line.rstrip("\n") for line in error["stackTrace"]]
    print("\n".join(lines), file=sys.stderr)


class CognitoIdentity:
    """`context.identity`: always there, its ids None unless the caller sent them."""

    __slots__ = ["cognito_identity_id", "cognito_identity_pool_id"]

    def __init__(self, data):
        self.cognito_identity_id = data.get("cognitoIdentityId")
        self.cognito_identity_pool_id = data.get("cognitoIdentityPoolId")

    def __repr__(self):
        return (f"CognitoIdentity([cognito_identity_id={self.cognito_identity_id},"
                f"cognito_identity_pool_id={self.cognito_identity_pool_id}])")


class Client:
    __slots__ = ["installation_id", "app_title", "app_version_name", "app_version_code",
                 "app_package_name"]

    def __init__(self, data):
        for field in self.__slots__:
            setattr(self, field, data.get(field))


class ClientContext:
    """`context.client_context`, None when the caller sent none."""

    __slots__ = ["custom", "env", "client"]

    def __init__(self, data):
        self.custom = data.get("custom")
        self.env = data.get("env")
        self.client = Client(data["client"]) if data.get("client") is not None else None


def parse_json_header(headers, header, what):
    raw = headers.get(header)
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError as e:
        raise TypedError("Runtime.LambdaContextUnmarshalError",
                         f"Unable to parse {what} JSON: {e}") from e


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
        client_context = parse_json_header(headers, "Lambda-Runtime-Client-Context",
                                           "Client Context")
        self.client_context = ClientContext(client_context) if client_context is not None else None
        identity = parse_json_header(headers, "Lambda-Runtime-Cognito-Identity",
                                     "Cognito Identity")
        self.identity = CognitoIdentity(identity or {})
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


class InFlight:
    """The invocation in flight, whose request id log records carry."""

    request_id = ""


def add_request_id(record):
    """A log filter: adds the request id in flight, as Lambda's log format shows it."""
    record.aws_request_id = InFlight.request_id
    return True


def install_log_format(logging):
    """Gives the root logger Lambda's format: `[LEVEL]\ttime\trequest id\tmessage`."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(
        "[%(levelname)s]\t%(asctime)s.%(msecs)03dZ\t%(aws_request_id)s\t%(message)s",
        "%Y-%m-%dT%H:%M:%S"))
    handler.formatter.converter = time.gmtime
    handler.addFilter(add_request_id)
    logging.getLogger().addHandler(handler)


class LogFormatOnImport:
    """Installs Lambda's log format the moment `logging` is first imported, by the function
    or any library it uses, instead of importing `logging` on every cold start (a tenth of
    a python function's): a finder first on `sys.meta_path` that wraps the loader of
    `logging` once, then steps aside. The function sees the same root logger either way."""

    def find_spec(self, name, path=None, target=None):
        if name != "logging":
            return None
        sys.meta_path.remove(self)
        for finder in sys.meta_path:
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = LogFormatLoader(spec.loader)
                return spec
        return None


class LogFormatLoader:
    """The loader of `logging`, which installs Lambda's log format once it has run."""

    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        module.__spec__.loader = module.__loader__ = self.loader
        self.loader.exec_module(module)
        install_log_format(module)


def install_logging():
    if "logging" in sys.modules:
        install_log_format(sys.modules["logging"])
    else:
        sys.meta_path.insert(0, LogFormatOnImport())


def set_default_sys_path(task_root):
    """Lambda's import order: the code, then its layers' packages (as awslambdaric sets it):
    /var/task, /opt/python/lib/pythonN.N/site-packages, /opt/python."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for path in reversed([task_root, f"/opt/python/lib/{version}/site-packages", "/opt/python"]):
        if path in sys.path:
            sys.path.remove(path)
        sys.path.insert(0, path)


def load_handler(spec, task_root):
    """Imports `module.function` and returns the function, or raises TypedError.

    As in awslambdaric, the module is everything before the last dot. When that is not a
    module (`app.nested.deep` with `nested` an object in app.py), the longest prefix that
    is one is imported and the rest is walked as attributes.
    """
    module_name, sep, function_name = spec.rpartition(".")
    if not sep or not module_name or not function_name:
        raise TypedError("Runtime.MalformedHandlerName",
                         f"Bad handler '{spec}': not enough values to unpack (expected 2, got 1)")
    set_default_sys_path(task_root)
    parts = module_name.replace("/", ".").split(".")
    for cut in range(len(parts), 0, -1):
        name = ".".join(parts[:cut])
        try:
            # What importlib.import_module does for an absolute name, without importing
            # importlib on every cold start.
            __import__(name)
            module = sys.modules[name]
            break
        except ModuleNotFoundError as e:
            # Only the absence of `name` or of a package above it lets a shorter prefix
            # be tried: a module that exists and fails to import is the function's error.
            if cut > 1 and (name == e.name or name.startswith(f"{e.name}.")):
                continue
            raise TypedError("Runtime.ImportModuleError",
                             f"Unable to import module '{module_name}': {e}") from e
        except ImportError as e:
            raise TypedError("Runtime.ImportModuleError",
                             f"Unable to import module '{module_name}': {e}") from e
        except SyntaxError as e:
            raise TypedError("Runtime.UserCodeSyntaxError",
                             f"Syntax error in module '{module_name}': {e}",
                             [f'  File "{e.filename}" Line {e.lineno}\n    {e.text}']) from e
    handler = module
    for attribute in parts[cut:] + [function_name]:
        handler = getattr(handler, attribute, None)
    if handler is None:
        missing = ".".join(parts[cut:] + [function_name])
        raise TypedError("Runtime.HandlerNotFound",
                         f"Handler '{missing}' missing on module '{name}'")
    return handler


class TypedError(Exception):
    """A failure with its Lambda error type (`Runtime.ImportModuleError`, ...) and the
    stack trace it reports (none of the runtime's frames)."""

    def __init__(self, error_type, message, trace=None):
        super().__init__(message)
        self.error_type = error_type
        self.trace = trace or []


def invoke(client, handler, headers, body):
    request_id = headers.get("Lambda-Runtime-Aws-Request-Id")
    set_trace_id(headers.get("Lambda-Runtime-Trace-Id"))
    InFlight.request_id = request_id
    try:
        context = LambdaContext(headers)
        try:
            event = json.loads(body) if body else None
        except ValueError as e:
            raise TypedError("Runtime.UnmarshalError", f"Unable to unmarshal input: {e}") from e
        payload, content_type = marshal(handler(event, context))
    except Exception as e:  # any failure of the function becomes its error result
        error = error_body(e, request_id)
        log_error(error)
        client.error(request_id, error)
    else:
        client.response(request_id, payload, content_type)
    finally:
        InFlight.request_id = ""


def main():
    client = RuntimeApiClient(os.environ["AWS_LAMBDA_RUNTIME_API"])
    install_logging()
    try:
        handler = load_handler(os.environ.get("_HANDLER", ""),
                               os.environ.get("LAMBDA_TASK_ROOT", "/var/task"))
    except Exception as e:  # anything the function's module raises while loading
        error = error_body(e)
        log_error(error)
        client.init_error(error)
        sys.exit(1)
    while True:
        headers, body = client.next()
        invoke(client, handler, headers, body)


if __name__ == "__main__":
    main()
