//! Function URLs through the control plane: `Create`/`Get`/`Update`/`DeleteFunctionUrlConfig`
//! and `ListFunctionUrlConfigs` (`/2021-10-31/functions/{name}/url` and `.../urls`).
//!
//! A URL is served at once on a listener of its own at the Invoke API's address (see
//! [`crate::function_url`]); `FunctionUrl` in the answers is that real local URL, and its
//! port is kept in the registry so that the URL stays the same across restarts. Only
//! `AuthType` `NONE` is served: `AWS_IAM` is refused, since Kindling checks no SigV4
//! signatures and a URL that let every caller in would say otherwise. `Cors` is kept and
//! returned, not applied. A URL serves `$LATEST`: a `Qualifier` other than `$LATEST` is
//! refused. functions.toml's URLs (`url = true`) are shown by `Get` and `List`, and
//! changed only in the file.

use std::collections::BTreeMap;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{last_modified, ok, paged, parse_input, unknown, ApiError, ControlPlane};
use crate::function_url::PayloadFormat;
use crate::invoke_api::status_only;
use crate::store::{Origin, UrlRecord};

/// The control plane's function URL paths.
pub(super) const URLS_2021: &str = "/2021-10-31/functions/";

/// The URL's auth types Lambda knows, and the one served.
const AUTH_NONE: &str = "NONE";
const AUTH_IAM: &str = "AWS_IAM";
const INVOKE_MODES: [&str; 2] = ["BUFFERED", "RESPONSE_STREAM"];

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
struct UrlInput {
    auth_type: Option<String>,
    cors: Option<Value>,
    invoke_mode: Option<String>,
}

impl ControlPlane {
    /// Every request under [`URLS_2021`]: `{name}/url` or `{name}/urls`.
    pub(super) async fn route_url(
        &self,
        req: Request<Incoming>,
        rest: &str,
        raw_query: &str,
        query: &BTreeMap<String, String>,
    ) -> Result<Response<Full<Bytes>>, ApiError> {
        let method = &req.method().clone();
        let path = req.uri().path().to_string();
        let path = path.as_str();
        if let Some(name) = rest.strip_suffix("/urls") {
            if method != Method::GET {
                return Err(unknown(method, path));
            }
            let name = self.latest_in_path(name, "")?;
            return self.list_urls(&name, query);
        }
        let name = rest
            .strip_suffix("/url")
            .ok_or_else(|| unknown(method, path))?;
        // A URL serves `$LATEST` here: versions and aliases have none of their own.
        let name = self.latest_in_path(name, raw_query)?;
        match *method {
            Method::POST => self.create_url(&name, self.json_body(req).await?).await,
            Method::PUT => self.update_url(&name, self.json_body(req).await?).await,
            Method::GET => {
                let shown = self.url_json(&name)?;
                Ok(ok(&shown))
            }
            Method::DELETE => self.delete_url(&name).await,
            _ => Err(unknown(method, path)),
        }
    }

    /// The URL the server serves a function on.
    fn url_of(&self, name: &str) -> Result<String, ApiError> {
        self.urls
            .addr(name)
            .map(|addr| format!("http://{addr}/"))
            .ok_or_else(|| ApiError::not_found("The resource you requested does not exist.".into()))
    }

    /// A function's URL configuration, as `GetFunctionUrlConfig` answers it.
    fn url_json(&self, name: &str) -> Result<Value, ApiError> {
        let record = self.record(name)?;
        let url = self.url_of(name)?;
        let mut shown = json!({
            "FunctionUrl": url,
            "FunctionArn": self.arn(name),
            "AuthType": AUTH_NONE,
            "InvokeMode": "BUFFERED",
        });
        match &record.url {
            Some(u) => {
                shown["AuthType"] = json!(u.auth_type);
                shown["InvokeMode"] = json!(u.invoke_mode);
                shown["CreationTime"] = json!(u.creation_time);
                shown["LastModifiedTime"] = json!(u.last_modified);
                if let Some(cors) = &u.cors {
                    shown["Cors"] = cors.clone();
                }
            }
            // functions.toml's: as old as this start.
            None => {
                shown["CreationTime"] = json!(record.last_modified);
                shown["LastModifiedTime"] = json!(record.last_modified);
            }
        }
        Ok(shown)
    }

    async fn create_url(&self, name: &str, body: Value) -> Result<Response<Full<Bytes>>, ApiError> {
        let input: UrlInput = parse_input(body)?;
        let auth_type = input
            .auth_type
            .ok_or_else(|| ApiError::invalid("AuthType is required: NONE".into()))?;
        check_auth_type(&auth_type)?;
        let invoke_mode = check_invoke_mode(input.invoke_mode)?;
        let _change = self.changes.lock().await;
        let mut record = self.changeable(name)?;
        if record.url.is_some() {
            return Err(ApiError::conflict(format!(
                "Failed to create function url config for [functionArn = {}]. Error message:  FunctionUrlConfig exists for this Lambda function",
                self.arn(name)
            )));
        }
        let listener =
            self.urls.bind(0).await.map_err(|e| {
                ApiError::service(format!("cannot listen for the function URL: {e}"))
            })?;
        let port = listener
            .local_addr()
            .map_err(|e| ApiError::service(format!("{e}")))?
            .port();
        let now = last_modified();
        record.url = Some(UrlRecord {
            port,
            auth_type,
            invoke_mode,
            cors: input.cors,
            creation_time: now.clone(),
            last_modified: now,
        });
        self.store.put_function(&record).map_err(ApiError::store)?;
        self.urls
            .serve(name, listener, PayloadFormat::V2)
            .map_err(|e| ApiError::service(format!("cannot serve the function URL: {e}")))?;
        tracing::info!(function = %name, url = %self.url_of(name)?, "function URL created");
        let mut shown = self.url_json(name)?;
        if let Some(o) = shown.as_object_mut() {
            o.remove("LastModifiedTime");
        }
        let mut answer = ok(&shown);
        *answer.status_mut() = StatusCode::CREATED;
        Ok(answer)
    }

    async fn update_url(&self, name: &str, body: Value) -> Result<Response<Full<Bytes>>, ApiError> {
        let input: UrlInput = parse_input(body)?;
        if let Some(auth_type) = &input.auth_type {
            check_auth_type(auth_type)?;
        }
        let invoke_mode = input
            .invoke_mode
            .map(|m| check_invoke_mode(Some(m)))
            .transpose()?;
        let _change = self.changes.lock().await;
        let mut record = self.changeable(name)?;
        let url = record.url.as_mut().ok_or_else(|| {
            ApiError::not_found("The resource you requested does not exist.".into())
        })?;
        if let Some(auth_type) = input.auth_type {
            url.auth_type = auth_type;
        }
        if let Some(mode) = invoke_mode {
            url.invoke_mode = mode;
        }
        if input.cors.is_some() {
            url.cors = input.cors;
        }
        url.last_modified = last_modified();
        self.store.put_function(&record).map_err(ApiError::store)?;
        Ok(ok(&self.url_json(name)?))
    }

    async fn delete_url(&self, name: &str) -> Result<Response<Full<Bytes>>, ApiError> {
        let _change = self.changes.lock().await;
        let mut record = self.changeable(name)?;
        if record.url.take().is_none() {
            return Err(ApiError::not_found(
                "The resource you requested does not exist.".into(),
            ));
        }
        self.store.put_function(&record).map_err(ApiError::store)?;
        self.urls.remove(name);
        tracing::info!(function = %name, "function URL deleted");
        Ok(status_only(StatusCode::NO_CONTENT))
    }

    /// `ListFunctionUrlConfigs`: a function has one URL at most here (its `$LATEST`'s).
    fn list_urls(
        &self,
        name: &str,
        query: &BTreeMap<String, String>,
    ) -> Result<Response<Full<Bytes>>, ApiError> {
        let record = self.record(name)?;
        let has_url = record.url.is_some() || record.origin == Origin::File;
        let all: Vec<Value> = match has_url.then(|| self.url_json(name)) {
            Some(Ok(shown)) => vec![shown],
            Some(Err(ApiError::Lambda(super::Kind::NotFound, _))) | None => Vec::new(),
            Some(Err(e)) => return Err(e),
        };
        let (shown, next) = super::page(
            &all,
            query,
            |v| v["FunctionUrl"].as_str().unwrap_or_default().to_string(),
            |v, m| v["FunctionUrl"].as_str().is_some_and(|u| u > m),
        )?;
        paged("FunctionUrlConfigs", shown.to_vec(), next)
    }

    /// Stops a deleted function's URL.
    pub(super) fn forget_url(&self, name: &str) {
        self.urls.remove(name);
    }
}

fn check_auth_type(auth_type: &str) -> Result<(), ApiError> {
    match auth_type {
        AUTH_NONE => Ok(()),
        AUTH_IAM => Err(ApiError::invalid(
            "AuthType AWS_IAM is not served: Kindling does not check SigV4 signatures on function URLs; use NONE (the URL listens on the Invoke API's address only)"
                .into(),
        )),
        other => Err(ApiError::validation(format!(
            "1 validation error detected: Value '{other}' at 'authType' failed to satisfy constraint: Member must satisfy enum value set: [NONE, AWS_IAM]"
        ))),
    }
}

/// `InvokeMode` (default `BUFFERED`). Either way a function that streams is streamed.
fn check_invoke_mode(mode: Option<String>) -> Result<String, ApiError> {
    let mode = mode.unwrap_or_else(|| INVOKE_MODES[0].to_string());
    if INVOKE_MODES.contains(&mode.as_str()) {
        Ok(mode)
    } else {
        Err(ApiError::validation(format!(
            "1 validation error detected: Value '{mode}' at 'invokeMode' failed to satisfy constraint: Member must satisfy enum value set: [BUFFERED, RESPONSE_STREAM]"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_none_is_served() {
        assert!(check_auth_type("NONE").is_ok());
        let iam = format!("{:?}", check_auth_type("AWS_IAM").unwrap_err());
        assert!(iam.contains("does not check SigV4"), "{iam}");
        assert!(check_auth_type("none").is_err());
        assert_eq!(check_invoke_mode(None).unwrap(), "BUFFERED");
        assert!(check_invoke_mode(Some("STREAM".into())).is_err());
    }
}
