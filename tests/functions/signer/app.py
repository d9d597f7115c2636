"""Signs a request with the credentials the function was given, by hand (SigV4, stdlib
only: the image has no SDK), for tests/sandbox_e2e/identity.rs, which checks the
signature with botocore on the host."""
import hashlib
import hmac
import os

HOST = "sts.amazonaws.com"
QUERY = "Action=GetCallerIdentity&Version=2011-06-15"


def _hmac(key, text):
    return hmac.new(key, text.encode(), hashlib.sha256).digest()


def sign(event, context):
    key = os.environ["AWS_ACCESS_KEY_ID"]
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    token = os.environ.get("AWS_SESSION_TOKEN")
    region = os.environ["AWS_REGION"]
    amz_date = event["amz_date"]
    headers = {"host": HOST, "x-amz-date": amz_date}
    if token:
        headers["x-amz-security-token"] = token
    signed = ";".join(sorted(headers))
    canonical = "\n".join([
        "GET", "/", QUERY,
        "".join(f"{k}:{headers[k]}\n" for k in sorted(headers)),
        signed,
        hashlib.sha256(b"").hexdigest(),
    ])
    scope = f"{amz_date[:8]}/{region}/sts/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope,
                         hashlib.sha256(canonical.encode()).hexdigest()])
    k = _hmac(("AWS4" + secret).encode(), amz_date[:8])
    for part in (region, "sts", "aws4_request"):
        k = _hmac(k, part)
    signature = hmac.new(k, to_sign.encode(), hashlib.sha256).hexdigest()
    return {
        "authorization": f"AWS4-HMAC-SHA256 Credential={key}/{scope}, "
                         f"SignedHeaders={signed}, Signature={signature}",
        "region": region,
        "arn": context.invoked_function_arn,
    }


def report(event, context):
    """Which of the credential variables this function has, and their values' digests."""
    names = ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"]
    return {name: os.environ.get(name) is not None for name in names} | {
        "key": os.environ.get("AWS_ACCESS_KEY_ID"),
    }
