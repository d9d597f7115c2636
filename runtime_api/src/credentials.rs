//! The host's AWS credentials, as functions with `credentials = "host"` get them: the three
//! variables the SDKs read, added to the function's own when an environment starts. The
//! secret never reaches a log: this type prints it redacted, and the only place it goes is
//! the environment's Runtime API, to the function itself.

use std::collections::BTreeMap;
use std::fmt;

/// `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` and `AWS_SESSION_TOKEN`.
pub const VARIABLES: [&str; 3] = [
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
];

/// One set of AWS credentials (static, or temporary with a session token).
#[derive(Clone, PartialEq, Eq)]
pub struct HostCredentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: Option<String>,
    /// Where they were found, for the server's start line (`the environment`,
    /// `profile dev of ~/.aws/credentials`).
    pub source: String,
}

impl fmt::Debug for HostCredentials {
    /// Names the key id and the source; the secret and the token are never printed.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HostCredentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .field(
                "session_token",
                &self.session_token.as_ref().map(|_| "<redacted>"),
            )
            .field("source", &self.source)
            .finish()
    }
}

impl HostCredentials {
    /// Sets the three variables in `variables`, replacing what the function set itself (a
    /// token of its own would not match these keys: without one of ours, it goes).
    pub fn apply(&self, variables: &mut BTreeMap<String, String>) {
        let [id, secret, token] = VARIABLES.map(String::from);
        variables.insert(id, self.access_key_id.clone());
        variables.insert(secret, self.secret_access_key.clone());
        match &self.session_token {
            Some(value) => variables.insert(token, value.clone()),
            None => variables.remove(&token),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn credentials(token: Option<&str>) -> HostCredentials {
        HostCredentials {
            access_key_id: "AKIDEXAMPLE".into(),
            secret_access_key: "wJalrXUtnFEMI/K7MDENG".into(),
            session_token: token.map(String::from),
            source: "the environment".into(),
        }
    }

    #[test]
    fn debug_never_shows_the_secret_or_the_token() {
        let text = format!("{:?}", credentials(Some("IQoJb3JpZ2luX2VjE")));
        assert!(text.contains("AKIDEXAMPLE"), "{text}");
        assert!(!text.contains("wJalrXUtnFEMI"), "{text}");
        assert!(!text.contains("IQoJb3JpZ2luX2VjE"), "{text}");
    }

    #[test]
    fn they_replace_the_functions_own() {
        let mut variables = BTreeMap::from([
            ("AWS_ACCESS_KEY_ID".to_string(), "mine".to_string()),
            ("AWS_SESSION_TOKEN".to_string(), "stale".to_string()),
            ("OTHER".to_string(), "kept".to_string()),
        ]);
        credentials(None).apply(&mut variables);
        assert_eq!(variables["AWS_ACCESS_KEY_ID"], "AKIDEXAMPLE");
        assert_eq!(variables["AWS_SECRET_ACCESS_KEY"], "wJalrXUtnFEMI/K7MDENG");
        assert_eq!(variables.get("AWS_SESSION_TOKEN"), None);
        assert_eq!(variables["OTHER"], "kept");
        credentials(Some("tok")).apply(&mut variables);
        assert_eq!(variables["AWS_SESSION_TOKEN"], "tok");
    }
}
