//! Steps every object route shares: load a stored object the caller may see (404 otherwise,
//! exactly like a missing id, so another tenant's object does not betray its existence), read
//! the headers a change honours (`Idempotency-Key`, `If-Match`), answer with the object's
//! version as its `ETag`.

use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

use crate::error::{ApiError, ApiResult};
use crate::routes::{decode, idempotency_key, if_match};
use crate::AppState;

/// Loads the object stored at `key`. A missing object and one `visible` refuses both answer
/// `404 "<what> <id> not found"`.
pub(crate) fn load_visible<T>(
    state: &AppState,
    key: &[u8],
    what: &str,
    id: &str,
    visible: impl FnOnce(&T) -> bool,
) -> ApiResult<T>
where
    T: rkyv::Archive,
    T::Archived: for<'a> rkyv::bytecheck::CheckBytes<rkyv::api::high::HighValidator<'a, rkyv::rancor::Error>>
        + rkyv::Deserialize<T, rkyv::api::high::HighDeserializer<rkyv::rancor::Error>>,
{
    let not_found = || ApiError::NotFound(format!("{what} {id}"));
    let bytes = state.cp.get(key)?.ok_or_else(not_found)?;
    let object: T = decode(&bytes)?;
    if visible(&object) {
        Ok(object)
    } else {
        Err(not_found())
    }
}

/// The headers of a change: its `Idempotency-Key` and the version `If-Match` expects.
pub(crate) struct Change {
    pub key: Option<String>,
    pub expected_version: Option<u64>,
}

impl Change {
    pub(crate) fn from_headers(headers: &HeaderMap) -> ApiResult<Change> {
        Ok(Change {
            key: idempotency_key(headers)?,
            expected_version: if_match(headers)?,
        })
    }
}

/// `body` with `ETag: "<version>"`, the value `If-Match` takes back.
pub(crate) fn with_etag(status: StatusCode, version: u64, body: impl Serialize) -> Response {
    let etag = format!("\"{version}\"");
    (status, [(header::ETAG, etag)], Json(body)).into_response()
}
