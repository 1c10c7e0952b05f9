//! Uploaded files' bytes, content-addressed: a file is kept once per SHA-256 digest under
//! the files directory (`ab/abcdef…`), whoever uploaded it and however often.
//!
//! The order of steps keeps the store and the directory in agreement across crashes:
//!
//! - An upload is received into `tmp/` (fsynced), recorded in the store, and only then
//!   renamed into place (and the directory fsynced) before it is acknowledged. A crash
//!   mid-upload leaves a part file in `tmp/`, emptied at start; a crash after the record
//!   leaves a record whose bytes never arrived, which no client was told of and which is
//!   collected after the grace period like any upload no message carries.
//! - A file is removed only once no upload uses its digest: it is first renamed into
//!   `trash/`, the store asked again, and then deleted, or put back if an upload of the
//!   same bytes was recorded meanwhile (that upload renames its own copy into place after
//!   its record, so one of the two copies is always in place). A crash in between leaves a
//!   file in `trash/`, settled the same way at start.
//!
//! Images are checked by decoding them within bounds (a decompression bomb is refused
//! before its pixels are allocated) and get one thumbnail, stored as a file of its own.

use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::StreamExt as _;
use sha2::{Digest as _, Sha256};

use crate::store::Store;

/// A thumbnail fits in this square.
pub const THUMB_EDGE: u32 = 320;
/// The widest or tallest image decoded (a larger one is refused as a bomb).
const MAX_IMAGE_EDGE: u32 = 16_384;
/// The most memory one image's decode may allocate.
const MAX_DECODE_BYTES: u64 = 256 * 1024 * 1024;
/// Uploads looked at per store call when collecting.
const COLLECT_PAGE: u32 = 500;
/// Pages looked at per collection pass (the next pass goes on where this one stopped).
const COLLECT_PAGES_PER_PASS: usize = 100;
/// The longest time between looks for files no record names.
const SWEEP_EVERY: Duration = Duration::from_secs(3600);

/// The image types served inline (shown by a browser); anything else is served as a
/// download. SVG is not among them: it can carry scripts.
pub const INLINE_TYPES: [&str; 4] = ["image/png", "image/jpeg", "image/gif", "image/webp"];

/// The files directory. Part files and the trash are per node (`tmp/node-N`,
/// `trash/node-N`), so nodes sharing the directory never touch each other's.
pub struct FileStore {
    root: PathBuf,
    tmp: PathBuf,
    trash: PathBuf,
    pub stats: FileStats,
}

/// Counters for `/metrics`.
#[derive(Default)]
pub struct FileStats {
    stored: AtomicU64,
    refused: AtomicU64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    collected_uploads: AtomicU64,
    removed_files: AtomicU64,
    /// Files and bytes in the directory, as of the last collection pass.
    files: AtomicU64,
    bytes: AtomicU64,
    last_collect: AtomicU64,
    collect_failures: AtomicU64,
}

/// A received upload's part file: removed when dropped unless placed.
pub struct Temp {
    path: PathBuf,
}

impl Drop for Temp {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// An upload's bytes, received in full into a part file.
pub struct Received {
    pub temp: Temp,
    pub sha256: String,
    pub size: u64,
    /// The first bytes, to tell the type by.
    pub head: Vec<u8>,
}

impl Received {
    /// The part file the bytes are in (until placed).
    pub fn temp_path(&self) -> &Path {
        &self.temp.path
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    #[error("the upload is larger than {0} bytes")]
    TooLarge(u64),
    #[error("the upload stalled")]
    Stalled,
    #[error("the upload was cut off")]
    Aborted,
    #[error("writing the upload: {0}")]
    Io(#[from] io::Error),
}

/// What the bytes of an upload are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inspected {
    /// An image that decodes within bounds, with its thumbnail (PNG, or JPEG for a JPEG).
    Image {
        content_type: &'static str,
        width: u32,
        height: u32,
        thumbnail: Vec<u8>,
    },
    /// Anything else: served as `application/octet-stream`, as a download.
    Other,
}

/// An image whose size or decode would pass the bounds: refused.
#[derive(Debug, thiserror::Error)]
#[error("the image is too large to decode ({0})")]
pub struct ImageTooLarge(pub String);

impl FileStore {
    /// Opens (creating) the files directory for node `node`, emptying its part files
    /// (uploads a crash cut off). Its trash is settled by [`FileStore::settle_trash`],
    /// which needs the store.
    pub fn open(root: &Path, node: u16) -> io::Result<Self> {
        let tmp = root.join("tmp").join(format!("node-{node}"));
        let trash = root.join("trash").join(format!("node-{node}"));
        std::fs::create_dir_all(&tmp)?;
        std::fs::create_dir_all(&trash)?;
        for entry in std::fs::read_dir(&tmp)? {
            let _ = std::fs::remove_file(entry?.path());
        }
        Ok(Self {
            root: root.to_owned(),
            tmp,
            trash,
            stats: FileStats::default(),
        })
    }

    /// Where the file with this digest is kept (whether it is there or not).
    pub fn path(&self, sha256: &str) -> PathBuf {
        self.root.join(&sha256[..2]).join(sha256)
    }

    fn temp(&self) -> io::Result<(Temp, std::fs::File)> {
        let mut r = [0u8; 12];
        getrandom::fill(&mut r).map_err(|e| io::Error::other(e.to_string()))?;
        let path = self.tmp.join(format!("{}.part", crate::auth::hex(&r)));
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)?;
        Ok((Temp { path }, file))
    }

    /// Reads a request body into a part file, hashing it, refusing it past `max` bytes
    /// (nothing is kept) or when no bytes come for `idle`.
    pub async fn receive(
        &self,
        body: axum::body::Body,
        max: u64,
        idle: Duration,
    ) -> Result<Received, ReceiveError> {
        let (temp, file) = self.temp()?;
        let mut file = tokio::fs::File::from_std(file);
        let mut stream = body.into_data_stream();
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        let mut head = Vec::with_capacity(32);
        loop {
            let chunk = match tokio::time::timeout(idle, stream.next()).await {
                Err(_) => return Err(ReceiveError::Stalled),
                Ok(None) => break,
                Ok(Some(Err(_))) => return Err(ReceiveError::Aborted),
                Ok(Some(Ok(chunk))) => chunk,
            };
            size += chunk.len() as u64;
            if size > max {
                return Err(ReceiveError::TooLarge(max));
            }
            if head.len() < 32 {
                let take = (32 - head.len()).min(chunk.len());
                head.extend_from_slice(&chunk[..take]);
            }
            hasher.update(&chunk);
            tokio::io::AsyncWriteExt::write_all(&mut file, &chunk).await?;
        }
        file.sync_all().await?;
        self.stats.bytes_in.fetch_add(size, Ordering::Relaxed);
        Ok(Received {
            temp,
            sha256: crate::auth::hex(&hasher.finalize()),
            size,
            head,
        })
    }

    /// Writes bytes (a thumbnail) into a part file: its digest and the part file.
    pub fn write_temp(&self, bytes: &[u8]) -> io::Result<(String, Temp)> {
        let (temp, mut file) = self.temp()?;
        file.write_all(bytes)?;
        file.sync_all()?;
        Ok((crate::auth::hex(&Sha256::digest(bytes)), temp))
    }

    /// Moves a part file into place under its digest (replacing an identical copy), and
    /// makes the move durable. Called once the upload's record is committed.
    pub fn place(&self, temp: Temp, sha256: &str) -> io::Result<()> {
        let target = self.path(sha256);
        let dir = target.parent().expect("a digest's directory");
        std::fs::create_dir_all(dir)?;
        std::fs::rename(&temp.path, &target)?;
        std::fs::File::open(dir)?.sync_all()?;
        self.stats.stored.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Counts a refused upload.
    pub fn refused(&self) {
        self.stats.refused.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts bytes served.
    pub fn served(&self, bytes: u64) {
        self.stats.bytes_out.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Removes the file with this digest if no upload uses it (see the module's notes):
    /// whether it was removed.
    pub async fn retire(&self, store: &dyn Store, sha256: &str) -> anyhow::Result<bool> {
        // Asked first as well, so bytes another upload still uses are never moved away
        // (a reader would miss them meanwhile); asked again after the move, for an upload
        // of the same bytes recorded in between.
        if !is_digest(sha256) || store.blob_in_use(sha256).await? {
            return Ok(false);
        }
        let mut r = [0u8; 6];
        getrandom::fill(&mut r).map_err(|e| anyhow::anyhow!("{e}"))?;
        let trash = self
            .trash
            .join(format!("{sha256}.{}", crate::auth::hex(&r)));
        match std::fs::rename(self.path(sha256), &trash) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            other => other?,
        }
        self.settle(store, sha256, &trash).await
    }

    /// Deletes a file moved to the trash, or puts it back if an upload uses its digest.
    async fn settle(&self, store: &dyn Store, sha256: &str, trash: &Path) -> anyhow::Result<bool> {
        let in_use = match store.blob_in_use(sha256).await {
            Ok(in_use) => in_use,
            Err(e) => {
                self.restore(sha256, trash)?;
                return Err(e.into());
            }
        };
        if in_use {
            self.restore(sha256, trash)?;
            return Ok(false);
        }
        std::fs::remove_file(trash)?;
        self.stats.removed_files.fetch_add(1, Ordering::Relaxed);
        Ok(true)
    }

    fn restore(&self, sha256: &str, trash: &Path) -> io::Result<()> {
        let target = self.path(sha256);
        if target.exists() {
            // An upload of the same bytes placed its own copy meanwhile.
            return std::fs::remove_file(trash);
        }
        std::fs::create_dir_all(target.parent().expect("a digest's directory"))?;
        std::fs::rename(trash, target)
    }

    /// Settles the files this node's trash holds: left by a crash or a stopped
    /// collection (at start, before serving, and before each collection pass).
    pub async fn settle_trash(&self, store: &dyn Store) -> anyhow::Result<()> {
        for entry in std::fs::read_dir(&self.trash)? {
            let path = entry?.path();
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            let sha256 = name.split('.').next().unwrap_or_default().to_owned();
            if is_digest(&sha256) {
                self.settle(store, &sha256, &path).await?;
            } else {
                std::fs::remove_file(&path)?;
            }
        }
        Ok(())
    }

    /// The files kept (the part files and trash aside): each one's digest, size and
    /// last change. Blocking.
    fn listing(root: &Path) -> Vec<(String, u64, std::time::SystemTime)> {
        let mut out = Vec::new();
        let Ok(dirs) = std::fs::read_dir(root) else {
            return out;
        };
        for dir in dirs.flatten() {
            if dir.file_name().len() != 2 || !dir.path().is_dir() {
                continue;
            }
            for f in std::fs::read_dir(dir.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                let name = f.file_name().to_string_lossy().into_owned();
                if let Ok(meta) = f.metadata()
                    && is_digest(&name)
                {
                    let changed = meta.modified().unwrap_or(std::time::UNIX_EPOCH);
                    out.push((name, meta.len(), changed));
                }
            }
        }
        out
    }

    /// Counts the files kept and, with `grace`, removes those no upload uses that are
    /// older than it: what a stopped collection or a crash between a record's deletion
    /// and its file's removal left (each checked against the store as any other).
    async fn sweep(&self, store: &dyn Store, grace: Option<Duration>) -> anyhow::Result<()> {
        let root = self.root.clone();
        let files = tokio::task::spawn_blocking(move || Self::listing(&root)).await?;
        self.stats
            .files
            .store(files.len() as u64, Ordering::Relaxed);
        self.stats
            .bytes
            .store(files.iter().map(|f| f.1).sum(), Ordering::Relaxed);
        if let Some(grace) = grace {
            let old = std::time::SystemTime::now() - grace;
            for (digest, _, changed) in files {
                if changed < old {
                    self.retire(store, &digest).await?;
                }
            }
        }
        Ok(())
    }

    pub fn render(&self, out: &mut String) {
        use crate::metrics::{render_header, render_one, render_value};
        let s = &self.stats;
        render_header(
            out,
            "natter_uploads_total",
            "counter",
            "Uploads by outcome: stored, or refused (too large, over quota, an image bomb, cut off).",
        );
        for (outcome, n) in [("stored", &s.stored), ("refused", &s.refused)] {
            render_value(
                out,
                "natter_uploads_total",
                &format!("outcome=\"{outcome}\""),
                n.load(Ordering::Relaxed),
            );
        }
        for (name, help, n) in [
            (
                "natter_upload_bytes_received_total",
                "Bytes of upload bodies received in full.",
                &s.bytes_in,
            ),
            (
                "natter_file_bytes_served_total",
                "Bytes of files and thumbnails served.",
                &s.bytes_out,
            ),
            (
                "natter_uploads_collected_total",
                "Uploads deleted because no message carried them past their grace period.",
                &s.collected_uploads,
            ),
            (
                "natter_files_removed_total",
                "Files removed from the files directory once no upload used them.",
                &s.removed_files,
            ),
            (
                "natter_upload_collection_failures_total",
                "Collection passes of unreferenced uploads that failed (retried next pass).",
                &s.collect_failures,
            ),
        ] {
            render_one(out, name, "counter", help, n.load(Ordering::Relaxed));
        }
        for (name, help, n) in [
            (
                "natter_files_stored",
                "Files in the files directory, as of the last collection pass.",
                &s.files,
            ),
            (
                "natter_files_stored_bytes",
                "Bytes in the files directory, as of the last collection pass.",
                &s.bytes,
            ),
            (
                "natter_upload_collection_last_success_seconds",
                "When a collection pass of unreferenced uploads last succeeded (Unix seconds).",
                &s.last_collect,
            ),
        ] {
            render_one(out, name, "gauge", help, n.load(Ordering::Relaxed));
        }
        if let Some((free, total)) = crate::process::disk_space(&self.root) {
            render_one(
                out,
                "natter_files_dir_free_bytes",
                "gauge",
                "Bytes free on the file system holding the files directory.",
                free,
            );
            render_one(
                out,
                "natter_files_dir_size_bytes",
                "gauge",
                "Size of the file system holding the files directory.",
                total,
            );
        }
    }
}

fn is_digest(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The image type the first bytes announce, if any.
pub fn sniff_image(head: &[u8]) -> Option<image::ImageFormat> {
    if head.starts_with(b"\x89PNG\r\n\x1a\n") {
        Some(image::ImageFormat::Png)
    } else if head.starts_with(&[0xFF, 0xD8, 0xFF]) {
        Some(image::ImageFormat::Jpeg)
    } else if head.starts_with(b"GIF87a") || head.starts_with(b"GIF89a") {
        Some(image::ImageFormat::Gif)
    } else if head.len() >= 12 && &head[..4] == b"RIFF" && &head[8..12] == b"WEBP" {
        Some(image::ImageFormat::WebP)
    } else {
        None
    }
}

/// Tells what the received bytes are: an image that decodes within bounds gets its type
/// and a thumbnail; a bomb is refused; anything else (a broken image included) is a plain
/// file. Blocking: run it off the async workers.
pub fn inspect(path: &Path, head: &[u8]) -> Result<Inspected, ImageTooLarge> {
    let Some(format) = sniff_image(head) else {
        return Ok(Inspected::Other);
    };
    let Ok(file) = std::fs::File::open(path) else {
        return Ok(Inspected::Other);
    };
    let mut reader = image::ImageReader::with_format(io::BufReader::new(file), format);
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_IMAGE_EDGE);
    limits.max_image_height = Some(MAX_IMAGE_EDGE);
    limits.max_alloc = Some(MAX_DECODE_BYTES);
    reader.limits(limits);
    let decoded = match reader.decode() {
        Ok(img) => img,
        Err(image::ImageError::Limits(e)) => return Err(ImageTooLarge(e.to_string())),
        Err(_) => return Ok(Inspected::Other),
    };
    let (width, height) = (decoded.width(), decoded.height());
    let small = decoded.thumbnail(THUMB_EDGE, THUMB_EDGE);
    let mut thumbnail = io::Cursor::new(Vec::new());
    let (content_type, written) = match format {
        image::ImageFormat::Jpeg => (
            "image/jpeg",
            image::DynamicImage::ImageRgb8(small.to_rgb8()).write_with_encoder(
                image::codecs::jpeg::JpegEncoder::new_with_quality(&mut thumbnail, 80),
            ),
        ),
        image::ImageFormat::Png => (
            "image/png",
            small.write_to(&mut thumbnail, image::ImageFormat::Png),
        ),
        image::ImageFormat::Gif => (
            "image/gif",
            small.write_to(&mut thumbnail, image::ImageFormat::Png),
        ),
        _ => (
            "image/webp",
            small.write_to(&mut thumbnail, image::ImageFormat::Png),
        ),
    };
    if written.is_err() {
        return Ok(Inspected::Other);
    }
    Ok(Inspected::Image {
        content_type,
        width,
        height,
        thumbnail: thumbnail.into_inner(),
    })
}

/// A thumbnail's type: JPEG for a JPEG, PNG for the rest.
pub fn thumbnail_type(content_type: &str) -> &'static str {
    if content_type == "image/jpeg" {
        "image/jpeg"
    } else {
        "image/png"
    }
}

/// Deletes uploads no message carries past their grace period, and the files no upload
/// uses any more, every `every`, until aborted (a file left in the trash by an abort is
/// settled at the next start). Each pass looks at a bounded
/// number of uploads and the next goes on from there.
pub async fn collect_forever(
    store: Arc<dyn Store>,
    files: Arc<FileStore>,
    grace: Duration,
    every: Duration,
) {
    let mut after = 0;
    let mut swept = tokio::time::Instant::now();
    loop {
        tokio::time::sleep(every).await;
        // Files no record names are looked for once per grace period (at most hourly).
        let sweep = swept.elapsed() >= grace.min(SWEEP_EVERY);
        match collect_pass(&*store, &files, grace, after, sweep).await {
            Ok(next) => {
                after = next;
                if sweep {
                    swept = tokio::time::Instant::now();
                }
            }
            Err(e) => {
                files.stats.collect_failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "collecting unreferenced uploads failed; retried next pass");
            }
        }
    }
}

/// One pass from the upload id `after`: where the next pass starts.
pub async fn collect_pass(
    store: &dyn Store,
    files: &FileStore,
    grace: Duration,
    mut after: i64,
    sweep: bool,
) -> anyhow::Result<i64> {
    files.settle_trash(store).await?;
    let before = crate::clock::now_ms() - grace.as_millis() as i64;
    for _ in 0..COLLECT_PAGES_PER_PASS {
        let step = store.collect_uploads(before, after, COLLECT_PAGE).await?;
        files
            .stats
            .collected_uploads
            .fetch_add(step.deleted, Ordering::Relaxed);
        for digest in &step.digests {
            files.retire(store, digest).await?;
        }
        match step.next_after {
            Some(next) => after = next,
            None => {
                after = 0;
                break;
            }
        }
    }
    files.sweep(store, sweep.then_some(grace)).await?;
    files
        .stats
        .last_collect
        .store((crate::clock::now_ms() / 1000) as u64, Ordering::Relaxed);
    Ok(after)
}
