//! Layers through the control plane: `PublishLayerVersion` (from `Content.ZipFile`),
//! `GetLayerVersion`, `GetLayerVersionByArn`, `ListLayers`, `ListLayerVersions` and
//! `DeleteLayerVersion` (`/2018-10-31/layers...`), and the `Layers` ARNs of
//! `CreateFunction` and `UpdateFunctionConfiguration` ([`ControlPlane::layers_of`]).
//!
//! A layer's zip goes to the content-addressed code store, checked as a function's layers
//! are unpacked (no escaping paths or links, Lambda's sizes); a function that uses it
//! gets it in `/opt` as functions.toml's `layers` do. Version numbers count from 1 per
//! name and are never reused. A deleted version stays with the functions that use it,
//! as in Lambda, and its zip leaves the store with the last of them.

use std::collections::BTreeMap;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{
    last_modified, ok, page, paged, parse_input, unknown, ApiError, CodeInput, ControlPlane,
    DeployError,
};
use crate::invoke_api::status_only;
use crate::store::{LayerRecord, LayerUse};

/// The control plane's layer paths.
pub(super) const LAYERS_2018: &str = "/2018-10-31/layers";

/// Layers a function may have, as in Lambda.
const MAX_LAYERS: usize = 5;
/// A layer name's longest, as Lambda's.
const MAX_NAME: usize = 140;

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct PublishInput {
    description: Option<String>,
    content: CodeInput,
    #[serde(default)]
    compatible_runtimes: Vec<String>,
    #[serde(default)]
    compatible_architectures: Vec<String>,
    license_info: Option<String>,
}

impl ControlPlane {
    /// Every request under [`LAYERS_2018`].
    pub(super) async fn route_layers(
        &self,
        req: Request<Incoming>,
        rest: &str,
        query: &BTreeMap<String, String>,
    ) -> Result<Response<Full<Bytes>>, ApiError> {
        let method = req.method().clone();
        let path = req.uri().path().to_string();
        let parts: Vec<&str> = rest.trim_start_matches('/').split('/').collect();
        match (&method, parts.as_slice()) {
            (&Method::GET, [""]) => match query.get("find").map(String::as_str) {
                Some("LayerVersion") => {
                    let arn = query.get("Arn").map(String::as_str).unwrap_or_default();
                    let (name, version) = self.parse_version_arn(arn)?;
                    Ok(ok(&self.layer_json(&self.layer(&name, version)?)))
                }
                Some(_) => Err(unknown(&method, &path)),
                None => self.list_layers(query),
            },
            (&Method::POST, [name, "versions"]) => {
                let name = layer_name(name)?;
                let body = self.json_body(req).await?;
                self.publish_layer(&name, body).await
            }
            (&Method::GET, [name, "versions"]) => {
                let name = layer_name(name)?;
                self.list_layer_versions(&name, query)
            }
            (&Method::GET | &Method::DELETE, [name, "versions", version]) => {
                let name = layer_name(name)?;
                let version = version_in_path(version)?;
                if method == Method::GET {
                    return Ok(ok(&self.layer_json(&self.layer(&name, version)?)));
                }
                let _change = self.changes.lock().await;
                // Lambda answers 204 whether or not the version existed.
                if let Some(layer) = self.store.layer(&name, version).map_err(ApiError::store)? {
                    self.store
                        .delete_layer(&name, version)
                        .map_err(ApiError::store)?;
                    self.forget_code(&layer.code);
                    tracing::info!(layer = %name, version, "layer version deleted");
                }
                Ok(status_only(StatusCode::NO_CONTENT))
            }
            _ => Err(unknown(&method, &path)),
        }
    }

    /// `arn:aws:lambda:REGION:ACCOUNT:layer:NAME`.
    fn layer_arn(&self, name: &str) -> String {
        // The function ARN's prefix, `arn:aws:lambda:REGION:ACCOUNT:`.
        let function = self.arn("");
        let prefix = function.trim_end_matches("function:");
        format!("{prefix}layer:{name}")
    }

    /// A layer version's ARN → its name and number, if it is this server's.
    fn parse_version_arn(&self, arn: &str) -> Result<(String, u64), ApiError> {
        let refused = || {
            ApiError::invalid(format!(
                "{arn:?} is not a layer version ARN of this server ({}:VERSION)",
                self.layer_arn("NAME")
            ))
        };
        let (layer, version) = arn.rsplit_once(':').ok_or_else(refused)?;
        let name = layer
            .strip_prefix(&self.layer_arn(""))
            .filter(|n| !n.is_empty())
            .ok_or_else(refused)?;
        let version = super::version_number(version).ok_or_else(refused)?;
        Ok((name.to_string(), version))
    }

    fn layer(&self, name: &str, version: u64) -> Result<LayerRecord, ApiError> {
        self.store
            .layer(name, version)
            .map_err(ApiError::store)?
            .ok_or_else(|| ApiError::not_found("The resource you requested does not exist.".into()))
    }

    /// The layer versions `Layers` names, in order, for a function to use.
    pub(super) fn layers_of(&self, arns: &[String]) -> Result<Vec<LayerUse>, ApiError> {
        if arns.len() > MAX_LAYERS {
            return Err(ApiError::invalid(format!(
                "{} layers; a function has at most {MAX_LAYERS}",
                arns.len()
            )));
        }
        arns.iter()
            .map(|arn| {
                let (name, version) = self.parse_version_arn(arn)?;
                let layer = self
                    .store
                    .layer(&name, version)
                    .map_err(ApiError::store)?
                    .ok_or_else(|| {
                        ApiError::invalid(format!("Layer version {arn} does not exist."))
                    })?;
                Ok(LayerUse {
                    arn: arn.clone(),
                    code: layer.code,
                    code_size: layer.code_size,
                })
            })
            .collect()
    }

    /// A layer version as `GetLayerVersion` and `PublishLayerVersion` answer it.
    fn layer_json(&self, l: &LayerRecord) -> Value {
        let mut shown = self.version_json(l);
        shown["LayerArn"] = json!(self.layer_arn(&l.name));
        shown["Content"] = json!({
            "Location": l.code.display().to_string(),
            "CodeSha256": l.code_sha256,
            "CodeSize": l.code_size,
        });
        shown
    }

    /// A layer version as `ListLayerVersions` lists it.
    fn version_json(&self, l: &LayerRecord) -> Value {
        let mut shown = json!({
            "LayerVersionArn": format!("{}:{}", self.layer_arn(&l.name), l.version),
            "Version": l.version,
            "Description": l.description,
            "CreatedDate": l.created_date,
            "CompatibleRuntimes": l.compatible_runtimes,
            "CompatibleArchitectures": l.compatible_architectures,
        });
        if let Some(license) = &l.license_info {
            shown["LicenseInfo"] = json!(license);
        }
        shown
    }

    async fn publish_layer(
        &self,
        name: &str,
        body: Value,
    ) -> Result<Response<Full<Bytes>>, ApiError> {
        let input: PublishInput = parse_input(body)?;
        if input.compatible_architectures.iter().any(|a| a != "x86_64") {
            return Err(ApiError::invalid(
                "only the x86_64 architecture is supported".into(),
            ));
        }
        let zip = input.content.zip()?;
        let _change = self.changes.lock().await;
        let (code, code_sha256, code_size) = self.keep_code(&zip)?;
        let deployer = self.deployer.clone();
        let checked_zip = code.clone();
        let checked = tokio::task::spawn_blocking(move || deployer.check_layer(&checked_zip))
            .await
            .map_err(|e| ApiError::service(format!("checking the layer failed: {e}")));
        let refusal = match checked {
            Ok(Ok(())) => None,
            Ok(Err(DeployError::Refused(why))) => Some(ApiError::invalid(why)),
            Ok(Err(DeployError::Failed(e))) => Some(ApiError::service(format!("{e:#}"))),
            Err(e) => Some(e),
        };
        if let Some(e) = refusal {
            self.forget_code(&code);
            return Err(e);
        }
        let record = self
            .store
            .publish_layer(LayerRecord {
                name: name.to_string(),
                version: 0,
                description: input.description.unwrap_or_default(),
                compatible_runtimes: input.compatible_runtimes,
                compatible_architectures: input.compatible_architectures,
                license_info: input.license_info,
                created_date: last_modified(),
                code,
                code_sha256,
                code_size,
            })
            .map_err(ApiError::store)?;
        tracing::info!(layer = %name, version = record.version, "layer version published");
        let mut answer = ok(&self.layer_json(&record));
        *answer.status_mut() = StatusCode::CREATED;
        Ok(answer)
    }

    /// `ListLayerVersions`: newest first, those compatible with `CompatibleRuntime` when
    /// given.
    fn list_layer_versions(
        &self,
        name: &str,
        query: &BTreeMap<String, String>,
    ) -> Result<Response<Full<Bytes>>, ApiError> {
        let all = self.compatible(Some(name), query)?;
        let (shown, next) = page(
            &all,
            query,
            |l| l.version.to_string(),
            |l, m| m.parse::<u64>().is_ok_and(|m| l.version < m),
        )?;
        paged(
            "LayerVersions",
            shown.iter().map(|l| self.version_json(l)).collect(),
            next,
        )
    }

    /// `ListLayers`: each layer with its newest (compatible) version, by name.
    fn list_layers(
        &self,
        query: &BTreeMap<String, String>,
    ) -> Result<Response<Full<Bytes>>, ApiError> {
        let mut newest: Vec<LayerRecord> = Vec::new();
        for l in self.compatible(None, query)? {
            // Sorted by name, then newest first: a name's first is its newest.
            if newest.last().is_none_or(|n| n.name != l.name) {
                newest.push(l);
            }
        }
        let (shown, next) = page(
            &newest,
            query,
            |l| l.name.clone(),
            |l, m| l.name.as_str() > m,
        )?;
        let layers = shown
            .iter()
            .map(|l| {
                json!({
                    "LayerName": l.name,
                    "LayerArn": self.layer_arn(&l.name),
                    "LatestMatchingVersion": self.version_json(l),
                })
            })
            .collect();
        paged("Layers", layers, next)
    }

    fn compatible(
        &self,
        name: Option<&str>,
        query: &BTreeMap<String, String>,
    ) -> Result<Vec<LayerRecord>, ApiError> {
        let mut all = self.store.layer_versions(name).map_err(ApiError::store)?;
        if let Some(runtime) = query.get("CompatibleRuntime") {
            all.retain(|l| l.compatible_runtimes.contains(runtime));
        }
        if let Some(arch) = query.get("CompatibleArchitecture") {
            all.retain(|l| l.compatible_architectures.contains(arch));
        }
        Ok(all)
    }
}

/// A layer name in a path (or its ARN's last part): Lambda's `[a-zA-Z0-9-_]+`, at most
/// [`MAX_NAME`] characters.
fn layer_name(raw: &str) -> Result<String, ApiError> {
    let decoded = percent_encoding::percent_decode_str(raw).decode_utf8_lossy();
    let name = decoded.rsplit(':').next().unwrap_or_default();
    let fits = !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if fits {
        Ok(name.to_string())
    } else {
        Err(ApiError::validation(format!(
            "1 validation error detected: Value '{decoded}' at 'layerName' failed to satisfy constraint: Member must satisfy regular expression pattern: [a-zA-Z0-9-_]+"
        )))
    }
}

fn version_in_path(raw: &str) -> Result<u64, ApiError> {
    super::version_number(raw)
        .filter(|v| *v > 0)
        .ok_or_else(|| {
            ApiError::validation(format!(
                "1 validation error detected: Value '{raw}' at 'versionNumber' failed to satisfy constraint: Member must be a number"
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_names_are_lambdas() {
        assert_eq!(layer_name("deps").unwrap(), "deps");
        assert_eq!(
            layer_name("arn%3Aaws%3Alambda%3Aus-east-1%3A000000000000%3Alayer%3Adeps").unwrap(),
            "deps"
        );
        for bad in ["", "a.b", "a%20b", &"x".repeat(141)] {
            assert!(layer_name(bad).is_err(), "{bad:?}");
        }
        assert_eq!(version_in_path("3").unwrap(), 3);
        assert!(version_in_path("0").is_err());
        assert!(version_in_path("x").is_err());
    }
}
