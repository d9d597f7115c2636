//! Function names as Lambda's Invoke API takes them: `name`, `name:qualifier`, partial
//! ARNs (`123456789012:function:name`) and full ARNs
//! (`arn:aws:lambda:<region>:<account>:function:name[:qualifier]`), percent-encoded in the
//! path as the SDKs send them, with an optional `?Qualifier=`.
//!
//! What Lambda refuses is refused with its errors: a name or qualifier outside Lambda's
//! patterns is 400 `ValidationException` (its "N validation errors detected" message),
//! a `:qualifier` suffix that disagrees with `?Qualifier=` is 400
//! `InvalidParameterValueException`, an ARN of another region is 404
//! `ResourceNotFoundException`. The account of an ARN is not checked: Kindling serves one
//! account whose id is a placeholder, and ARNs copied from a real account must still work.
//!
//! The one parser of function names: the Invoke API's paths, the control plane's paths
//! and `CreateFunction`'s `FunctionName` all go through it.

use std::sync::OnceLock;

use regex_lite::Regex;

/// Longest function name or ARN Invoke takes (Lambda's `NamespacedFunctionName`).
const MAX_NAME_LEN: usize = 170;
/// Longest qualifier (version or alias).
const MAX_QUALIFIER_LEN: usize = 128;
/// Lambda's pattern for Invoke's `FunctionName`, as its errors quote it.
const NAME_PATTERN: &str = r"(arn:(aws[a-zA-Z-]*)?:lambda:)?([a-z]{2}((-gov)|(-iso([a-z]?)))?-[a-z]+-\d{1}:)?(\d{12}:)?(function:)?([a-zA-Z0-9-_\.]+)(:(\$LATEST|[a-zA-Z0-9-_]+))?";
/// Lambda's pattern for `Qualifier`, as its errors quote it.
const QUALIFIER_PATTERN: &str = "(|[a-zA-Z0-9$_-]+)";

/// What a request names: a function and, when it asked for one, a version or alias.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FunctionRef {
    pub name: String,
    pub qualifier: Option<String>,
}

/// Why a request's name is refused before any function is looked up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum NameError {
    /// 400 `ValidationException`: the whole message, as Lambda words it.
    Invalid(String),
    /// 400 `InvalidParameterValueException`: `name:a` with `?Qualifier=b`.
    QualifierConflict,
    /// 404 `ResourceNotFoundException`: an ARN of another region than the server's.
    OtherRegion { theirs: String, ours: String },
}

impl NameError {
    pub fn message(&self) -> String {
        match self {
            NameError::Invalid(message) => message.clone(),
            NameError::QualifierConflict => {
                "The derived qualifier from the function name does not match the specified qualifier."
                    .to_string()
            }
            NameError::OtherRegion { theirs, ours } => {
                format!("Functions from '{theirs}' are not reachable in this region ('{ours}')")
            }
        }
    }
}

/// Reads the `{FunctionName}` path segment (still percent-encoded) and the request's
/// query, for a server in `region`.
pub(crate) fn parse(
    encoded_name: &str,
    query: Option<&str>,
    region: &str,
) -> Result<FunctionRef, NameError> {
    let name = percent_encoding::percent_decode_str(encoded_name)
        .decode_utf8_lossy()
        .into_owned();
    let asked = query.and_then(|q| {
        form_urlencoded::parse(q.as_bytes())
            .find(|(k, _)| k == "Qualifier")
            .map(|(_, v)| v.into_owned())
    });
    parse_decoded(&name, asked, region)
}

/// Reads a function name as a request body holds it (not percent-encoded), with the
/// qualifier asked for beside it, if any.
pub(crate) fn parse_decoded(
    name: &str,
    asked: Option<String>,
    region: &str,
) -> Result<FunctionRef, NameError> {
    // An empty `Qualifier=` is allowed by Lambda's pattern and asks for nothing.
    let asked = asked.filter(|q| !q.is_empty());

    // A plain name (the usual case) is its own `name` part, without the regex's search.
    let plain = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
    let parts = match plain {
        true => Some(Parts {
            region: None,
            name: name.to_string(),
            qualifier: None,
        }),
        false => name_regex().captures(name).map(|c| {
            let group = |g: &str| c.name(g).map(|m| m.as_str().to_string());
            Parts {
                region: group("region"),
                name: group("name").unwrap_or_default(),
                qualifier: group("qualifier"),
            }
        }),
    };
    let mut errors = Vec::new();
    if name.is_empty() {
        errors.push(violation(
            name,
            "functionName",
            "Member must have length greater than or equal to 1",
        ));
    }
    if name.len() > MAX_NAME_LEN {
        errors.push(violation(
            name,
            "functionName",
            &format!("Member must have length less than or equal to {MAX_NAME_LEN}"),
        ));
    }
    if parts.is_none() && !name.is_empty() {
        errors.push(violation(
            name,
            "functionName",
            &format!("Member must satisfy regular expression pattern: {NAME_PATTERN}"),
        ));
    }
    if let Some(q) = &asked {
        if q.len() > MAX_QUALIFIER_LEN {
            errors.push(violation(
                q,
                "qualifier",
                &format!("Member must have length less than or equal to {MAX_QUALIFIER_LEN}"),
            ));
        }
        if !q
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"$_-".contains(&b))
        {
            errors.push(violation(
                q,
                "qualifier",
                &format!("Member must satisfy regular expression pattern: {QUALIFIER_PATTERN}"),
            ));
        }
    }
    let parts = match (errors.len(), parts) {
        (0, Some(parts)) => parts,
        _ => {
            let plural = if errors.len() == 1 { "" } else { "s" };
            return Err(NameError::Invalid(format!(
                "{} validation error{plural} detected: {}",
                errors.len(),
                errors.join("; ")
            )));
        }
    };
    if let Some(theirs) = parts.region.filter(|r| r != region) {
        return Err(NameError::OtherRegion {
            theirs,
            ours: region.to_string(),
        });
    }
    let suffix = parts.qualifier;
    if let (Some(a), Some(b)) = (&suffix, &asked) {
        if a != b {
            return Err(NameError::QualifierConflict);
        }
    }
    Ok(FunctionRef {
        name: parts.name,
        qualifier: suffix.or(asked),
    })
}

/// The parts of a name that Kindling reads.
struct Parts {
    region: Option<String>,
    name: String,
    qualifier: Option<String>,
}

/// One violation, as Lambda's validation errors list them.
fn violation(value: &str, member: &str, constraint: &str) -> String {
    format!("Value '{value}' at '{member}' failed to satisfy constraint: {constraint}")
}

/// [`NAME_PATTERN`], anchored, with the parts Kindling reads named.
fn name_regex() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| {
        Regex::new(concat!(
            r"^(?:arn:(?:aws[a-zA-Z-]*)?:lambda:)?",
            r"(?:(?P<region>[a-z]{2}(?:-gov|-iso[a-z]?)?-[a-z]+-[0-9]):)?",
            r"(?:[0-9]{12}:)?(?:function:)?(?P<name>[a-zA-Z0-9_.-]+)",
            r"(?::(?P<qualifier>\$LATEST|[a-zA-Z0-9_-]+))?$",
        ))
        .expect("a valid pattern")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(encoded: &str, query: Option<&str>) -> (String, Option<String>) {
        let r = parse(encoded, query, "us-east-1").unwrap_or_else(|e| panic!("{encoded}: {e:?}"));
        (r.name, r.qualifier)
    }

    fn named(name: &str, qualifier: Option<&str>) -> (String, Option<String>) {
        (name.to_string(), qualifier.map(str::to_string))
    }

    #[test]
    fn every_form_the_sdks_send() {
        assert_eq!(ok("echo", None), named("echo", None));
        assert_eq!(ok("echo%3A%24LATEST", None), named("echo", Some("$LATEST")));
        assert_eq!(ok("echo:prod", None), named("echo", Some("prod")));
        assert_eq!(
            ok("123456789012%3Afunction%3Aecho", None),
            named("echo", None)
        );
        assert_eq!(
            ok(
                "arn%3Aaws%3Alambda%3Aus-east-1%3A123456789012%3Afunction%3Aecho%3A7",
                None
            ),
            named("echo", Some("7"))
        );
        assert_eq!(
            ok(
                "arn:aws-cn:lambda:us-east-1:000000000000:function:a.b_c-d",
                None
            ),
            named("a.b_c-d", None)
        );
        assert_eq!(
            ok("echo", Some("Qualifier=%24LATEST")),
            named("echo", Some("$LATEST"))
        );
        assert_eq!(
            ok("echo:v1", Some("Qualifier=v1")),
            named("echo", Some("v1"))
        );
        assert_eq!(ok("echo", Some("Qualifier=")), named("echo", None));
    }

    #[test]
    fn what_lambda_refuses() {
        let invalid = |encoded: &str, query: Option<&str>| match parse(encoded, query, "us-east-1")
        {
            Err(NameError::Invalid(m)) => m,
            other => panic!("{encoded}: {other:?}"),
        };
        let m = invalid("arn:aws:lambda:useast1:000000000000:function:echo", None);
        assert!(
            m.starts_with("1 validation error detected: Value 'arn:aws:lambda:useast1:000000000000:function:echo' at 'functionName' failed to satisfy constraint: Member must satisfy regular expression pattern: (arn:"),
            "{m}"
        );
        invalid("my%20function", None);
        invalid("a%2Fb", None);
        invalid("echo:", None);
        invalid("echo:a:b", None);
        invalid("", None);
        let m = invalid(&"x".repeat(171), None);
        assert!(
            m.contains("Member must have length less than or equal to 170"),
            "{m}"
        );
        let m = invalid("bad%21", Some("Qualifier=no%20way"));
        assert!(m.starts_with("2 validation errors detected: "), "{m}");
        assert!(m.contains("at 'qualifier'"), "{m}");
        assert_eq!(
            parse("echo:v1", Some("Qualifier=v2"), "us-east-1"),
            Err(NameError::QualifierConflict)
        );
        let other = parse(
            "arn:aws:lambda:eu-west-1:000000000000:function:echo",
            None,
            "us-east-1",
        )
        .unwrap_err();
        assert_eq!(
            other.message(),
            "Functions from 'eu-west-1' are not reachable in this region ('us-east-1')"
        );
    }
}
