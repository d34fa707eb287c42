//! `/v1/devices/posture`.
//!
//! - `POST` with `Content-Type: application/jwt` (or `application/jose`): a signed report from a
//!   posture issuer. The signature is the credential: no user token is needed. If a device
//!   certificate is presented too, the report must be about that device.
//! - `POST` with `Content-Type: application/json`: a self-report ([`super::SelfReport`]) from the
//!   device agent, over mTLS with the device certificate, which names the device.
//! - `GET /v1/devices/posture` and `GET /v1/devices/posture?device=<id>`: read records. These go
//!   through authentication and policy like `/v1/locks` (a non-resource URL).

use std::time::SystemTime;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};

use super::{PostureError, SelfReport};
use crate::body::Body;
use crate::refusal::PipelineError;
use crate::state::SharedStore;

pub const PATH: &str = crate::route::POSTURE_PATH;

/// What the posture API uses: the state store (where records are kept) and the posture service
/// (its issuers and requirements), when device posture is configured.
pub struct PostureApi {
    pub store: SharedStore,
    pub posture: Option<std::sync::Arc<super::PostureService>>,
}

/// Largest report body accepted.
pub const MAX_REPORT_BYTES: usize = 64 * 1024;

/// Serves `POST /v1/devices/posture`. `device` is the device id of the presented device
/// certificate, when there is one.
pub async fn report<B>(
    api: &PostureApi,
    req: Request<B>,
    device: Option<String>,
) -> Result<Response<Body>, PipelineError>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<crate::body::BoxError>,
{
    let svc = api
        .posture
        .as_ref()
        .ok_or(PostureError::NotAccepted("posture reports"))?;
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or_default()
                .trim()
                .to_ascii_lowercase()
        })
        .unwrap_or_default();
    let body = Limited::new(req.into_body(), MAX_REPORT_BYTES)
        .collect()
        .await
        .map_err(|_| PipelineError::BodyTooLarge {
            limit: MAX_REPORT_BYTES as u64,
        })?
        .to_bytes();
    let now = SystemTime::now();
    let record = match content_type.as_str() {
        "application/jwt" | "application/jose" => {
            let token = std::str::from_utf8(&body)
                .map_err(|_| PostureError::Rejected("report is not UTF-8".into()))?
                .trim();
            svc.verify_signed(token, device.as_deref(), now).await?
        }
        "application/json" => {
            let device = device.ok_or(PostureError::NoDevice)?;
            let report: SelfReport = serde_json::from_slice(&body)
                .map_err(|e| PostureError::BadReport(e.to_string()))?;
            svc.self_report(&device, report, now)?
        }
        _ => {
            return Err(PostureError::BadReport(
                "Content-Type must be application/jwt (signed report) or application/json \
                 (self-report)"
                    .into(),
            )
            .into())
        }
    };
    let record = svc.store(&api.store, record, now).await?;
    tracing::info!(
        device = %record.device_id,
        source = %record.source,
        summary = %super::summary(&record, now),
        "posture record stored"
    );
    Ok(crate::body::json_response(StatusCode::OK, &record))
}

/// Serves `GET /v1/devices/posture` (all records in force) and
/// `GET /v1/devices/posture?device=<id>` (one) for a caller policy allowed.
pub fn read<B>(api: &PostureApi, req: &Request<B>) -> Result<Response<Body>, PipelineError> {
    if req.method() != Method::GET || req.uri().path() != PATH {
        return Err(PipelineError::BadRequest(
            "use POST /v1/devices/posture to report, GET /v1/devices/posture[?device=<id>] to read"
                .into(),
        ));
    }
    let now = SystemTime::now();
    let device = req
        .uri()
        .query()
        .and_then(|q| url_params(q).find(|(k, _)| k == "device").map(|(_, v)| v));
    match device {
        None => {
            let (_, state) = api.store.snapshot();
            let items: Vec<_> = state
                .posture
                .into_values()
                .filter(|r| !r.is_expired(now))
                .collect();
            Ok(crate::body::json_response(
                StatusCode::OK,
                &serde_json::json!({"kind": "PostureRecordList", "items": items}),
            ))
        }
        Some(id) => match api.store.view().posture_at(&id, now) {
            Some(r) => Ok(crate::body::json_response(StatusCode::OK, &r)),
            None => Err(PipelineError::NotFound("posture record")),
        },
    }
}

/// `k=v&...` pairs, percent-decoded (`+` is a space, as in forms).
fn url_params(q: &str) -> impl Iterator<Item = (String, String)> + '_ {
    q.split('&').filter(|p| !p.is_empty()).map(|p| {
        let (k, v) = p.split_once('=').unwrap_or((p, ""));
        let dec = |s: &str| {
            percent_encoding::percent_decode_str(&s.replace('+', " "))
                .decode_utf8_lossy()
                .into_owned()
        };
        (dec(k), dec(v))
    })
}
