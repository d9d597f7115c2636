//! The identity a server gives its functions, found as SAM and the AWS SDKs find theirs:
//! AWS credentials from this process's environment (`AWS_ACCESS_KEY_ID`,
//! `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`) or from a profile of the shared files
//! (`~/.aws/credentials`, then `~/.aws/config`; `AWS_SHARED_CREDENTIALS_FILE` and
//! `AWS_CONFIG_FILE` move them), and the region (`--region`, `AWS_REGION`,
//! `AWS_DEFAULT_REGION`, the profile's `region`, else `us-east-1`).
//!
//! An explicit profile (`--profile`) is read from the files alone, as the SDKs do when
//! given one; without it the environment comes first, then `$AWS_PROFILE` (or `default`).
//! Only static keys are read: a profile that would assume a role, run a process or sign
//! in through SSO is refused with what to do instead.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use kindling_runtime_api::HostCredentials;

/// The region when nothing names one (Lambda's emulator's, and the SDKs' usual).
pub const DEFAULT_REGION: &str = "us-east-1";
/// Profile keys that get credentials some other way than static keys.
const INDIRECT: [&str; 6] = [
    "role_arn",
    "credential_process",
    "sso_session",
    "sso_start_url",
    "web_identity_token_file",
    "credential_source",
];

/// What the server found.
#[derive(Debug, Default)]
pub struct Identity {
    pub credentials: Option<HostCredentials>,
    /// The profile's `region`, if a profile was read and names one.
    pub profile_region: Option<String>,
}

/// Looks the host's identity up; `var` reads this process's environment (a parameter, so
/// that tests need not change the real one). `profile` is `--profile`.
pub fn find(
    profile: Option<&str>,
    var: &dyn Fn(&str) -> Option<String>,
) -> anyhow::Result<Identity> {
    let files = SharedFiles::locate(var);
    if profile.is_none() {
        let id = var("AWS_ACCESS_KEY_ID").filter(|v| !v.is_empty());
        let secret = var("AWS_SECRET_ACCESS_KEY").filter(|v| !v.is_empty());
        match (id, secret) {
            (Some(access_key_id), Some(secret_access_key)) => {
                let name = var("AWS_PROFILE").unwrap_or_else(|| "default".into());
                return Ok(Identity {
                    credentials: Some(HostCredentials {
                        access_key_id,
                        secret_access_key,
                        session_token: var("AWS_SESSION_TOKEN").filter(|v| !v.is_empty()),
                        source: "the environment".into(),
                    }),
                    profile_region: files.region(&name)?,
                });
            }
            (None, None) => {}
            _ => bail!(
                "partial AWS credentials in the environment: set both AWS_ACCESS_KEY_ID and \
                 AWS_SECRET_ACCESS_KEY, or neither"
            ),
        }
    }
    let name = profile
        .map(String::from)
        .or_else(|| var("AWS_PROFILE"))
        .unwrap_or_else(|| "default".into());
    let found = files.profile(&name)?;
    if profile.is_some() && !found.exists {
        bail!(
            "the AWS profile {name:?} is in neither {} nor {}",
            files.credentials.display(),
            files.config.display()
        );
    }
    Ok(Identity {
        credentials: found.credentials,
        profile_region: found.region,
    })
}

/// The two shared files.
struct SharedFiles {
    credentials: PathBuf,
    config: PathBuf,
}

/// What one profile holds.
struct Profile {
    /// Named in either file.
    exists: bool,
    credentials: Option<HostCredentials>,
    region: Option<String>,
}

impl SharedFiles {
    fn locate(var: &dyn Fn(&str) -> Option<String>) -> Self {
        let home = var("HOME").map(PathBuf::from).unwrap_or_default();
        let file = |env: &str, name: &str| {
            var(env)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
                .unwrap_or_else(|| home.join(".aws").join(name))
        };
        Self {
            credentials: file("AWS_SHARED_CREDENTIALS_FILE", "credentials"),
            config: file("AWS_CONFIG_FILE", "config"),
        }
    }

    /// Profile `name`'s section of the config file: `[profile name]`, or `[default]`.
    fn config_section(&self, name: &str) -> anyhow::Result<Option<BTreeMap<String, String>>> {
        let mut config = read_ini(&self.config)?;
        Ok(config.remove(&format!("profile {name}")).or_else(|| {
            (name == "default")
                .then(|| config.remove("default"))
                .flatten()
        }))
    }

    /// Profile `name`'s region, from the config file.
    fn region(&self, name: &str) -> anyhow::Result<Option<String>> {
        Ok(self
            .config_section(name)?
            .and_then(|s| s.get("region").cloned())
            .filter(|r| !r.is_empty()))
    }

    /// Profile `name`: its keys from the credentials file (section `[name]`), else from
    /// the config file, and its region from the config.
    fn profile(&self, name: &str) -> anyhow::Result<Profile> {
        let from_credentials = read_ini(&self.credentials)?.remove(name);
        let from_config = self.config_section(name)?;
        let region = from_config
            .as_ref()
            .and_then(|s| s.get("region").cloned())
            .filter(|r| !r.is_empty());
        let exists = from_credentials.is_some() || from_config.is_some();
        let mut credentials = None;
        for (section, file) in [
            (&from_credentials, &self.credentials),
            (&from_config, &self.config),
        ] {
            let Some(section) = section else { continue };
            if let Some(found) = static_keys(section, name, file)? {
                credentials = Some(found);
                break;
            }
        }
        if credentials.is_none() {
            let indirect = [&from_credentials, &from_config]
                .into_iter()
                .flatten()
                .find_map(|s| INDIRECT.into_iter().find(|k| s.contains_key(*k)));
            if let Some(key) = indirect {
                bail!(
                    "the AWS profile {name:?} gets its credentials through {key}, which kindling \
                     does not follow: export static or temporary keys into its environment \
                     (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN), e.g. with \
                     `aws configure export-credentials --profile {name} --format env` (AWS CLI v2)"
                );
            }
        }
        Ok(Profile {
            exists,
            credentials,
            region,
        })
    }
}

/// A section's static keys: both or neither (one alone is a mistake worth stopping for).
fn static_keys(
    section: &BTreeMap<String, String>,
    name: &str,
    file: &Path,
) -> anyhow::Result<Option<HostCredentials>> {
    let get = |key: &str| section.get(key).filter(|v| !v.is_empty()).cloned();
    match (get("aws_access_key_id"), get("aws_secret_access_key")) {
        (Some(access_key_id), Some(secret_access_key)) => Ok(Some(HostCredentials {
            access_key_id,
            secret_access_key,
            session_token: get("aws_session_token"),
            source: format!("profile {name} of {}", file.display()),
        })),
        (None, None) => Ok(None),
        _ => bail!(
            "the AWS profile {name:?} in {} has only one of aws_access_key_id and \
             aws_secret_access_key",
            file.display()
        ),
    }
}

/// Sections of an AWS shared file, by name, each a map of lower-cased keys to values. A
/// missing file has none.
fn read_ini(path: &Path) -> anyhow::Result<BTreeMap<String, BTreeMap<String, String>>> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(parse_ini(&text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// The shared files' format (the AWS SDKs' reference): `[section]` headers, `key = value`
/// lines, comments from `#` or `;` at a line's start or after whitespace, and indented
/// lines continuing the previous key (sub-properties such as `s3 =`), which are skipped.
/// A later section or key of the same name adds to or replaces an earlier one.
fn parse_ini(text: &str) -> BTreeMap<String, BTreeMap<String, String>> {
    let mut sections: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    let mut current: Option<String> = None;
    for raw in text.lines() {
        let line = strip_comment(raw);
        if line.trim().is_empty() || raw.starts_with([' ', '\t']) {
            continue;
        }
        let line = line.trim();
        if let Some(header) = line.strip_prefix('[') {
            current = header.split_once(']').map(|(name, _)| {
                // `[profile   dev]` is `profile dev`.
                name.split_whitespace().collect::<Vec<_>>().join(" ")
            });
            if let Some(name) = &current {
                sections.entry(name.clone()).or_default();
            }
            continue;
        }
        let (Some(section), Some((key, value))) = (&current, line.split_once('=')) else {
            continue;
        };
        sections
            .entry(section.clone())
            .or_default()
            .insert(key.trim().to_ascii_lowercase(), value.trim().to_string());
    }
    sections
}

/// `line` up to a comment: `#` or `;` at its start (after blanks) or after a blank.
fn strip_comment(line: &str) -> &str {
    let mut previous_blank = true;
    for (at, c) in line.char_indices() {
        if (c == '#' || c == ';') && previous_blank {
            return &line[..at];
        }
        previous_blank = c == ' ' || c == '\t';
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An environment of `vars` whose `HOME` is `home`.
    fn env(home: &Path, vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let mut map: BTreeMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        map.insert("HOME".into(), home.display().to_string());
        move |key| map.get(key).cloned()
    }

    fn home_with(credentials: &str, config: &str) -> tempfile::TempDir {
        let home = tempfile::tempdir().unwrap();
        std::fs::create_dir(home.path().join(".aws")).unwrap();
        std::fs::write(home.path().join(".aws/credentials"), credentials).unwrap();
        std::fs::write(home.path().join(".aws/config"), config).unwrap();
        home
    }

    const CREDENTIALS: &str = "\
# a comment
[default]
aws_access_key_id = AKIDDEFAULT
aws_secret_access_key = secretdefault ; trailing comment

[dev]
aws_access_key_id=AKIDDEV
aws_secret_access_key=secret/dev+key
aws_session_token = tokendev
";
    const CONFIG: &str = "\
[default]
region = eu-west-1
[profile dev]
region = ap-south-1
s3 =
  max_concurrent_requests = 20
[profile cfgonly]
aws_access_key_id = AKIDCFG
aws_secret_access_key = secretcfg
[profile assumed]
role_arn = arn:aws:iam::123456789012:role/r
source_profile = default
";

    #[test]
    fn the_environment_comes_first_without_a_profile() {
        let home = home_with(CREDENTIALS, CONFIG);
        let found = find(
            None,
            &env(
                home.path(),
                &[
                    ("AWS_ACCESS_KEY_ID", "AKIDENV"),
                    ("AWS_SECRET_ACCESS_KEY", "secretenv"),
                    ("AWS_SESSION_TOKEN", "tokenenv"),
                ],
            ),
        )
        .unwrap();
        let c = found.credentials.unwrap();
        assert_eq!(
            (c.access_key_id.as_str(), c.secret_access_key.as_str()),
            ("AKIDENV", "secretenv")
        );
        assert_eq!(c.session_token.as_deref(), Some("tokenenv"));
        assert_eq!(c.source, "the environment");
        assert_eq!(found.profile_region.as_deref(), Some("eu-west-1"));
        let err = find(None, &env(home.path(), &[("AWS_ACCESS_KEY_ID", "AKIDENV")])).unwrap_err();
        assert!(err.to_string().contains("partial AWS credentials"), "{err}");
    }

    #[test]
    fn profiles_are_read_as_the_sdks_read_them() {
        let home = home_with(CREDENTIALS, CONFIG);
        let vars = env(
            home.path(),
            &[
                ("AWS_ACCESS_KEY_ID", "AKIDENV"),
                ("AWS_SECRET_ACCESS_KEY", "s"),
            ],
        );
        // An explicit profile ignores the environment's keys.
        let dev = find(Some("dev"), &vars).unwrap();
        let c = dev.credentials.unwrap();
        assert_eq!(c.access_key_id, "AKIDDEV");
        assert_eq!(c.secret_access_key, "secret/dev+key");
        assert_eq!(c.session_token.as_deref(), Some("tokendev"));
        assert!(c.source.starts_with("profile dev of "), "{}", c.source);
        assert_eq!(dev.profile_region.as_deref(), Some("ap-south-1"));
        // Without keys in the environment: $AWS_PROFILE, else default.
        let default = find(None, &env(home.path(), &[])).unwrap();
        let c = default.credentials.unwrap();
        assert_eq!(
            (c.access_key_id.as_str(), c.secret_access_key.as_str()),
            ("AKIDDEFAULT", "secretdefault")
        );
        assert_eq!(c.session_token, None);
        let cfg = find(None, &env(home.path(), &[("AWS_PROFILE", "cfgonly")])).unwrap();
        assert_eq!(cfg.credentials.unwrap().access_key_id, "AKIDCFG");
        let err = find(Some("nope"), &vars).unwrap_err().to_string();
        assert!(err.contains("\"nope\" is in neither"), "{err}");
        let err = find(Some("assumed"), &vars).unwrap_err().to_string();
        assert!(err.contains("through role_arn"), "{err}");
        assert!(!err.contains("secret"), "{err}");
    }

    #[test]
    fn no_files_and_no_environment_find_nothing() {
        let home = tempfile::tempdir().unwrap();
        let found = find(None, &env(home.path(), &[])).unwrap();
        assert!(found.credentials.is_none());
        assert_eq!(found.profile_region, None);
        // The files may be elsewhere.
        let other = home_with(CREDENTIALS, CONFIG);
        let moved = env(
            home.path(),
            &[(
                "AWS_SHARED_CREDENTIALS_FILE",
                other.path().join(".aws/credentials").to_str().unwrap(),
            )],
        );
        let found = find(Some("dev"), &moved).unwrap();
        assert_eq!(found.credentials.unwrap().access_key_id, "AKIDDEV");
    }

    #[test]
    fn the_format_has_comments_and_sub_properties() {
        let sections = parse_ini(
            "[ profile   x ] ; note\nKey = v # note\n  nested = skipped\nurl = http://h/#frag\n;k = no\n",
        );
        let x = &sections["profile x"];
        assert_eq!(x["key"], "v");
        assert_eq!(x["url"], "http://h/#frag");
        assert_eq!(x.len(), 2, "{x:?}");
    }
}
