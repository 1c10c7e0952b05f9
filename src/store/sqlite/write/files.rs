//! Uploads' records: written before their bytes are placed in the file store, deleted
//! (when no message carries them, past their grace period) before the bytes are removed.

use rusqlite::{OptionalExtension, Transaction, params};

use super::{Applied, Done};
use crate::model::Upload;
use crate::store::{CollectedUploads, NewUpload, StoreError};

pub(super) fn create_upload(tx: &Transaction, id: i64, now: i64, upload: &NewUpload) -> Applied {
    let owner: Option<i64> = tx
        .prepare_cached("SELECT id FROM users WHERE id = ?1")?
        .query_row([upload.owner_id], |r| r.get(0))
        .optional()?;
    if owner.is_none() {
        return Err(StoreError::NotFound.into());
    }
    tx.prepare_cached(
        "INSERT INTO uploads (id, owner_id, sha256, size, content_type, name, width, height, thumb_sha256, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
    )?
    .execute(params![
        id,
        upload.owner_id,
        upload.sha256,
        upload.size,
        upload.content_type,
        upload.name,
        upload.width,
        upload.height,
        upload.thumb_sha256,
        now
    ])?;
    Ok(Done::Upload(Upload {
        id,
        owner_id: upload.owner_id,
        sha256: upload.sha256.clone(),
        size: upload.size,
        content_type: upload.content_type.clone(),
        name: upload.name.clone(),
        width: upload.width,
        height: upload.height,
        thumb_sha256: upload.thumb_sha256.clone(),
        created_at: now,
    }))
}

/// Deletes, of the `limit` uploads after `after` by id, those created before `before`
/// that no message carries.
pub(super) fn collect_uploads(tx: &Transaction, before: i64, after: i64, limit: u32) -> Applied {
    let looked: Vec<(i64, i64)> = tx
        .prepare_cached("SELECT id, created_at FROM uploads WHERE id > ?1 ORDER BY id LIMIT ?2")?
        .query_map(params![after, limit], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<rusqlite::Result<_>>()?;
    let mut out = CollectedUploads {
        next_after: match looked.last() {
            Some((id, _)) if looked.len() == limit as usize => Some(*id),
            _ => None,
        },
        ..CollectedUploads::default()
    };
    for (id, created_at) in looked {
        if created_at >= before {
            continue;
        }
        let gone: Option<(String, Option<String>)> = tx
            .prepare_cached(
                "DELETE FROM uploads WHERE id = ?1
                   AND NOT EXISTS (SELECT 1 FROM message_files f WHERE f.upload_id = ?1)
                 RETURNING sha256, thumb_sha256",
            )?
            .query_row([id], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        if let Some((sha, thumb)) = gone {
            out.deleted += 1;
            for digest in std::iter::once(sha).chain(thumb) {
                if !out.digests.contains(&digest) {
                    out.digests.push(digest);
                }
            }
        }
    }
    Ok(Done::Collected(out))
}
