//! Locks (revocation): the `/v1/locks` API, and the task that closes live streams a new lock
//! matches (and asks the re-verifier to check a device's streams when its posture changes). New requests are checked against the store's in-memory index in the pipeline.
//!
//! Who may manage locks is decided by policy: the API is a non-resource URL (`/v1/locks`,
//! actions `get`, `post`, `delete`), so a permit such as
//! `permit (principal in k8s::Group::"security", action, resource is k8s::NonResourceURL)
//! when { resource.path like "/v1/locks*" };` grants it. Without policies the API is refused.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use serde::Deserialize;

use crate::authn::Identity;
use crate::body::Body;
use crate::refusal::PipelineError;
use crate::state::{ChangeKind, Lock, LockTarget, SharedStore};
use crate::streams::{StreamRegistry, StreamSubject};

pub const PATH: &str = crate::route::LOCKS_PATH;

/// What the locks API and its enforcer use: the state store (where locks are kept) and the
/// registry of live streams (which a new lock closes).
#[derive(Clone)]
pub struct LocksApi {
    pub store: SharedStore,
    pub streams: Arc<StreamRegistry>,
}

/// Does `lock` apply to the holder of a stream? The same match as for a new request.
pub fn applies_to(lock: &Lock, s: &StreamSubject) -> bool {
    lock.target.matches(&s.lock_subject())
}

fn why(lock: &Lock) -> crate::streams::CloseReason {
    crate::streams::CloseReason::forbidden(crate::errors::messages::locked(&lock.message))
}

/// Closes live streams as soon as a lock that matches them is written (by this replica or, with
/// a shared store, any other).
pub fn spawn_enforcer(api: LocksApi, stop: tokio_util::sync::CancellationToken) {
    spawn_staleness_guard(api.clone(), stop.clone());
    let mut changes = api.store.subscribe();
    tokio::spawn(async move {
        loop {
            let change = tokio::select! {
                _ = stop.cancelled() => return,
                c = changes.recv() => c,
            };
            match change {
                Ok(c) => match c.kind {
                    ChangeKind::LockPut(lock) => {
                        let n = api
                            .streams
                            .close_matching(|s| applies_to(&lock, s), &why(&lock));
                        if n > 0 {
                            tracing::info!(lock = %lock.id, streams = n, "lock closed live streams");
                        }
                    }
                    // The device's streams are checked against its new posture (or its absence).
                    ChangeKind::PosturePut(device) | ChangeKind::PostureDeleted(device) => {
                        api.streams.recheck_device(&device);
                    }
                    ChangeKind::LockDeleted(_) => {}
                },
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                    // Missed changes: check every stream against the current locks and posture.
                    let locks = api.store.locks();
                    for lock in &locks {
                        api.streams
                            .close_matching(|s| applies_to(lock, s), &why(lock));
                    }
                    api.streams.recheck_all();
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            }
        }
    });
}

/// How often the state store's health is looked at.
const HEALTH_TICK: Duration = Duration::from_millis(200);

/// Watches the state store's health: logs when a shared store stops (and starts again)
/// confirming its view, and once it is stale closes every live stream, as the pipeline refuses
/// new requests: a lock written meanwhile could not be seen here.
fn spawn_staleness_guard(api: LocksApi, stop: tokio_util::sync::CancellationToken) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(HEALTH_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last = crate::state::StoreHealth::Current;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let health = api.store.health();
            if health.is_stale() {
                let n = api.streams.close_matching(
                    |_| true,
                    &crate::streams::CloseReason::unavailable(crate::errors::messages::STATE_STALE),
                );
                if !last.is_stale() {
                    tracing::error!(
                        state = %health,
                        streams_closed = n,
                        "state store stale: refusing requests and closing live streams"
                    );
                }
            } else if !health.is_current() && last.is_current() {
                tracing::warn!(state = %health, "state store not confirmed current: not ready");
            } else if health.is_current() && !last.is_current() {
                tracing::info!("state store confirmed current again: ready");
            }
            last = health;
        }
    });
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct NewLock {
    target: LockTarget,
    #[serde(default)]
    message: String,
    /// Seconds until the lock lapses; absent: until deleted.
    #[serde(default)]
    ttl_seconds: Option<u64>,
}

fn store_error(e: crate::state::StoreError) -> PipelineError {
    tracing::error!(error = %e, "lock store write failed");
    PipelineError::StoreUnavailable(e)
}

/// Serves `GET /v1/locks`, `POST /v1/locks`, `DELETE /v1/locks/<id>` for an authorized caller.
pub async fn serve<B>(
    api: &LocksApi,
    req: Request<B>,
    caller: &Identity,
) -> Result<Response<Body>, PipelineError>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<crate::body::BoxError>,
{
    let path = req.uri().path().to_owned();
    let id = path.strip_prefix(PATH).and_then(|r| r.strip_prefix('/'));
    match (req.method().clone(), id) {
        (Method::GET, None) => Ok(crate::body::json_response(
            StatusCode::OK,
            &serde_json::json!({"kind": "LockList", "items": api.store.locks()}),
        )),
        (Method::GET, Some(id)) => match api.store.lock(id) {
            Some(l) => Ok(crate::body::json_response(StatusCode::OK, &l)),
            None => Err(PipelineError::NotFound("lock")),
        },
        (Method::POST, None) => {
            let body = Limited::new(req.into_body(), 64 * 1024)
                .collect()
                .await
                .map_err(|_| PipelineError::BodyTooLarge { limit: 64 * 1024 })?
                .to_bytes();
            let new: NewLock = serde_json::from_slice(&body)
                .map_err(|e| PipelineError::BadRequest(format!("not a lock: {e}").into()))?;
            let expires_at = new
                .ttl_seconds
                .map(|s| SystemTime::now() + Duration::from_secs(s));
            let lock = Lock::new(new.target, new.message, expires_at, caller.user())
                .map_err(store_error)?;
            api.store
                .put_lock(lock.clone())
                .await
                .map_err(store_error)?;
            tracing::warn!(lock = %lock.id, by = caller.user(), target = ?lock.target, "lock added");
            Ok(crate::body::json_response(StatusCode::CREATED, &lock))
        }
        (Method::DELETE, Some(id)) => match api.store.delete_lock(id).await.map_err(store_error)? {
            Some((_, lock)) => {
                tracing::warn!(lock = %lock.id, by = caller.user(), "lock removed");
                Ok(crate::body::json_response(StatusCode::OK, &lock))
            }
            None => Err(PipelineError::NotFound("lock")),
        },
        _ => Err(PipelineError::BadRequest(
            "use GET or POST /v1/locks, GET or DELETE /v1/locks/<id>".into(),
        )),
    }
}
