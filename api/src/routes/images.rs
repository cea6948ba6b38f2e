//! Disk images: `/api/v1/images[/{id}[/upload|/finish]]`.
//!
//! An upload is created with the image's name, size and SHA-256; its bytes then go in order as
//! `PUT /images/{id}/upload` chunks carrying `Content-Range: bytes START-END/TOTAL`, each
//! durable on the node that holds the upload before it is acknowledged. An interrupted client
//! asks `GET /images/{id}/upload` for the offset to resume at. `POST /images/{id}/finish`
//! verifies the checksum over the whole file (a mismatch discards the upload) and makes the
//! image usable. Images belong to a tenant: another tenant's image answers 404.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use raft::image::{image_key, Image, ImageState, IMAGE_PREFIX};
use raft::model::{NodeId, Role};
use raft::{Command, Response as RaftResponse};
use serde::{Deserialize, Serialize};

use crate::auth::Caller;
use crate::error::{ApiError, ApiResult};
use crate::routes::extract::{ApiJson, ApiQuery};
use crate::routes::tenants::validate_name;
use crate::routes::{decode, idempotency_key, propose, ReadParams};
use crate::AppState;

/// The largest image accepted (64 GiB).
pub const MAX_IMAGE_BYTES: u64 = 64 << 30;

#[derive(Debug, Clone, Copy, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub(crate) enum ImageStateView {
    Uploading,
    Ready,
}

/// An image as clients see it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[schema(as = Image)]
pub(crate) struct ImageView {
    id: String,
    name: String,
    tenant: String,
    size_bytes: u64,
    sha256: String,
    state: ImageStateView,
    /// The node receiving the upload.
    upload_node: NodeId,
    /// Nodes holding verified bytes.
    locations: Vec<NodeId>,
    created_at: u64,
    updated_at: u64,
}

impl From<Image> for ImageView {
    fn from(i: Image) -> Self {
        ImageView {
            id: i.id,
            name: i.name,
            tenant: i.tenant,
            size_bytes: i.size_bytes,
            sha256: i.sha256,
            state: match i.state {
                ImageState::Uploading => ImageStateView::Uploading,
                ImageState::Ready => ImageStateView::Ready,
            },
            upload_node: i.upload_node,
            locations: i.locations,
            created_at: i.created_at,
            updated_at: i.updated_at,
        }
    }
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateImage {
    /// Unique within the tenant; VMs name their image by id or by this name.
    name: String,
    /// The exact size of the file to upload.
    size_bytes: u64,
    /// Hex SHA-256 of the whole file.
    sha256: String,
    /// Admins may create in any tenant; others always create in their own.
    #[serde(default)]
    tenant: Option<String>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct UploadStatus {
    /// Bytes stored so far: the next chunk starts here.
    offset: u64,
    size_bytes: u64,
    state: ImageStateView,
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct FinishUpload {
    /// The checksum the client computed; must equal the one announced at creation.
    sha256: String,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
#[schema(as = ImagePage)]
pub(crate) struct Page {
    items: Vec<ImageView>,
}

fn is_sha256(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The image `id` if the caller may see it; 404 otherwise, whether or not it exists.
pub(crate) fn load(state: &AppState, caller: &Caller, id: &str) -> ApiResult<Image> {
    let not_found = || ApiError::NotFound(format!("image {id}"));
    let bytes = state.cp.get(&image_key(id))?.ok_or_else(not_found)?;
    let image: Image = decode(&bytes)?;
    if caller.sees_tenant(&image.tenant) {
        Ok(image)
    } else {
        Err(not_found())
    }
}

/// The image a VM of `tenant` refers to as `reference` (an id or a name in that tenant).
pub(crate) fn resolve(state: &AppState, tenant: &str, reference: &str) -> ApiResult<Image> {
    let by_id = match state.cp.get(&image_key(reference))? {
        Some(bytes) => Some(decode::<Image>(&bytes)?),
        None => None,
    };
    let found = match by_id {
        Some(i) if i.tenant == tenant => Some(i),
        _ => match state
            .cp
            .get(&raft::image::image_name_key(tenant, reference))?
        {
            Some(id) => match state.cp.get(&image_key(&String::from_utf8_lossy(&id)))? {
                Some(bytes) => Some(decode::<Image>(&bytes)?),
                None => None,
            },
            None => None,
        },
    };
    let image = found.ok_or_else(|| ApiError::NotFound(format!("image {reference}")))?;
    if image.state != ImageState::Ready {
        return Err(ApiError::Conflict(format!(
            "image {reference} is still uploading"
        )));
    }
    Ok(image)
}

fn image_of(resp: RaftResponse) -> ApiResult<Image> {
    match resp {
        RaftResponse::Image(i) => Ok(i),
        other => Err(ApiError::Internal(format!("unexpected response {other:?}"))),
    }
}

#[utoipa::path(
    post,
    path = "/images",
    tag = "images",
    summary = "Start the upload of an image",
    request_body = CreateImage,
    responses((status = 201, description = "the image, uploading; send its bytes with PUT /images/{id}/upload", body = ImageView)),
    security(("bearer" = []))
)]
pub(crate) async fn create(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    ApiJson(body): ApiJson<CreateImage>,
) -> ApiResult<Response> {
    caller.require(Role::Operator)?;
    validate_name("image", &body.name)?;
    if !is_sha256(&body.sha256) {
        return Err(ApiError::Validation(
            "sha256 must be 64 hexadecimal digits".into(),
        ));
    }
    if body.size_bytes == 0 || body.size_bytes > MAX_IMAGE_BYTES {
        return Err(ApiError::Validation(format!(
            "size_bytes must be 1 to {MAX_IMAGE_BYTES}"
        )));
    }
    let tenant = match &body.tenant {
        Some(t) if caller.is_admin() => t.clone(),
        Some(t) if *t != caller.tenant => return Err(ApiError::NotFound(format!("tenant {t}"))),
        _ => caller.tenant.clone(),
    };
    // The bytes go to the node that answers this request.
    let upload_node = state.cp.status().await?.node_id;
    let image = Image {
        id: crate::federation::new_id(&state)?,
        name: body.name,
        tenant,
        size_bytes: body.size_bytes,
        sha256: body.sha256.to_ascii_lowercase(),
        state: ImageState::Uploading,
        upload_node,
        locations: Vec::new(),
        created_at: 0,
        updated_at: 0,
        version: 0,
    };
    let key = idempotency_key(&headers)?;
    let (_, resp) = propose(&state, &caller, key, Command::CreateImage { image }).await?;
    let image = image_of(resp)?;
    Ok((StatusCode::CREATED, Json(ImageView::from(image))).into_response())
}

#[utoipa::path(
    get,
    path = "/images",
    tag = "images",
    summary = "List the images the caller may see",
    params(("consistency" = Option<crate::Consistency>, Query, description = "linearizable (default) or stale: how fresh the read must be")),
    responses((status = 200, description = "the images", body = Page)),
    security(("bearer" = []))
)]
pub(crate) async fn list(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(read): ApiQuery<ReadParams>,
) -> ApiResult<Json<Page>> {
    state.cp.read_barrier(read.consistency).await?;
    let mut items = Vec::new();
    for (_, v) in state.cp.scan(IMAGE_PREFIX, None, usize::MAX)? {
        let image: Image = decode(&v)?;
        if caller.sees_tenant(&image.tenant) {
            items.push(ImageView::from(image));
        }
    }
    Ok(Json(Page { items }))
}

#[utoipa::path(
    get,
    path = "/images/{id}",
    tag = "images",
    summary = "Get an image",
    params(("id" = String, Path, description = "image id"), ("consistency" = Option<crate::Consistency>, Query, description = "linearizable (default) or stale: how fresh the read must be")),
    responses((status = 200, description = "the image", body = ImageView)),
    security(("bearer" = []))
)]
pub(crate) async fn get_one(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    ApiQuery(read): ApiQuery<ReadParams>,
) -> ApiResult<Json<ImageView>> {
    state.cp.read_barrier(read.consistency).await?;
    Ok(Json(load(&state, &caller, &id)?.into()))
}

#[utoipa::path(
    delete,
    path = "/images/{id}",
    tag = "images",
    summary = "Delete an image no VM uses; nodes drop its bytes shortly after",
    params(("id" = String, Path, description = "image id")),
    responses((status = 204, description = "deleted")),
    security(("bearer" = []))
)]
pub(crate) async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    state
        .cp
        .read_barrier(crate::Consistency::Linearizable)
        .await?;
    // Visibility first: another tenant's image answers 404 whatever the caller's role.
    let image = load(&state, &caller, &id)?;
    caller.require(Role::Operator)?;
    // VMs' overlays are built on the image's file: refuse while one refers to it. A VM created
    // concurrently with this check can still slip through; its node then fails to fetch the
    // image and reports the VM failed.
    for (_, v) in state.cp.scan(raft::keys::VM_PREFIX, None, usize::MAX)? {
        let vm: raft::model::Vm = decode(&v)?;
        if vm.image.as_deref() == Some(image.id.as_str()) {
            return Err(ApiError::Conflict(format!(
                "image {id} is used by vm {}",
                vm.id
            )));
        }
    }
    propose(&state, &caller, None, Command::DeleteImage { id }).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(
    get,
    path = "/images/{id}/upload",
    tag = "images",
    summary = "Where an upload stands: the offset to resume at",
    params(("id" = String, Path, description = "image id")),
    responses((status = 200, description = "the upload's progress", body = UploadStatus)),
    security(("bearer" = []))
)]
pub(crate) async fn upload_status(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<UploadStatus>> {
    state
        .cp
        .read_barrier(crate::Consistency::Linearizable)
        .await?;
    let image = load(&state, &caller, &id)?;
    let offset = match image.state {
        ImageState::Ready => image.size_bytes,
        ImageState::Uploading => state.cp.image_upload_offset(&image).await?,
    };
    Ok(Json(UploadStatus {
        offset,
        size_bytes: image.size_bytes,
        state: ImageView::from(image).state,
    }))
}

/// `Content-Range: bytes START-END/TOTAL` (END inclusive) as (START, END + 1, TOTAL).
fn content_range(headers: &HeaderMap) -> ApiResult<(u64, u64, u64)> {
    let bad = || {
        ApiError::Validation("Content-Range must be `bytes START-END/TOTAL` (END inclusive)".into())
    };
    let v = headers
        .get(header::CONTENT_RANGE)
        .ok_or_else(bad)?
        .to_str()
        .map_err(|_| bad())?;
    let rest = v.trim().strip_prefix("bytes ").ok_or_else(bad)?;
    let (range, total) = rest.split_once('/').ok_or_else(bad)?;
    let (start, end) = range.split_once('-').ok_or_else(bad)?;
    let start: u64 = start.trim().parse().map_err(|_| bad())?;
    let end: u64 = end.trim().parse().map_err(|_| bad())?;
    let total: u64 = total.trim().parse().map_err(|_| bad())?;
    if end < start {
        return Err(bad());
    }
    Ok((start, end + 1, total))
}

#[utoipa::path(
    put,
    path = "/images/{id}/upload",
    tag = "images",
    summary = "Append one chunk to an upload",
    params(("id" = String, Path, description = "image id"), ("Content-Range" = String, Header, description = "bytes START-END/TOTAL; START must be the upload's current offset")),
    request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "the chunk, at most the API's body limit"),
    responses((status = 200, description = "stored durably; the new offset", body = UploadStatus)),
    security(("bearer" = []))
)]
pub(crate) async fn upload_chunk(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Json<UploadStatus>> {
    // Visibility first: another tenant's image answers 404 whatever the caller's role.
    let image = load(&state, &caller, &id)?;
    caller.require(Role::Operator)?;
    if image.state != ImageState::Uploading {
        return Err(ApiError::Conflict(format!(
            "image {id} is already complete"
        )));
    }
    let (start, end, total) = content_range(&headers)?;
    if total != image.size_bytes {
        return Err(ApiError::Validation(format!(
            "Content-Range total {total} is not the image's size {}",
            image.size_bytes
        )));
    }
    if end - start != body.len() as u64 {
        return Err(ApiError::Validation(format!(
            "Content-Range covers {} bytes, the body has {}",
            end - start,
            body.len()
        )));
    }
    if end > image.size_bytes {
        return Err(ApiError::Validation(
            "the chunk ends past the image's size".into(),
        ));
    }
    let offset = state
        .cp
        .image_write_chunk(&image, start, body.to_vec())
        .await?;
    Ok(Json(UploadStatus {
        offset,
        size_bytes: image.size_bytes,
        state: ImageStateView::Uploading,
    }))
}

#[utoipa::path(
    post,
    path = "/images/{id}/finish",
    tag = "images",
    summary = "Verify a complete upload's checksum and make the image usable",
    params(("id" = String, Path, description = "image id")),
    request_body = FinishUpload,
    responses((status = 200, description = "the image, ready", body = ImageView)),
    security(("bearer" = []))
)]
pub(crate) async fn finish(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<FinishUpload>,
) -> ApiResult<Json<ImageView>> {
    state
        .cp
        .read_barrier(crate::Consistency::Linearizable)
        .await?;
    // Visibility first: another tenant's image answers 404 whatever the caller's role.
    let image = load(&state, &caller, &id)?;
    caller.require(Role::Operator)?;
    if image.state == ImageState::Ready {
        return Ok(Json(image.into()));
    }
    if !body.sha256.eq_ignore_ascii_case(&image.sha256) {
        return Err(ApiError::ChecksumMismatch(format!(
            "sha256 {} is not the one announced for image {id} ({})",
            body.sha256, image.sha256
        )));
    }
    let offset = state.cp.image_upload_offset(&image).await?;
    if offset != image.size_bytes {
        return Err(ApiError::Conflict(format!(
            "the upload has {offset} of {} bytes",
            image.size_bytes
        )));
    }
    state.cp.image_finish_upload(&image).await?;
    let (_, resp) = propose(
        &state,
        &caller,
        None,
        Command::ImageStored {
            id: id.clone(),
            node: image.upload_node,
        },
    )
    .await?;
    Ok(Json(image_of(resp)?.into()))
}
