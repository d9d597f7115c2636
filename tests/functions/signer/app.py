"""Signs requests with the credentials the function was given, by hand (SigV4, stdlib
only: the image has no SDK). `sign` signs an STS request at the event's time for
tests/sandbox_e2e/identity.rs, which checks the signature with botocore on the host;
`call` signs a GET of the event's `url` now and sends it, for the tests whose "internet"
(tests/common/internet.rs) holds an API that checks it."""
import hashlib
import hmac
import os
import time
import urllib.error
import urllib.parse
import urllib.request

STS_HOST = "sts.amazonaws.com"
STS_QUERY = "Action=GetCallerIdentity&Version=2011-06-15"


def _hmac(key, text):
    return hmac.new(key, text.encode(), hashlib.sha256).digest()


def _signed_headers(host, path, query, service, amz_date):
    """The headers of a GET of `host` `path?query` (query sorted) signed with the
    function's credentials: host, x-amz-date, the session token and Authorization."""
    key = os.environ["AWS_ACCESS_KEY_ID"]
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    token = os.environ.get("AWS_SESSION_TOKEN")
    region = os.environ["AWS_REGION"]
    headers = {"host": host, "x-amz-date": amz_date}
    if token:
        headers["x-amz-security-token"] = token
    signed = ";".join(sorted(headers))
    canonical = "\n".join([
        "GET", path, query,
        "".join(f"{k}:{headers[k]}\n" for k in sorted(headers)),
        signed,
        hashlib.sha256(b"").hexdigest(),
    ])
    scope = f"{amz_date[:8]}/{region}/{service}/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope,
                         hashlib.sha256(canonical.encode()).hexdigest()])
    k = _hmac(("AWS4" + secret).encode(), amz_date[:8])
    for part in (region, service, "aws4_request"):
        k = _hmac(k, part)
    signature = hmac.new(k, to_sign.encode(), hashlib.sha256).hexdigest()
    headers["authorization"] = (f"AWS4-HMAC-SHA256 Credential={key}/{scope}, "
                                f"SignedHeaders={signed}, Signature={signature}")
    return headers


def sign(event, context):
    headers = _signed_headers(STS_HOST, "/", STS_QUERY, "sts", event["amz_date"])
    return {
        "authorization": headers["authorization"],
        "region": os.environ["AWS_REGION"],
        "arn": context.invoked_function_arn,
    }


def call(event, context):
    """GETs the event's `url` (by name, through the environment's resolver), signed for
    the `execute-api` service now: the status and body the API answered."""
    url = urllib.parse.urlsplit(event["url"])
    amz_date = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    headers = _signed_headers(url.netloc, url.path or "/", url.query, "execute-api", amz_date)
    request = urllib.request.Request(event["url"], headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return {"status": answer.status, "body": answer.read().decode()}
    except urllib.error.HTTPError as e:
        return {"status": e.code, "body": e.read().decode()}


def report(event, context):
    """Which of the credential variables this function has, and their values' digests."""
    names = ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"]
    return {name: os.environ.get(name) is not None for name in names} | {
        "key": os.environ.get("AWS_ACCESS_KEY_ID"),
    }
