//! The control plane: the subset of Lambda's REST API that deployment tools use (the AWS
//! CLI, the SDKs, SAM- or Terraform-style tooling), on the Invoke API's listener.
//!
//! `CreateFunction`, `GetFunction`, `GetFunctionConfiguration`, `ListFunctions`,
//! `UpdateFunctionCode`, `UpdateFunctionConfiguration`, `DeleteFunction`,
//! `PublishVersion`, `ListVersionsByFunction`, `Create`/`Get`/`List`/`Update`/`DeleteAlias`,
//! `Put`/`Get`/`DeleteFunctionConcurrency` (a function's environments at most) and
//! `Put`/`Get`/`DeleteFunctionEventInvokeConfig`, with Lambda's paths, JSON bodies, status
//! codes and error types. Function names and ARNs are read by [`crate::names`], as the
//! Invoke API reads them.
//!
//! A published version is an immutable snapshot of `$LATEST`'s code (the same
//! content-addressed zip) and configuration, numbered from 1 (numbers are never reused);
//! the scheduler runs each version in environments of its own. An alias names one
//! version (or `$LATEST`); weighted aliases are not served. Every change is written to the [`Store`] before the scheduler
//! sees it, so the registry outlives the process. Changes are serialised (one at a time):
//! code is checked and unpacked before the call answers, so a function is `Active` (and
//! its last update `Successful`) as soon as the call returns, and the waiters
//! `function-active` and `function-updated` pass at their first poll.
//!
//! Functions of functions.toml are in the same registry, read-only here: the file is
//! their source, and changing or deleting one is a `ResourceConflictException`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use base64::Engine as _;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use serde::Deserialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;

use crate::config::{MEMORY_MB, TIMEOUT_S};
use crate::environment::{Function, Isolation};
use crate::function_url::UrlServers;
use crate::invoke_api::{json_response, lambda_error, read_body, status_only};
use crate::names::{self, FunctionRef, NameError};
use crate::scheduler::{Scheduler, VERSION};
use crate::store::{version_number, AliasRecord, EventInvokeConfig, FunctionRecord, Origin, Store};

mod layers;
mod urls;

/// Lambda's limit on a request that carries a zip (`CreateFunction`, `UpdateFunctionCode`).
pub const MAX_CONTROL_REQUEST_BYTES: usize = 70_167_211;
/// Bodies that large read at once: what uploads may hold of the host stays bounded.
const CONCURRENT_UPLOADS: usize = 2;
/// Environments per API-created function (Lambda's unreserved concurrency is shared; here
/// each function gets what functions.toml gives by default).
const API_MAX_CONCURRENCY: usize = crate::config::DEFAULT_MAX_CONCURRENCY;
/// `PutFunctionConcurrency`'s ceiling (functions.toml's `max_concurrency`'s).
const MAX_RESERVED_CONCURRENCY: usize = 1000;
/// A list (`ListFunctions`, `ListVersionsByFunction`, `ListAliases`) without `MaxItems`,
/// and its ceiling.
const DEFAULT_PAGE: usize = 50;
const MAX_PAGE: usize = 10_000;

const FUNCTIONS_2015: &str = "/2015-03-31/functions";
const FUNCTIONS_2019: &str = "/2019-09-25/functions/";
/// `Put`/`DeleteFunctionConcurrency`, and `GetFunctionConcurrency`.
const CONCURRENCY_2017: &str = "/2017-10-31/functions/";
const CONCURRENCY_2019: &str = "/2019-09-30/functions/";

/// Turns uploaded code into something the launchers run: the CLI's image cache (a zip is
/// checked for escaping paths, Lambda's size limit and the handler, and unpacked,
/// content-addressed) and its launchers (readied for the function's runtime).
pub trait Deployer: Send + Sync + std::fmt::Debug {
    /// `function.code` is a zip (or, for functions.toml, what the file names); the
    /// answer is the function as the scheduler runs it. Blocking: called off the runtime.
    fn prepare(&self, function: Function) -> Result<Function, DeployError>;

    /// Checks a layer's zip as [`Deployer::prepare`] will unpack it, so that a bad one is
    /// refused when it is published rather than when a function first uses it.
    /// Blocking: called off the runtime.
    fn check_layer(&self, zip: &std::path::Path) -> Result<(), DeployError> {
        let _ = zip;
        Ok(())
    }
}

/// Why code could not be deployed.
#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    /// The caller's fault (a bad zip, a missing handler): `InvalidParameterValueException`.
    #[error("{0}")]
    Refused(String),
    /// The host's (an image missing, a full disk): `ServiceException`.
    #[error(transparent)]
    Failed(#[from] anyhow::Error),
}

/// Whether a request is the control plane's (the invocations path is not).
pub(crate) fn handles(path: &str) -> bool {
    (path.starts_with(FUNCTIONS_2015) && !path.ends_with("/invocations"))
        || [
            FUNCTIONS_2019,
            CONCURRENCY_2017,
            CONCURRENCY_2019,
            urls::URLS_2021,
            layers::LAYERS_2018,
        ]
        .iter()
        .any(|p| path.starts_with(p))
}

/// Lambda's runtime identifier → Kindling's runtime image, or `None` when unsupported.
pub fn image_of_runtime(runtime: &str) -> Option<&'static str> {
    let versioned = |prefix: &str, suffix: &str| {
        runtime
            .strip_prefix(prefix)
            .and_then(|v| v.strip_suffix(suffix))
            .is_some_and(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
    };
    if versioned("python3.", "") {
        Some("python")
    } else if versioned("nodejs", ".x") {
        Some("node")
    } else if matches!(runtime, "provided.al2023" | "provided.al2" | "provided") {
        Some("provided")
    } else {
        None
    }
}

pub(crate) struct ControlPlane {
    pub store: Arc<Store>,
    pub scheduler: Arc<Scheduler>,
    pub deployer: Arc<dyn Deployer>,
    /// `<state-dir>/code`: uploaded zips, named by their SHA-256.
    pub code_dir: PathBuf,
    pub default_isolation: Isolation,
    /// Its requests' bodies arrive within the Invoke API's time and count against its
    /// budget of bodies held.
    pub limits: crate::connections::ConnectionLimits,
    /// One change at a time: a function is never half updated.
    pub changes: tokio::sync::Mutex<()>,
    pub uploads: Semaphore,
    /// The function URLs served, which `CreateFunctionUrlConfig` adds to.
    pub urls: Arc<UrlServers>,
}

impl ControlPlane {
    pub(crate) fn uploads() -> Semaphore {
        Semaphore::new(CONCURRENT_UPLOADS)
    }

    pub(crate) async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        match self.route(req).await {
            Ok(answer) => answer,
            Err(e) => e.answer(),
        }
    }

    async fn route(&self, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, ApiError> {
        let path = req.uri().path().to_string();
        let raw_query = req.uri().query().unwrap_or("").to_string();
        let query: BTreeMap<String, String> = form_urlencoded::parse(raw_query.as_bytes())
            .into_owned()
            .collect();
        let method = req.method().clone();
        if let Some(rest) = path.strip_prefix(urls::URLS_2021) {
            let rest = rest.to_string();
            return self.route_url(req, &rest, &raw_query, &query).await;
        }
        if let Some(rest) = path.strip_prefix(layers::LAYERS_2018) {
            let rest = rest.to_string();
            return self.route_layers(req, &rest, &query).await;
        }
        if let Some(rest) = path.strip_prefix(FUNCTIONS_2019) {
            let name = rest
                .strip_suffix("/event-invoke-config")
                .ok_or_else(|| unknown(&method, &path))?;
            let name = self.latest_in_path(name, &raw_query)?;
            return match method {
                Method::PUT | Method::POST => {
                    let body = self.json_body(req).await?;
                    self.put_event_invoke_config(&name, body, method == Method::PUT)
                        .await
                }
                Method::GET => self.get_event_invoke_config(&name),
                Method::DELETE => self.delete_event_invoke_config(&name).await,
                _ => Err(unknown(&method, &path)),
            };
        }
        for (prefix, methods) in [
            (CONCURRENCY_2017, &[Method::PUT, Method::DELETE][..]),
            (CONCURRENCY_2019, &[Method::GET][..]),
        ] {
            let Some(rest) = path.strip_prefix(prefix) else {
                continue;
            };
            let name = rest
                .strip_suffix("/concurrency")
                .filter(|_| methods.contains(&method))
                .ok_or_else(|| unknown(&method, &path))?;
            let name = self.latest_in_path(name, &raw_query)?;
            return match method {
                Method::PUT => {
                    let body = self.json_body(req).await?;
                    self.put_concurrency(&name, body).await
                }
                Method::DELETE => self.delete_concurrency(&name).await,
                _ => {
                    let record = self.record(&name)?;
                    Ok(ok(&concurrency_json(&record)))
                }
            };
        }
        let rest = path
            .strip_prefix(FUNCTIONS_2015)
            .ok_or_else(|| unknown(&method, &path))?;
        let parts: Vec<&str> = rest.trim_start_matches('/').split('/').collect();
        match (method.clone(), parts.as_slice()) {
            (Method::POST, [""]) => {
                let body = self.json_body(req).await?;
                self.create(body).await
            }
            (Method::GET, [""]) => self.list(&query),
            (Method::GET, [name]) => {
                let named = self.name_in_path(name, &raw_query)?;
                let record = self.record_at(&named)?;
                let mut answer = json!({
                    "Configuration": self.configuration_as_named(&record, &named),
                    "Code": {"RepositoryType": "S3", "Location": record.code.display().to_string()},
                });
                if record.reserved_concurrency.is_some() {
                    answer["Concurrency"] = concurrency_json(&record);
                }
                Ok(ok(&answer))
            }
            (Method::GET, [name, "configuration"]) => {
                let named = self.name_in_path(name, &raw_query)?;
                let record = self.record_at(&named)?;
                Ok(ok(&self.configuration_as_named(&record, &named)))
            }
            (Method::PUT, [name, "code"]) => {
                let name = self.latest_in_path(name, &raw_query)?;
                let body = self.json_body(req).await?;
                self.update_code(&name, body).await
            }
            (Method::PUT, [name, "configuration"]) => {
                let name = self.latest_in_path(name, &raw_query)?;
                let body = self.json_body(req).await?;
                self.update_configuration(&name, body).await
            }
            (Method::DELETE, [name]) => {
                let named = self.name_in_path(name, &raw_query)?;
                match named.qualifier {
                    None => self.delete(&named.name).await,
                    Some(q) => self.delete_version(&named.name, &q).await,
                }
            }
            (Method::POST, [name, "versions"]) => {
                let name = self.latest_in_path(name, &raw_query)?;
                let body = self.json_body(req).await?;
                self.publish(&name, body).await
            }
            (Method::GET, [name, "versions"]) => {
                let name = self.latest_in_path(name, &raw_query)?;
                self.list_versions(&name, &query)
            }
            (Method::POST, [name, "aliases"]) => {
                let name = self.latest_in_path(name, &raw_query)?;
                let body = self.json_body(req).await?;
                self.create_alias(&name, body).await
            }
            (Method::GET, [name, "aliases"]) => {
                let name = self.latest_in_path(name, &raw_query)?;
                self.list_aliases(&name, &query)
            }
            (Method::GET | Method::PUT | Method::DELETE, [name, "aliases", alias]) => {
                let name = self.latest_in_path(name, &raw_query)?;
                let alias = alias_in_path(alias)?;
                match method {
                    Method::GET => {
                        let found = self.alias(&name, &alias)?;
                        Ok(ok(&self.alias_json(&name, &found)))
                    }
                    Method::PUT => {
                        let body = self.json_body(req).await?;
                        self.update_alias(&name, &alias, body).await
                    }
                    _ => self.delete_alias(&name, &alias).await,
                }
            }
            _ => Err(unknown(&method, &path)),
        }
    }

    /// The function (and qualifier) a path names: a name or an ARN, URL-encoded, with
    /// `?Qualifier=`, as the Invoke API reads it.
    fn name_in_path(&self, raw: &str, query: &str) -> Result<FunctionRef, ApiError> {
        names::parse(raw, Some(query), self.scheduler.region()).map_err(|e| match &e {
            NameError::Invalid(message) => ApiError::validation(message.clone()),
            NameError::QualifierConflict => ApiError::invalid(e.message()),
            NameError::OtherRegion { .. } => ApiError::not_found(e.message()),
        })
    }

    /// The function a path names, for an operation on the function itself (its
    /// `$LATEST`): a version or alias there is refused.
    fn latest_in_path(&self, raw: &str, query: &str) -> Result<String, ApiError> {
        let named = self.name_in_path(raw, query)?;
        match named.qualifier.as_deref() {
            None | Some(VERSION) => Ok(named.name),
            Some(q) => Err(ApiError::invalid(format!(
                "this operation applies to the function {} itself, not to its version or alias {q}: leave the qualifier out",
                named.name
            ))),
        }
    }

    /// The request's JSON body (an upload: within Lambda's limit, few at once).
    async fn json_body(&self, req: Request<Incoming>) -> Result<Value, ApiError> {
        let _permit = self
            .uploads
            .acquire()
            .await
            .map_err(|_| ApiError::service("the server is shutting down".into()))?;
        let body = read_body(req, &self.limits, MAX_CONTROL_REQUEST_BYTES, None)
            .await
            .map_err(|r| ApiError::Ready(Box::new(r)))?;
        if body.is_empty() {
            return Ok(json!({}));
        }
        serde_json::from_slice(&body).map_err(|e| {
            ApiError::Lambda(
                Kind::BadContent,
                format!("Could not parse request body into json: {e}"),
            )
        })
    }

    fn arn(&self, name: &str) -> String {
        self.scheduler.arn(name)
    }

    fn record(&self, name: &str) -> Result<FunctionRecord, ApiError> {
        self.store
            .function(name)
            .map_err(ApiError::store)?
            .ok_or_else(|| ApiError::not_found(format!("Function not found: {}", self.arn(name))))
    }

    /// The record a name and qualifier designate: `$LATEST`, a published version, or the
    /// version an alias points to.
    fn record_at(&self, named: &FunctionRef) -> Result<FunctionRecord, ApiError> {
        let latest = self.record(&named.name)?;
        let Some(q) = named.qualifier.as_deref().filter(|q| *q != VERSION) else {
            return Ok(latest);
        };
        let version = self
            .store
            .resolve_qualifier(&named.name, Some(q))
            .map_err(ApiError::store)?;
        let found = match version.as_deref().map(version_number) {
            Some(None) => Some(latest),
            Some(Some(n)) => self
                .store
                .version(&named.name, n)
                .map_err(ApiError::store)?,
            None => None,
        };
        found.ok_or_else(|| {
            ApiError::not_found(format!("Function not found: {}:{q}", self.arn(&named.name)))
        })
    }

    /// `record`'s configuration as Lambda shows it to a caller who named it `named`: an
    /// alias's ARN for an alias.
    fn configuration_as_named(&self, record: &FunctionRecord, named: &FunctionRef) -> Value {
        let mut c = self.configuration(record);
        if let Some(q) = named.qualifier.as_deref() {
            c["FunctionArn"] = json!(format!("{}:{q}", self.arn(&record.name)));
        }
        c
    }

    /// A function the API may change: it exists and is not functions.toml's.
    fn changeable(&self, name: &str) -> Result<FunctionRecord, ApiError> {
        let record = self.record(name)?;
        if record.origin == Origin::File {
            return Err(ApiError::conflict(format!(
                "{name} is defined in functions.toml, which is its source: change it there and restart the server"
            )));
        }
        Ok(record)
    }

    /// Lambda's `FunctionConfiguration` of a record.
    fn configuration(&self, r: &FunctionRecord) -> Value {
        let arn = match r.version.as_str() {
            VERSION => self.arn(&r.name),
            version => format!("{}:{version}", self.arn(&r.name)),
        };
        let mut c = json!({
            "FunctionName": r.name,
            "FunctionArn": arn,
            "Runtime": r.runtime,
            "Handler": r.handler,
            "CodeSize": r.code_size,
            "Description": r.description,
            "Timeout": r.timeout_s,
            "MemorySize": r.memory_mb,
            "LastModified": r.last_modified,
            "CodeSha256": r.code_sha256,
            "Version": r.version,
            "Environment": {"Variables": r.env},
            "TracingConfig": {"Mode": "PassThrough"},
            "RevisionId": r.revision_id,
            "State": "Active",
            "LastUpdateStatus": "Successful",
            "PackageType": "Zip",
            "Architectures": ["x86_64"],
            "EphemeralStorage": {"Size": 512},
        });
        if let Some(role) = &r.role {
            c["Role"] = json!(role);
        }
        if !r.layers.is_empty() {
            c["Layers"] = r
                .layers
                .iter()
                .map(|l| json!({"Arn": l.arn, "CodeSize": l.code_size}))
                .collect();
        }
        if self.scheduler.resolve(&r.name, &r.version).is_none() {
            // Its code could not be readied when the server started.
            c["State"] = json!("Failed");
            c["StateReasonCode"] = json!("InternalError");
            c["StateReason"] = json!("the function's code could not be prepared at start; see the server's log, then update its code");
        }
        c
    }

    fn list(&self, query: &BTreeMap<String, String>) -> Result<Response<Full<Bytes>>, ApiError> {
        let all = self.store.functions().map_err(ApiError::store)?;
        let (shown, next) = page(&all, query, |r| r.name.clone(), |r, m| r.name.as_str() > m)?;
        paged(
            "Functions",
            shown.iter().map(|r| self.configuration(r)).collect(),
            next,
        )
    }

    /// `ListVersionsByFunction`: `$LATEST`, then the published versions, oldest first.
    fn list_versions(
        &self,
        name: &str,
        query: &BTreeMap<String, String>,
    ) -> Result<Response<Full<Bytes>>, ApiError> {
        let latest = self.record(name)?;
        let mut all = vec![latest];
        all.extend(self.store.versions(name).map_err(ApiError::store)?);
        // `$LATEST` sorts first, then by number; a marker that is neither ends the list.
        let order = |v: &str| match v {
            VERSION => Some(0),
            v => version_number(v),
        };
        let (shown, next) = page(
            &all,
            query,
            |r| r.version.clone(),
            |r, m| order(&r.version) > order(m).or(Some(u64::MAX)),
        )?;
        paged(
            "Versions",
            shown.iter().map(|r| self.configuration(r)).collect(),
            next,
        )
    }

    async fn create(&self, body: Value) -> Result<Response<Full<Bytes>>, ApiError> {
        let input: CreateInput = parse_input(body)?;
        let raw_name = input.function_name.clone();
        let refused = || {
            ApiError::validation(format!(
                "1 validation error detected: Value '{raw_name}' at 'functionName' failed to satisfy constraint: Member must satisfy regular expression pattern: (arn:(aws[a-zA-Z-]*)?:lambda:)?([a-z]{{2}}(-gov)?-[a-z]+-\\d{{1}}:)?(\\d{{12}}:)?(function:)?([a-zA-Z0-9-_]+)"
            ))
        };
        let named = names::parse_decoded(&raw_name, None, self.scheduler.region())
            .map_err(|_| refused())?;
        // A name to create: at most 64 characters, no dot, no version or alias.
        let name = named.name.as_str();
        if named.qualifier.is_some() || name.len() > 64 || name.contains('.') {
            return Err(refused());
        }
        if input.package_type.as_deref().is_some_and(|p| p != "Zip") {
            return Err(ApiError::invalid(
                "only PackageType Zip is supported: give the code as Code.ZipFile".into(),
            ));
        }
        check_architectures(input.architectures.as_deref())?;
        let layers = self.layers_of(input.layers.as_deref().unwrap_or_default())?;
        let runtime = input
            .runtime
            .ok_or_else(|| ApiError::invalid("Runtime is required for a Zip function".into()))?;
        let handler = input
            .handler
            .ok_or_else(|| ApiError::invalid("Handler is required for a Zip function".into()))?;
        let zip = input.code.zip()?;
        let _change = self.changes.lock().await;
        if self
            .store
            .function(name)
            .map_err(ApiError::store)?
            .is_some()
        {
            return Err(ApiError::conflict(format!(
                "Function already exist: {name}"
            )));
        }
        let (code, code_sha256, code_size) = self.keep_code(&zip)?;
        let mut record = FunctionRecord {
            name: name.to_string(),
            version: VERSION.to_string(),
            last_version: 0,
            origin: Origin::Api,
            image: image(&runtime)?.to_string(),
            runtime,
            handler,
            memory_mb: 128,
            timeout_s: 3,
            env: BTreeMap::new(),
            role: input.role,
            description: input.description.unwrap_or_default(),
            code,
            code_sha256,
            code_size,
            isolation: self.default_isolation.name().to_string(),
            max_concurrency: API_MAX_CONCURRENCY,
            reserved_concurrency: None,
            last_modified: String::new(),
            revision_id: String::new(),
            event_invoke: None,
            layers,
            url: None,
        };
        let code = record.code.clone();
        let committed = match apply_settings(&mut record, input.settings) {
            Ok(()) => self.commit(record).await,
            Err(e) => Err(e),
        };
        let record = match committed {
            Ok(record) => record,
            Err(e) => {
                // Refused: the zip just stored is nobody's.
                self.forget_code(&code);
                return Err(e);
            }
        };
        let shown = if input.publish {
            self.publish_locked(record, None).await?
        } else {
            record
        };
        let mut answer = ok(&self.configuration(&shown));
        *answer.status_mut() = StatusCode::CREATED;
        Ok(answer)
    }

    async fn update_code(
        &self,
        name: &str,
        body: Value,
    ) -> Result<Response<Full<Bytes>>, ApiError> {
        let input: UpdateCodeInput = parse_input(body)?;
        check_architectures(input.architectures.as_deref())?;
        let zip = input.code.zip()?;
        let _change = self.changes.lock().await;
        let mut record = self.changeable(name)?;
        check_revision(&record, input.revision_id.as_deref())?;
        if input.dry_run {
            return Ok(ok(&self.configuration(&record)));
        }
        let old_code = record.code.clone();
        (record.code, record.code_sha256, record.code_size) = self.keep_code(&zip)?;
        let new_code = record.code.clone();
        let committed = self.commit(record).await;
        // The code the function no longer uses (or, refused, the zip just stored).
        self.forget_code(if committed.is_ok() {
            &old_code
        } else {
            &new_code
        });
        let record = committed?;
        let shown = if input.publish {
            self.publish_locked(record, None).await?
        } else {
            record
        };
        Ok(ok(&self.configuration(&shown)))
    }

    async fn update_configuration(
        &self,
        name: &str,
        body: Value,
    ) -> Result<Response<Full<Bytes>>, ApiError> {
        let input: UpdateConfigInput = parse_input(body)?;
        let _change = self.changes.lock().await;
        let mut record = self.changeable(name)?;
        check_revision(&record, input.revision_id.as_deref())?;
        let old_layers = match input.layers {
            Some(arns) => std::mem::replace(&mut record.layers, self.layers_of(&arns)?),
            None => Vec::new(),
        };
        if let Some(runtime) = input.runtime {
            record.image = image(&runtime)?.to_string();
            record.runtime = runtime;
        }
        if let Some(handler) = input.handler {
            record.handler = handler;
        }
        if let Some(role) = input.role {
            record.role = Some(role);
        }
        if let Some(description) = input.description {
            record.description = description;
        }
        apply_settings(&mut record, input.settings)?;
        let record = self.commit(record).await?;
        // Layer versions deleted meanwhile were kept for this function alone.
        for layer in old_layers {
            self.forget_code(&layer.code);
        }
        Ok(ok(&self.configuration(&record)))
    }

    /// Readies `record`'s code (its `$LATEST`), writes it to the store, then lets the
    /// scheduler run it (draining the old environments of an update).
    async fn commit(&self, mut record: FunctionRecord) -> Result<FunctionRecord, ApiError> {
        let function = self.prepare(&record).await?;
        record.last_modified = last_modified();
        record.revision_id = uuid::Uuid::new_v4().to_string();
        self.store.put_function(&record).map_err(ApiError::store)?;
        self.scheduler
            .deploy(function, VERSION)
            .await
            .map_err(|e| ApiError::service(format!("{e:#}")))?;
        tracing::info!(function = %record.name, code = %record.code_sha256, "function deployed");
        Ok(record)
    }

    /// `PublishVersion`: `CodeSha256` and `RevisionId`, when given, must be `$LATEST`'s.
    async fn publish(&self, name: &str, body: Value) -> Result<Response<Full<Bytes>>, ApiError> {
        #[derive(Deserialize)]
        #[serde(rename_all = "PascalCase")]
        struct Input {
            code_sha256: Option<String>,
            description: Option<String>,
            revision_id: Option<String>,
        }
        let input: Input = parse_input(body)?;
        let _change = self.changes.lock().await;
        let latest = self.changeable(name)?;
        check_revision(&latest, input.revision_id.as_deref())?;
        if let Some(sha) = input.code_sha256.filter(|s| *s != latest.code_sha256) {
            return Err(ApiError::invalid(format!(
                "CodeSHA256 ({sha}) is different from current CodeSHA256 in $LATEST ({}). Please try again",
                latest.code_sha256
            )));
        }
        let version = self.publish_locked(latest, input.description).await?;
        let mut answer = ok(&self.configuration(&version));
        *answer.status_mut() = StatusCode::CREATED;
        Ok(answer)
    }

    /// Publishes `latest` as it stands as the next version (the caller holds `changes`);
    /// when neither its code nor its configuration changed since the last version, that
    /// version is the answer, as Lambda's.
    async fn publish_locked(
        &self,
        mut latest: FunctionRecord,
        description: Option<String>,
    ) -> Result<FunctionRecord, ApiError> {
        let versions = self.store.versions(&latest.name).map_err(ApiError::store)?;
        if let Some(last) = versions.last().filter(|v| same_snapshot(v, &latest)) {
            return Ok(last.clone());
        }
        let number = latest.last_version + 1;
        let version = FunctionRecord {
            version: number.to_string(),
            last_version: 0,
            description: description.unwrap_or_else(|| latest.description.clone()),
            last_modified: last_modified(),
            revision_id: uuid::Uuid::new_v4().to_string(),
            event_invoke: None,
            // A URL serves `$LATEST`: a version has none of its own.
            url: None,
            ..latest.clone()
        };
        let function = self.prepare(&version).await?;
        latest.last_version = number;
        self.store
            .publish_version(&latest, &version)
            .map_err(ApiError::store)?;
        self.scheduler
            .deploy(function, &version.version)
            .await
            .map_err(|e| ApiError::service(format!("{e:#}")))?;
        tracing::info!(function = %latest.name, version = number, code = %version.code_sha256, "version published");
        Ok(version)
    }

    /// Checks and unpacks the code of `record` for its runtime and handler.
    async fn prepare(&self, record: &FunctionRecord) -> Result<Function, ApiError> {
        let function = function_of(record).map_err(ApiError::invalid)?;
        let deployer = self.deployer.clone();
        let prepared = tokio::task::spawn_blocking(move || deployer.prepare(function))
            .await
            .map_err(|e| ApiError::service(format!("preparing the code failed: {e}")))?;
        prepared.map_err(|e| match e {
            DeployError::Refused(why) => ApiError::invalid(why),
            DeployError::Failed(e) => ApiError::service(format!("{e:#}")),
        })
    }

    /// Gives `latest`'s published versions its concurrency (the function's limit, which
    /// each version's environments keep to): their pools are replaced, the old drained.
    async fn redeploy_versions(&self, latest: &FunctionRecord) -> Result<(), ApiError> {
        for mut version in self.store.versions(&latest.name).map_err(ApiError::store)? {
            version.max_concurrency = latest.max_concurrency;
            let function = self.prepare(&version).await?;
            self.scheduler
                .deploy(function, &version.version)
                .await
                .map_err(|e| ApiError::service(format!("{e:#}")))?;
        }
        Ok(())
    }

    /// `DeleteFunction`: the function, its versions and its aliases.
    async fn delete(&self, name: &str) -> Result<Response<Full<Bytes>>, ApiError> {
        let _change = self.changes.lock().await;
        let record = self.changeable(name)?;
        let versions = self.store.versions(name).map_err(ApiError::store)?;
        self.store.delete_function(name).map_err(ApiError::store)?;
        self.scheduler.remove(name).await;
        self.forget_url(name);
        for r in std::iter::once(&record).chain(&versions) {
            for code in std::iter::once(&r.code).chain(r.layers.iter().map(|l| &l.code)) {
                self.forget_code(code);
            }
        }
        tracing::info!(function = %name, "function deleted");
        Ok(status_only(StatusCode::NO_CONTENT))
    }

    /// `DeleteFunction` with a `Qualifier`: one published version, which no alias names.
    async fn delete_version(
        &self,
        name: &str,
        qualifier: &str,
    ) -> Result<Response<Full<Bytes>>, ApiError> {
        let Some(number) = version_number(qualifier) else {
            return Err(ApiError::invalid(match qualifier {
                VERSION => {
                    "$LATEST version cannot be deleted without deleting the function.".into()
                }
                alias => {
                    format!("{alias} is not a version number: delete an alias with DeleteAlias")
                }
            }));
        };
        let _change = self.changes.lock().await;
        self.changeable(name)?;
        let version = self
            .store
            .version(name, number)
            .map_err(ApiError::store)?
            .ok_or_else(|| {
                ApiError::not_found(format!(
                    "Function not found: {}:{qualifier}",
                    self.arn(name)
                ))
            })?;
        let naming: Vec<String> = self
            .store
            .aliases(name)
            .map_err(ApiError::store)?
            .into_iter()
            .filter(|a| a.function_version == version.version)
            .map(|a| a.name)
            .collect();
        if !naming.is_empty() {
            return Err(ApiError::conflict(format!(
                "Unable to delete version because the following aliases reference it: [{}]",
                naming.join(", ")
            )));
        }
        self.store
            .delete_version(name, number)
            .map_err(ApiError::store)?;
        self.scheduler.remove_version(name, &version.version).await;
        self.forget_code(&version.code);
        tracing::info!(function = %name, version = number, "version deleted");
        Ok(status_only(StatusCode::NO_CONTENT))
    }

    fn alias_arn(&self, name: &str, alias: &str) -> String {
        format!("{}:{alias}", self.arn(name))
    }

    /// Lambda's `AliasConfiguration`.
    fn alias_json(&self, name: &str, alias: &AliasRecord) -> Value {
        json!({
            "AliasArn": self.alias_arn(name, &alias.name),
            "Name": alias.name,
            "FunctionVersion": alias.function_version,
            "Description": alias.description,
            "RevisionId": alias.revision_id,
        })
    }

    /// An alias of an existing function, or Lambda's 404 for it.
    fn alias(&self, name: &str, alias: &str) -> Result<AliasRecord, ApiError> {
        self.record(name)?;
        self.store
            .alias(name, alias)
            .map_err(ApiError::store)?
            .ok_or_else(|| {
                ApiError::not_found(format!(
                    "Cannot find alias arn: {}",
                    self.alias_arn(name, alias)
                ))
            })
    }

    /// Checks that `version` (`FunctionVersion` of an alias) is `$LATEST` or a published
    /// version of `name`.
    fn check_version(&self, name: &str, version: &str) -> Result<(), ApiError> {
        if version == VERSION {
            return Ok(());
        }
        let Some(number) = version_number(version).filter(|_| version.len() <= 1024) else {
            return Err(ApiError::validation(format!(
                "1 validation error detected: Value '{version}' at 'functionVersion' failed to satisfy constraint: Member must satisfy regular expression pattern: (\\$LATEST|[0-9]+)"
            )));
        };
        match self.store.version(name, number).map_err(ApiError::store)? {
            Some(_) => Ok(()),
            None => Err(ApiError::not_found(format!(
                "Function not found: {}:{version}",
                self.arn(name)
            ))),
        }
    }

    async fn create_alias(
        &self,
        name: &str,
        body: Value,
    ) -> Result<Response<Full<Bytes>>, ApiError> {
        let input: AliasInput = parse_input(body)?;
        let alias_name = input
            .name
            .ok_or_else(|| ApiError::invalid("Name is required".into()))?;
        check_alias_name(&alias_name)?;
        let version = input
            .function_version
            .ok_or_else(|| ApiError::invalid("FunctionVersion is required".into()))?;
        check_routing(input.routing_config.as_ref())?;
        let _change = self.changes.lock().await;
        self.changeable(name)?;
        self.check_version(name, &version)?;
        let alias = AliasRecord {
            name: alias_name,
            function_version: version,
            description: input.description.unwrap_or_default(),
            revision_id: uuid::Uuid::new_v4().to_string(),
        };
        if !self
            .store
            .put_alias(name, &alias, true)
            .map_err(ApiError::store)?
        {
            return Err(ApiError::conflict(format!(
                "Alias already exists: {}",
                self.alias_arn(name, &alias.name)
            )));
        }
        tracing::info!(function = %name, alias = %alias.name, version = %alias.function_version, "alias created");
        let mut answer = ok(&self.alias_json(name, &alias));
        *answer.status_mut() = StatusCode::CREATED;
        Ok(answer)
    }

    async fn update_alias(
        &self,
        name: &str,
        alias_name: &str,
        body: Value,
    ) -> Result<Response<Full<Bytes>>, ApiError> {
        let input: AliasInput = parse_input(body)?;
        check_routing(input.routing_config.as_ref())?;
        let _change = self.changes.lock().await;
        self.changeable(name)?;
        let mut alias = self
            .store
            .alias(name, alias_name)
            .map_err(ApiError::store)?
            .ok_or_else(|| {
                ApiError::not_found(format!(
                    "Alias not found: {}",
                    self.alias_arn(name, alias_name)
                ))
            })?;
        if input
            .revision_id
            .as_deref()
            .is_some_and(|r| r != alias.revision_id)
        {
            return Err(revision_mismatch());
        }
        if let Some(version) = input.function_version {
            self.check_version(name, &version)?;
            alias.function_version = version;
        }
        if let Some(description) = input.description {
            alias.description = description;
        }
        alias.revision_id = uuid::Uuid::new_v4().to_string();
        self.store
            .put_alias(name, &alias, false)
            .map_err(ApiError::store)?;
        tracing::info!(function = %name, alias = %alias.name, version = %alias.function_version, "alias updated");
        Ok(ok(&self.alias_json(name, &alias)))
    }

    /// `DeleteAlias`: 204 also when there was no such alias, as Lambda answers.
    async fn delete_alias(
        &self,
        name: &str,
        alias_name: &str,
    ) -> Result<Response<Full<Bytes>>, ApiError> {
        let _change = self.changes.lock().await;
        self.changeable(name)?;
        self.store
            .delete_alias(name, alias_name)
            .map_err(ApiError::store)?;
        Ok(status_only(StatusCode::NO_CONTENT))
    }

    /// `ListAliases`, by name; `FunctionVersion` keeps those of one version.
    fn list_aliases(
        &self,
        name: &str,
        query: &BTreeMap<String, String>,
    ) -> Result<Response<Full<Bytes>>, ApiError> {
        self.record(name)?;
        let version = query.get("FunctionVersion");
        let all: Vec<AliasRecord> = self
            .store
            .aliases(name)
            .map_err(ApiError::store)?
            .into_iter()
            .filter(|a| version.is_none_or(|v| *v == a.function_version))
            .collect();
        let (shown, next) = page(&all, query, |a| a.name.clone(), |a, m| a.name.as_str() > m)?;
        paged(
            "Aliases",
            shown.iter().map(|a| self.alias_json(name, a)).collect(),
            next,
        )
    }

    /// Writes a zip to the code store under its SHA-256 (once: same bytes, same file):
    /// its path, Lambda's base64 `CodeSha256` and its size.
    fn keep_code(&self, zip: &[u8]) -> Result<(PathBuf, String, u64), ApiError> {
        let digest = Sha256::digest(zip);
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        let path = self.code_dir.join(format!("{hex}.zip"));
        if !path.is_file() {
            let write = || -> std::io::Result<()> {
                std::fs::create_dir_all(&self.code_dir)?;
                let partial = self.code_dir.join(format!("{hex}.zip.partial"));
                std::fs::write(&partial, zip)?;
                std::fs::File::open(&partial)?.sync_all()?;
                std::fs::rename(&partial, &path)
            };
            write().map_err(|e| {
                ApiError::service(format!("{}: cannot store the code: {e}", path.display()))
            })?;
        }
        let sha = base64::engine::general_purpose::STANDARD.encode(digest);
        Ok((path, sha, zip.len() as u64))
    }

    /// Removes a stored zip no function or version uses any more.
    fn forget_code(&self, code: &std::path::Path) {
        if !code.starts_with(&self.code_dir) {
            return;
        }
        match self.store.code_in_use(code) {
            Ok(false) => {
                if let Err(e) = std::fs::remove_file(code) {
                    tracing::warn!(code = %code.display(), error = %e, "cannot remove unused code");
                }
            }
            Ok(true) => {}
            Err(e) => tracing::warn!(error = %e, "cannot tell whether code is still used"),
        }
    }

    async fn put_concurrency(
        &self,
        name: &str,
        body: Value,
    ) -> Result<Response<Full<Bytes>>, ApiError> {
        #[derive(Deserialize)]
        #[serde(rename_all = "PascalCase")]
        struct Input {
            reserved_concurrent_executions: usize,
        }
        let input: Input = parse_input(body)?;
        let n = input.reserved_concurrent_executions;
        if !(1..=MAX_RESERVED_CONCURRENCY).contains(&n) {
            return Err(ApiError::invalid(format!(
                "ReservedConcurrentExecutions {n}: this server takes 1..{MAX_RESERVED_CONCURRENCY} (0, which throttles every invocation, is not supported)"
            )));
        }
        let _change = self.changes.lock().await;
        let mut record = self.changeable(name)?;
        record.reserved_concurrency = Some(n);
        record.max_concurrency = n;
        let record = self.commit(record).await?;
        self.redeploy_versions(&record).await?;
        Ok(ok(&json!({"ReservedConcurrentExecutions": n})))
    }

    async fn delete_concurrency(&self, name: &str) -> Result<Response<Full<Bytes>>, ApiError> {
        let _change = self.changes.lock().await;
        let mut record = self.changeable(name)?;
        record.reserved_concurrency = None;
        record.max_concurrency = API_MAX_CONCURRENCY;
        let record = self.commit(record).await?;
        self.redeploy_versions(&record).await?;
        Ok(status_only(StatusCode::NO_CONTENT))
    }

    async fn put_event_invoke_config(
        &self,
        name: &str,
        body: Value,
        replace: bool,
    ) -> Result<Response<Full<Bytes>>, ApiError> {
        let input: EventInvokeInput = parse_input(body)?;
        let _change = self.changes.lock().await;
        let mut record = self.changeable(name)?;
        // Put replaces the whole configuration; Update (POST) changes what it names.
        let mut config = match (&record.event_invoke, replace) {
            (Some(old), false) => old.clone(),
            _ => EventInvokeConfig::default(),
        };
        if let Some(n) = input.maximum_retry_attempts {
            if n > 2 {
                return Err(ApiError::validation(format!("1 validation error detected: Value '{n}' at 'maximumRetryAttempts' failed to satisfy constraint: Member must have value less than or equal to 2")));
            }
            config.maximum_retry_attempts = n;
        }
        if let Some(age) = input.maximum_event_age_in_seconds {
            if !(60..=21_600).contains(&age) {
                return Err(ApiError::validation(format!("1 validation error detected: Value '{age}' at 'maximumEventAgeInSeconds' failed to satisfy constraint: Member must have value between 60 and 21600")));
            }
            config.maximum_event_age_s = age;
        }
        if let Some(d) = input.destination_config {
            let checked = |t: Option<DestinationInput>| -> Result<Option<String>, ApiError> {
                t.and_then(|t| t.destination)
                    .map(|arn| crate::events::check_destination(&arn).map(|()| arn))
                    .transpose()
                    .map_err(ApiError::invalid)
            };
            if let Some(s) = d.on_success {
                config.on_success = checked(Some(s))?;
            }
            if let Some(f) = d.on_failure {
                config.on_failure = checked(Some(f))?;
            }
        }
        config.last_modified = last_modified();
        record.event_invoke = Some(config);
        self.store.put_function(&record).map_err(ApiError::store)?;
        Ok(ok(&self.event_invoke_json(&record)))
    }

    fn get_event_invoke_config(&self, name: &str) -> Result<Response<Full<Bytes>>, ApiError> {
        let record = self.record(name)?;
        if record.event_invoke.is_none() {
            return Err(ApiError::not_found(format!(
                "The function {} doesn't have an EventInvokeConfig",
                self.arn(name)
            )));
        }
        Ok(ok(&self.event_invoke_json(&record)))
    }

    async fn delete_event_invoke_config(
        &self,
        name: &str,
    ) -> Result<Response<Full<Bytes>>, ApiError> {
        let _change = self.changes.lock().await;
        let mut record = self.changeable(name)?;
        if record.event_invoke.take().is_none() {
            return Err(ApiError::not_found(format!(
                "The function {} doesn't have an EventInvokeConfig",
                self.arn(name)
            )));
        }
        self.store.put_function(&record).map_err(ApiError::store)?;
        Ok(status_only(StatusCode::NO_CONTENT))
    }

    fn event_invoke_json(&self, record: &FunctionRecord) -> Value {
        let c = record.event_invoke.clone().unwrap_or_default();
        let destination = |d: &Option<String>| match d {
            Some(arn) => json!({"Destination": arn}),
            None => json!({}),
        };
        json!({
            "FunctionArn": format!("{}:{VERSION}", self.arn(&record.name)),
            "MaximumRetryAttempts": c.maximum_retry_attempts,
            "MaximumEventAgeInSeconds": c.maximum_event_age_s,
            "LastModified": c.last_modified,
            "DestinationConfig": {
                "OnSuccess": destination(&c.on_success),
                "OnFailure": destination(&c.on_failure),
            },
        })
    }
}

/// `GetFunctionConcurrency`'s answer (`{}` when none is reserved).
fn concurrency_json(record: &FunctionRecord) -> Value {
    match record.reserved_concurrency {
        Some(n) => json!({"ReservedConcurrentExecutions": n}),
        None => json!({}),
    }
}

/// The function the scheduler runs for a record (code not yet readied).
pub(crate) fn function_of(record: &FunctionRecord) -> Result<Function, String> {
    Ok(Function {
        name: record.name.clone(),
        code: record.code.clone(),
        runtime: record.image.clone(),
        handler: record.handler.clone(),
        memory_mb: record.memory_mb,
        timeout: std::time::Duration::from_secs(u64::from(record.timeout_s)),
        isolation: record.isolation.parse()?,
        max_concurrency: record.max_concurrency,
        env: record.env.clone(),
        // Not offered through the API yet: functions.toml's `snapstart` only.
        snapstart: false,
        network: crate::environment::Network::Outbound,
        layers: record.layers.iter().map(|l| l.code.clone()).collect(),
        // The server's choice (`serve --credentials`).
        credentials: None,
    })
}

/// `LastModified` now, as Lambda writes it (`2024-05-01T12:00:00.000+0000`).
pub(crate) fn last_modified() -> String {
    let stamp = crate::scheduler::timestamp();
    format!("{}+0000", stamp.trim_end_matches('Z'))
}

fn image(runtime: &str) -> Result<&'static str, ApiError> {
    image_of_runtime(runtime).ok_or_else(|| {
        ApiError::invalid(format!(
            "The runtime parameter of {runtime} is not supported by this server: use python3.N, nodejsN.x, provided.al2023 or provided.al2"
        ))
    })
}

fn check_architectures(architectures: Option<&[String]>) -> Result<(), ApiError> {
    match architectures {
        Some(a) if a.iter().any(|a| a != "x86_64") => Err(ApiError::invalid(
            "only the x86_64 architecture is supported".into(),
        )),
        _ => Ok(()),
    }
}

fn check_revision(record: &FunctionRecord, revision: Option<&str>) -> Result<(), ApiError> {
    match revision {
        Some(r) if r != record.revision_id => Err(revision_mismatch()),
        _ => Ok(()),
    }
}

fn revision_mismatch() -> ApiError {
    ApiError::Lambda(
        Kind::PreconditionFailed,
        "The Revision Id provided does not match the latest Revision Id. Call the GetFunction/GetAlias API to retrieve the latest Revision Id".into(),
    )
}

/// Whether `$LATEST` as it stands would publish the same version as `version`: the same
/// code and configuration.
fn same_snapshot(version: &FunctionRecord, latest: &FunctionRecord) -> bool {
    let key = |r: &FunctionRecord| {
        (
            r.code_sha256.clone(),
            r.code.clone(),
            r.runtime.clone(),
            r.handler.clone(),
            r.memory_mb,
            r.timeout_s,
            r.env.clone(),
            r.role.clone(),
            r.isolation.clone(),
        )
    };
    key(version) == key(latest)
}

/// An alias's name: Lambda's pattern (letters, digits, `-`, `_`; not only digits, which
/// would read as a version), 1..128 characters.
fn check_alias_name(name: &str) -> Result<(), ApiError> {
    let valid = (1..=128).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        && version_number(name).is_none();
    if valid {
        return Ok(());
    }
    Err(ApiError::validation(format!(
        "1 validation error detected: Value '{name}' at 'name' failed to satisfy constraint: Member must satisfy regular expression pattern: (?!^[0-9]+$)([a-zA-Z0-9-_]+)"
    )))
}

/// An alias's name as a path holds it (URL-encoded), checked.
fn alias_in_path(raw: &str) -> Result<String, ApiError> {
    let name = percent_encoding::percent_decode_str(raw)
        .decode_utf8_lossy()
        .into_owned();
    check_alias_name(&name)?;
    Ok(name)
}

/// Weighted aliases (`RoutingConfig.AdditionalVersionWeights`) are not served.
fn check_routing(routing: Option<&Value>) -> Result<(), ApiError> {
    let weights = routing.and_then(|r| r.get("AdditionalVersionWeights"));
    match weights {
        Some(Value::Object(w)) if !w.is_empty() => Err(ApiError::invalid(
            "weighted aliases (RoutingConfig.AdditionalVersionWeights) are not supported by this server: point the alias at one version".into(),
        )),
        _ => Ok(()),
    }
}

/// `MaxItems` of a list request: 1..=[`MAX_PAGE`], [`DEFAULT_PAGE`] when absent.
fn max_items(query: &BTreeMap<String, String>) -> Result<usize, ApiError> {
    match query.get("MaxItems") {
        None => Ok(DEFAULT_PAGE),
        Some(n) => n
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=MAX_PAGE).contains(n))
            .ok_or_else(|| {
                ApiError::validation(format!(
                    "1 validation error detected: Value '{n}' at 'maxItems' failed to satisfy constraint: Member must have value between 1 and {MAX_PAGE}"
                ))
            }),
    }
}

/// One page of `items` (in order) for `Marker`/`MaxItems`: the items after the marker
/// (`after(item, marker)`), at most `MaxItems` of them, and the next page's marker (the
/// `key` of the last shown) when more follow.
fn page<'a, T>(
    items: &'a [T],
    query: &BTreeMap<String, String>,
    key: impl Fn(&T) -> String,
    after: impl Fn(&T, &str) -> bool,
) -> Result<(&'a [T], Option<String>), ApiError> {
    let size = max_items(query)?;
    let start = match query.get("Marker") {
        Some(m) => items
            .iter()
            .position(|item| after(item, m))
            .unwrap_or(items.len()),
        None => 0,
    };
    let rest = &items[start..];
    let shown = &rest[..size.min(rest.len())];
    let next = (rest.len() > shown.len())
        .then(|| shown.last().map(&key))
        .flatten();
    Ok((shown, next))
}

/// A list's answer: `{field: items}`, with `NextMarker` when more follow.
fn paged(
    field: &str,
    items: Vec<Value>,
    next: Option<String>,
) -> Result<Response<Full<Bytes>>, ApiError> {
    let mut answer = json!({ field: items });
    if let Some(marker) = next {
        answer["NextMarker"] = json!(marker);
    }
    Ok(ok(&answer))
}

/// Lambda's settings that Create and UpdateFunctionConfiguration share, checked.
fn apply_settings(record: &mut FunctionRecord, s: Settings) -> Result<(), ApiError> {
    if let Some(m) = s.memory_size {
        if !MEMORY_MB.contains(&m) {
            return Err(ApiError::validation(format!("1 validation error detected: Value '{m}' at 'memorySize' failed to satisfy constraint: Member must have value between {} and {}", MEMORY_MB.start(), MEMORY_MB.end())));
        }
        record.memory_mb = m;
    }
    if let Some(t) = s.timeout {
        if !TIMEOUT_S.contains(&t) {
            return Err(ApiError::validation(format!("1 validation error detected: Value '{t}' at 'timeout' failed to satisfy constraint: Member must have value between {} and {}", TIMEOUT_S.start(), TIMEOUT_S.end())));
        }
        record.timeout_s = t;
    }
    if let Some(env) = s.environment {
        record.env = env.variables.unwrap_or_default();
    }
    Ok(())
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Settings {
    memory_size: Option<u32>,
    timeout: Option<u32>,
    environment: Option<EnvironmentInput>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct EnvironmentInput {
    variables: Option<BTreeMap<String, String>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct AliasInput {
    name: Option<String>,
    function_version: Option<String>,
    description: Option<String>,
    revision_id: Option<String>,
    routing_config: Option<Value>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct CreateInput {
    function_name: String,
    /// Publish version 1 once created.
    #[serde(default)]
    publish: bool,
    runtime: Option<String>,
    handler: Option<String>,
    role: Option<String>,
    description: Option<String>,
    code: CodeInput,
    package_type: Option<String>,
    architectures: Option<Vec<String>>,
    layers: Option<Vec<String>>,
    #[serde(flatten)]
    settings: Settings,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct UpdateCodeInput {
    #[serde(flatten)]
    code: CodeInput,
    architectures: Option<Vec<String>>,
    revision_id: Option<String>,
    #[serde(default)]
    dry_run: bool,
    /// Publish a version once updated.
    #[serde(default)]
    publish: bool,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct UpdateConfigInput {
    runtime: Option<String>,
    handler: Option<String>,
    role: Option<String>,
    description: Option<String>,
    revision_id: Option<String>,
    layers: Option<Vec<String>>,
    #[serde(flatten)]
    settings: Settings,
}

/// `Code` of CreateFunction, or the body of UpdateFunctionCode: only `ZipFile` is served.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct CodeInput {
    zip_file: Option<String>,
    s3_bucket: Option<String>,
    image_uri: Option<String>,
}

impl CodeInput {
    fn zip(&self) -> Result<Vec<u8>, ApiError> {
        if self.s3_bucket.is_some() || self.image_uri.is_some() {
            return Err(ApiError::invalid(
                "only Code.ZipFile is supported (no S3 or container images): upload the zip itself"
                    .into(),
            ));
        }
        let encoded = self
            .zip_file
            .as_deref()
            .ok_or_else(|| ApiError::invalid("Code.ZipFile is required".into()))?;
        let zip = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .map_err(|e| ApiError::invalid(format!("ZipFile is not base64: {e}")))?;
        if !zip.starts_with(b"PK") {
            return Err(ApiError::invalid(
                "Could not unzip uploaded file. Please check your file, then try to upload again."
                    .into(),
            ));
        }
        Ok(zip)
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct EventInvokeInput {
    maximum_retry_attempts: Option<u32>,
    maximum_event_age_in_seconds: Option<u32>,
    destination_config: Option<DestinationConfigInput>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DestinationConfigInput {
    on_success: Option<DestinationInput>,
    on_failure: Option<DestinationInput>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DestinationInput {
    destination: Option<String>,
}

fn parse_input<T: serde::de::DeserializeOwned>(body: Value) -> Result<T, ApiError> {
    serde_json::from_value(body).map_err(|e| ApiError::invalid(format!("{e}")))
}

fn ok(value: &Value) -> Response<Full<Bytes>> {
    json_response(StatusCode::OK, value)
}

fn unknown(method: &Method, path: &str) -> ApiError {
    ApiError::Lambda(Kind::Unknown, format!("Unknown operation: {method} {path}"))
}

/// Lambda's error types this API answers with.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Invalid,
    Validation,
    NotFound,
    Conflict,
    PreconditionFailed,
    BadContent,
    Unknown,
    Service,
}

impl Kind {
    /// The status code and the `x-amzn-ErrorType`.
    fn wire(self) -> (StatusCode, &'static str) {
        match self {
            Kind::Invalid => (StatusCode::BAD_REQUEST, "InvalidParameterValueException"),
            Kind::Validation => (StatusCode::BAD_REQUEST, "ValidationException"),
            Kind::NotFound => (StatusCode::NOT_FOUND, "ResourceNotFoundException"),
            Kind::Conflict => (StatusCode::CONFLICT, "ResourceConflictException"),
            Kind::PreconditionFailed => (
                StatusCode::PRECONDITION_FAILED,
                "PreconditionFailedException",
            ),
            Kind::BadContent => (StatusCode::BAD_REQUEST, "InvalidRequestContentException"),
            Kind::Unknown => (StatusCode::NOT_FOUND, "UnknownOperationException"),
            Kind::Service => (StatusCode::INTERNAL_SERVER_ERROR, "ServiceException"),
        }
    }
}

/// A control-plane call's failure, as Lambda types it.
#[derive(Debug)]
enum ApiError {
    /// An answer made already (a body too large or too slow); boxed, as it is rare.
    Ready(Box<Response<Full<Bytes>>>),
    Lambda(Kind, String),
}

impl ApiError {
    fn invalid(message: String) -> Self {
        Self::Lambda(Kind::Invalid, message)
    }
    fn validation(message: String) -> Self {
        Self::Lambda(Kind::Validation, message)
    }
    fn not_found(message: String) -> Self {
        Self::Lambda(Kind::NotFound, message)
    }
    fn conflict(message: String) -> Self {
        Self::Lambda(Kind::Conflict, message)
    }
    fn service(message: String) -> Self {
        Self::Lambda(Kind::Service, message)
    }
    fn store(e: anyhow::Error) -> Self {
        tracing::error!(error = %format!("{e:#}"), "the database failed");
        Self::service(format!("the database failed: {e:#}"))
    }

    fn answer(self) -> Response<Full<Bytes>> {
        match self {
            Self::Ready(r) => *r,
            Self::Lambda(kind, message) => {
                let (status, error_type) = kind.wire();
                lambda_error(status, error_type, &message)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lambda_runtimes_map_onto_kindlings_images() {
        for (runtime, image) in [
            ("python3.12", Some("python")),
            ("python3.9", Some("python")),
            ("nodejs22.x", Some("node")),
            ("provided.al2023", Some("provided")),
            ("provided.al2", Some("provided")),
            ("python2.7", None),
            ("python3.", None),
            ("nodejs.x", None),
            ("ruby3.3", None),
            ("java21", None),
        ] {
            assert_eq!(image_of_runtime(runtime), image, "{runtime}");
        }
    }

    #[test]
    fn pages_follow_their_marker() {
        let items: Vec<u32> = (1..=5).collect();
        let query = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let key = |n: &u32| n.to_string();
        let after = |n: &u32, m: &str| m.parse::<u32>().is_ok_and(|m| *n > m);
        let (shown, next) = page(&items, &query(&[("MaxItems", "2")]), key, after).unwrap();
        assert_eq!((shown, next.as_deref()), (&[1, 2][..], Some("2")));
        let q = query(&[("MaxItems", "2"), ("Marker", "4")]);
        let (shown, next) = page(&items, &q, key, after).unwrap();
        assert_eq!((shown, next), (&[5][..], None));
        assert!(page(&items, &query(&[("MaxItems", "0")]), key, after).is_err());
        for bad in ["", "1", "123", "a b", "$LATEST"] {
            assert!(check_alias_name(bad).is_err(), "{bad:?}");
        }
        for good in ["live", "v1", "1a", "a-b_c"] {
            assert!(check_alias_name(good).is_ok(), "{good:?}");
        }
        assert!(handles("/2015-03-31/functions/"));
        assert!(handles("/2015-03-31/functions/f/configuration"));
        assert!(!handles("/2015-03-31/functions/f/invocations"));
        assert!(handles("/2019-09-25/functions/f/event-invoke-config"));
    }
}
