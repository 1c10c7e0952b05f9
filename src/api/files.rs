//! Uploads and the files messages carry: `POST /v1/uploads` streams a body into the file
//! store; `GET /v1/files/{id}` serves it, with ranges and validators, to the uploader and
//! to members of a channel with a message that carries it (404 to anyone else).

use std::io::SeekFrom;
use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use tokio::io::{AsyncReadExt as _, AsyncSeekExt as _};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::AppState;
use super::dto::{ErrorBody, Upload};
use super::error::{ApiError, ApiResult};
use super::extract::{Authed, Params, PathIds};
use crate::files::{Inspected, ReceiveError};
use crate::store::NewUpload;

/// Uploads one user may have in progress at once.
const UPLOADS_AT_ONCE: u32 = 4;
/// The longest file name kept (longer ones are cut).
const MAX_NAME_CHARS: usize = 200;
/// Free bytes the files directory's disk keeps beside an upload.
const DISK_RESERVE: u64 = 64 * 1024 * 1024;

pub(super) fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(upload))
        .routes(routes!(get_file))
        .routes(routes!(get_thumbnail))
}

/// Uploads a file: the request body is the file's bytes, streamed to disk. The file can
/// then be attached to a message (`attachments` of `POST /v1/channels/{id}/messages`)
/// by its uploader within half of the upload grace period; an upload no message carries
/// is deleted after the grace period. Its type is told from its bytes, not from its name
/// or `Content-Type`: an image that decodes within bounds gets its image type and a
/// thumbnail; anything else is `application/octet-stream`.
#[utoipa::path(post, path = "/v1/uploads", tag = "files", security(("bearer" = [])),
    request_body(content = Vec<u8>, content_type = "application/octet-stream", description = "The file's bytes (any `Content-Type`)"),
    params(("name" = Option<String>, Query, description = "The file's name as shown (default `file`); cut to 200 characters")),
    responses((status = 201, body = Upload),
              (status = 400, body = ErrorBody, description = "`invalid_field`: an empty body, or a `name` with control characters or path separators"),
              (status = 408, body = ErrorBody, description = "`request_timeout`: the body stalled"),
              (status = 413, body = ErrorBody, description = "`payload_too_large`: past `--max-upload-bytes` (nothing is kept); `upload_quota`: past the caller's quota"),
              (status = 422, body = ErrorBody, description = "`image_too_large`: an image too large to decode (a decompression bomb)"),
              (status = 429, body = ErrorBody, description = "`rate_limited`, or `too_many_uploads` in progress"),
              (status = 507, body = ErrorBody, description = "`insufficient_storage`: the disk is nearly full")))]
async fn upload(
    State(state): State<AppState>,
    auth: Authed,
    params: Params,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<(StatusCode, Json<Upload>)> {
    let user = auth.user.id;
    let name = file_name(params.str("name"))?;
    let max = state.config.files.max_upload_bytes;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max) {
        state.files.refused();
        return Err(ApiError::payload_too_large(max as usize));
    }
    let quota = state.config.files.quota_bytes;
    let used = state.store.upload_bytes(user).await?.max(0) as u64;
    if used.saturating_add(declared.unwrap_or(0)) > quota {
        state.files.refused();
        return Err(ApiError::upload_quota(quota));
    }
    if let Some((free, _)) = crate::process::disk_space(&state.config.files_dir())
        && free < declared.unwrap_or(max).saturating_add(DISK_RESERVE)
    {
        state.files.refused();
        return Err(ApiError::insufficient_storage());
    }
    state.admit_write(user, name.len())?;
    let _slot = UploadSlot::take(&state, user)?;
    let received = state
        .files
        .receive(body, max, state.config.http.body_timeout)
        .await
        .map_err(|e| {
            state.files.refused();
            match e {
                ReceiveError::TooLarge(max) => ApiError::payload_too_large(max as usize),
                ReceiveError::Stalled => ApiError::request_timeout(state.config.http.body_timeout),
                ReceiveError::Aborted => ApiError::invalid_field("body", "the upload was cut off"),
                ReceiveError::Io(e) => {
                    tracing::error!(error = %e, "receive an upload");
                    if e.raw_os_error() == Some(libc::ENOSPC) {
                        ApiError::insufficient_storage()
                    } else {
                        ApiError::internal()
                    }
                }
            }
        })?;
    if received.size == 0 {
        state.files.refused();
        return Err(ApiError::invalid_field("body", "the file is empty"));
    }
    if used.saturating_add(received.size) > quota {
        state.files.refused();
        return Err(ApiError::upload_quota(quota));
    }
    // Decoded one at a time, off the async workers: each decode is bounded in memory,
    // and the permit goes with the decode (a caller who hangs up does not free it early).
    let decoding = Arc::clone(&state.decoding)
        .acquire_owned()
        .await
        .map_err(|_| ApiError::unavailable())?;
    let (path, head) = (received.temp_path().to_owned(), received.head.clone());
    let files = Arc::clone(&state.files);
    let inspected = tokio::task::spawn_blocking(move || {
        let _decoding = decoding;
        let inspected = crate::files::inspect(&path, &head)?;
        Ok(match inspected {
            Inspected::Image {
                content_type,
                width,
                height,
                thumbnail,
            } => files
                .write_temp(&thumbnail)
                .map(|thumb| (content_type, Some((width, height)), Some(thumb))),
            Inspected::Other => Ok(("application/octet-stream", None, None)),
        })
    })
    .await
    .map_err(|_| ApiError::internal())?;
    let (content_type, size, thumb) = inspected
        .map_err(|e: crate::files::ImageTooLarge| {
            state.files.refused();
            ApiError::image_too_large(e.0)
        })?
        .map_err(internal)?;
    let (width, height) = match size {
        Some((w, h)) => (Some(i64::from(w)), Some(i64::from(h))),
        None => (None, None),
    };
    let recorded = state
        .store
        .create_upload(NewUpload {
            owner_id: user,
            sha256: received.sha256.clone(),
            size: received.size as i64,
            content_type: content_type.to_owned(),
            name,
            width,
            height,
            thumb_sha256: thumb.as_ref().map(|(sha, _)| sha.clone()),
        })
        .await?;
    // Placed after the record: a file is never removed while a record uses it (see
    // `crate::files`). Renames and fsyncs block: off the async workers.
    let files = Arc::clone(&state.files);
    let sha256 = received.sha256.clone();
    tokio::task::spawn_blocking(move || {
        files.place(received.temp, &sha256)?;
        match thumb {
            Some((sha, temp)) => files.place(temp, &sha),
            None => Ok(()),
        }
    })
    .await
    .map_err(|_| ApiError::internal())?
    .map_err(internal)?;
    let grace = state.config.files.grace.as_millis() as i64;
    Ok((
        StatusCode::CREATED,
        Json(Upload {
            id: recorded.id.to_string(),
            name: recorded.name.clone(),
            content_type: recorded.content_type.clone(),
            size: recorded.size,
            sha256: recorded.sha256.clone(),
            width: recorded.width,
            height: recorded.height,
            thumbnail: recorded.thumb_sha256.is_some(),
            created_at: crate::clock::rfc3339(recorded.created_at),
            attach_by: crate::clock::rfc3339(recorded.created_at + grace / 2),
        }),
    ))
}

fn internal(e: std::io::Error) -> ApiError {
    tracing::error!(error = %e, "store an upload's bytes");
    if e.raw_os_error() == Some(libc::ENOSPC) {
        ApiError::insufficient_storage()
    } else {
        ApiError::internal()
    }
}

/// One of a user's uploads in progress, released when dropped.
struct UploadSlot<'a> {
    state: &'a AppState,
    user: i64,
}

impl<'a> UploadSlot<'a> {
    fn take(state: &'a AppState, user: i64) -> ApiResult<Self> {
        let mut at_once = state.uploading.lock().expect("uploads lock");
        let n = at_once.entry(user).or_default();
        if *n >= UPLOADS_AT_ONCE {
            return Err(ApiError::too_many_uploads(UPLOADS_AT_ONCE));
        }
        *n += 1;
        Ok(Self { state, user })
    }
}

impl Drop for UploadSlot<'_> {
    fn drop(&mut self) {
        let mut at_once = self.state.uploading.lock().expect("uploads lock");
        if let Some(n) = at_once.get_mut(&self.user) {
            *n -= 1;
            if *n == 0 {
                at_once.remove(&self.user);
            }
        }
    }
}

/// The name an upload is shown by: `file` when none is given; refused with control
/// characters, bidi overrides or path separators; cut to [`MAX_NAME_CHARS`].
fn file_name(name: Option<&str>) -> ApiResult<String> {
    let name = name
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .unwrap_or("file");
    if name.chars().any(|c| {
        crate::chars::is_control(c) || crate::chars::is_bidi_override(c) || c == '/' || c == '\\'
    }) || name == "."
        || name == ".."
    {
        return Err(ApiError::invalid_field(
            "name",
            "a file name has no control characters, bidi overrides or path separators",
        ));
    }
    Ok(name.chars().take(MAX_NAME_CHARS).collect())
}

/// A file's bytes (the uploader's, or any a message carries in a channel the caller is a
/// member of). Images of a safe type are served inline, everything else as a download;
/// always `nosniff` and sandboxed, so the bytes never run as a page of this origin.
/// Supports `Range` (one range), `ETag`/`If-None-Match` (the SHA-256) and long caching.
#[utoipa::path(get, path = "/v1/files/{id}", tag = "files", security(("bearer" = [])),
    params(("id" = super::openapi::Id, Path, description = "Upload id (an attachment's `id`)"),
           ("Range" = Option<String>, Header, description = "One byte range, e.g. `bytes=0-1023`"),
           ("If-None-Match" = Option<String>, Header, description = "The `ETag` of a copy held")),
    responses((status = 200, description = "The file", content_type = "application/octet-stream"),
              (status = 206, description = "The range asked for", content_type = "application/octet-stream"),
              (status = 304, description = "The copy held is current"),
              (status = 404, body = ErrorBody, description = "No such file, or the caller may not read it"),
              (status = 416, description = "The range is past the file's end")))]
async fn get_file(
    State(state): State<AppState>,
    auth: Result<Authed, ApiError>,
    path: PathIds<1>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let PathIds([id]) = path;
    let upload = readable(&state, caller(auth)?, id).await?;
    let served = Served {
        sha256: upload.sha256.clone(),
        size: upload.size as u64,
        content_type: upload.content_type.clone(),
        name: upload.name.clone(),
    };
    serve(&state, &served, &headers).await
}

/// An image's thumbnail (at most 320×320; PNG, or JPEG for a JPEG), to whoever may read
/// the file. 404 for a file that is no image.
#[utoipa::path(get, path = "/v1/files/{id}/thumbnail", tag = "files", security(("bearer" = [])),
    params(("id" = super::openapi::Id, Path, description = "Upload id (an attachment's `id`)"),
           ("Range" = Option<String>, Header, description = "One byte range, e.g. `bytes=0-1023`"),
           ("If-None-Match" = Option<String>, Header, description = "The `ETag` of a copy held")),
    responses((status = 200, description = "The thumbnail", content_type = "image/png"),
              (status = 206, description = "The range asked for", content_type = "image/png"),
              (status = 304, description = "The copy held is current"),
              (status = 404, body = ErrorBody, description = "No such file, no thumbnail, or the caller may not read it"),
              (status = 416, description = "The range is past the thumbnail's end")))]
async fn get_thumbnail(
    State(state): State<AppState>,
    auth: Result<Authed, ApiError>,
    path: PathIds<1>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let PathIds([id]) = path;
    let upload = readable(&state, caller(auth)?, id).await?;
    let sha256 = upload.thumb_sha256.ok_or_else(ApiError::not_found)?;
    let size = tokio::fs::metadata(state.files.path(&sha256))
        .await
        .map_err(|_| missing(id))?
        .len();
    let served = Served {
        sha256,
        size,
        content_type: crate::files::thumbnail_type(&upload.content_type).to_owned(),
        name: format!("thumbnail-{}", upload.name),
    };
    serve(&state, &served, &headers).await
}

/// The caller of a file route. Without a valid token the answer is 404, as for a file
/// the caller may not read: a file's existence is not told to strangers.
fn caller(auth: Result<Authed, ApiError>) -> ApiResult<i64> {
    match auth {
        Ok(auth) => Ok(auth.user.id),
        Err(e) if e.status == StatusCode::UNAUTHORIZED => Err(ApiError::not_found()),
        Err(e) => Err(e),
    }
}

/// The upload, if `user` may read it: its uploader, or a member of a channel with a
/// message that carries it. Anyone else (and a missing one) is 404 alike.
async fn readable(state: &AppState, user: i64, id: i64) -> ApiResult<crate::model::Upload> {
    let upload = state
        .store
        .upload(id)
        .await?
        .ok_or_else(ApiError::not_found)?;
    if upload.owner_id == user {
        return Ok(upload);
    }
    for channel in state.store.upload_channels(id).await? {
        if state.store.channel(channel, user).await?.is_some() {
            return Ok(upload);
        }
    }
    Err(ApiError::not_found())
}

fn missing(id: i64) -> ApiError {
    tracing::error!(
        upload = id,
        "an upload's bytes are missing from the files directory"
    );
    ApiError::not_found()
}

struct Served {
    sha256: String,
    size: u64,
    content_type: String,
    name: String,
}

async fn serve(state: &AppState, file: &Served, headers: &HeaderMap) -> ApiResult<Response> {
    let etag = format!("\"{}\"", file.sha256);
    let inline = crate::files::INLINE_TYPES.contains(&file.content_type.as_str());
    let mut out = HeaderMap::new();
    let put = |out: &mut HeaderMap, name: header::HeaderName, value: &str| {
        if let Ok(v) = HeaderValue::from_str(value) {
            out.insert(name, v);
        }
    };
    put(&mut out, header::ETAG, &etag);
    // The bytes behind an id never change; only their readers do (hence private).
    put(
        &mut out,
        header::CACHE_CONTROL,
        "private, max-age=31536000, immutable",
    );
    put(&mut out, header::X_CONTENT_TYPE_OPTIONS, "nosniff");
    put(
        &mut out,
        header::CONTENT_SECURITY_POLICY,
        "default-src 'none'; img-src 'self'; sandbox",
    );
    put(&mut out, header::ACCEPT_RANGES, "bytes");
    put(
        &mut out,
        header::CONTENT_DISPOSITION,
        &disposition(if inline { "inline" } else { "attachment" }, &file.name),
    );
    let content_type = if inline {
        file.content_type.as_str()
    } else {
        "application/octet-stream"
    };
    put(&mut out, header::CONTENT_TYPE, content_type);
    let held = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"));
    if held {
        return Ok((StatusCode::NOT_MODIFIED, out).into_response());
    }
    let range = match headers.get(header::RANGE).and_then(|v| v.to_str().ok()) {
        // A range applies only to the version named by `If-Range`, when one is named.
        Some(r)
            if headers
                .get(header::IF_RANGE)
                .and_then(|v| v.to_str().ok())
                .is_none_or(|v| v.trim() == etag) =>
        {
            match byte_range(r, file.size) {
                Ok(range) => range,
                Err(()) => {
                    put(
                        &mut out,
                        header::CONTENT_RANGE,
                        &format!("bytes */{}", file.size),
                    );
                    return Ok((StatusCode::RANGE_NOT_SATISFIABLE, out).into_response());
                }
            }
        }
        _ => None,
    };
    let mut f = tokio::fs::File::open(state.files.path(&file.sha256))
        .await
        .map_err(|_| {
            tracing::error!(sha256 = %file.sha256, "a file's bytes are missing from the files directory");
            ApiError::not_found()
        })?;
    let (status, start, len) = match range {
        Some((start, end)) => {
            put(
                &mut out,
                header::CONTENT_RANGE,
                &format!("bytes {start}-{end}/{}", file.size),
            );
            (StatusCode::PARTIAL_CONTENT, start, end - start + 1)
        }
        None => (StatusCode::OK, 0, file.size),
    };
    if start > 0 {
        f.seek(SeekFrom::Start(start)).await.map_err(|e| {
            tracing::error!(error = %e, "seek in a file");
            ApiError::internal()
        })?;
    }
    put(&mut out, header::CONTENT_LENGTH, &len.to_string());
    state.files.served(len);
    let stream = tokio_util::io::ReaderStream::new(f.take(len));
    Ok((status, out, Body::from_stream(stream)).into_response())
}

/// `Content-Disposition` with the name in both forms (RFC 6266): an ASCII fallback with
/// quotes and non-ASCII replaced, and the exact name percent-encoded.
fn disposition(kind: &str, name: &str) -> String {
    let fallback: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() && c != '"' && c != '\\' || c == ' ' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let exact = percent_encoding::utf8_percent_encode(name, percent_encoding::NON_ALPHANUMERIC);
    format!("{kind}; filename=\"{fallback}\"; filename*=UTF-8''{exact}")
}

/// One byte range of a `Range` header, as inclusive offsets: `Ok(None)` for a header
/// this server does not apply (another unit, several ranges: the whole file is sent),
/// `Err` for a range past the end (416).
fn byte_range(header: &str, size: u64) -> Result<Option<(u64, u64)>, ()> {
    let Some(spec) = header.trim().strip_prefix("bytes=") else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None);
    }
    let Some((first, last)) = spec.trim().split_once('-') else {
        return Ok(None);
    };
    let (first, last) = (first.trim(), last.trim());
    let parse = |s: &str| s.parse::<u64>().ok();
    let range = match (first.is_empty(), last.is_empty()) {
        // The last n bytes.
        (true, false) => {
            let Some(n) = parse(last) else {
                return Ok(None);
            };
            if n == 0 || size == 0 {
                return Err(());
            }
            (size.saturating_sub(n), size - 1)
        }
        (false, _) => {
            let Some(start) = parse(first) else {
                return Ok(None);
            };
            let end = if last.is_empty() {
                size.saturating_sub(1)
            } else {
                match parse(last) {
                    Some(end) if end >= start => end.min(size.saturating_sub(1)),
                    _ => return Ok(None),
                }
            };
            if start >= size {
                return Err(());
            }
            (start, end)
        }
        (true, true) => return Ok(None),
    };
    Ok(Some(range))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_ranges() {
        assert_eq!(byte_range("bytes=0-9", 100), Ok(Some((0, 9))));
        assert_eq!(byte_range("bytes=90-", 100), Ok(Some((90, 99))));
        assert_eq!(byte_range("bytes=-10", 100), Ok(Some((90, 99))));
        assert_eq!(byte_range("bytes=-500", 100), Ok(Some((0, 99))));
        assert_eq!(byte_range("bytes=50-500", 100), Ok(Some((50, 99))));
        assert_eq!(byte_range("bytes=100-", 100), Err(()));
        assert_eq!(byte_range("bytes=0-1,5-6", 100), Ok(None));
        assert_eq!(byte_range("items=0-1", 100), Ok(None));
        assert_eq!(byte_range("bytes=9-3", 100), Ok(None));
        assert_eq!(byte_range("bytes=-0", 100), Err(()));
    }

    #[test]
    fn dispositions_carry_any_name_safely() {
        assert_eq!(
            disposition("attachment", "a \"b\".txt"),
            "attachment; filename=\"a _b_.txt\"; filename*=UTF-8''a%20%22b%22%2Etxt"
        );
        assert!(disposition("inline", "café.png").starts_with("inline; filename=\"caf_.png\""));
    }

    #[test]
    fn file_names() {
        assert_eq!(file_name(None).unwrap(), "file");
        assert_eq!(file_name(Some("  ")).unwrap(), "file");
        assert_eq!(file_name(Some("cat.png")).unwrap(), "cat.png");
        assert!(file_name(Some("../etc/passwd")).is_err());
        assert!(file_name(Some("a\u{202E}gnp.exe")).is_err());
        assert_eq!(
            file_name(Some(&"x".repeat(300))).unwrap().len(),
            MAX_NAME_CHARS
        );
    }
}
