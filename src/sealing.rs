//! The server's secret key: it seals (encrypts and authenticates) what must not be read
//! from a stolen database file alone (two-factor secrets), and signs what the server hands
//! out and takes back (login challenges). It lives in a file of its own, never in the
//! database or its backups; every node of a cluster is given the same file.

use std::io::Write;
use std::path::Path;

use anyhow::{Context, bail};
use chacha20poly1305::aead::{Aead, Payload};
use chacha20poly1305::{Key, KeyInit, XChaCha20Poly1305, XNonce};

use crate::mac::hmac_sha256;

const KEY_BYTES: usize = 32;
const NONCE_BYTES: usize = 24;

/// A 256-bit key, with the two uses kept apart: XChaCha20-Poly1305 (random 192-bit
/// nonces) seals with a key derived for sealing, HMAC-SHA256 signs with another.
pub struct Sealer {
    seal: XChaCha20Poly1305,
    sign: [u8; 32],
}

impl Sealer {
    pub fn from_key(key: [u8; KEY_BYTES]) -> Self {
        let seal_key = hmac_sha256(&key, b"natter seal v1");
        Self {
            seal: XChaCha20Poly1305::new(&Key::from(seal_key)),
            sign: hmac_sha256(&key, b"natter sign v1"),
        }
    }

    /// Reads the key file (64 hex digits), or with `create` makes one (readable by its
    /// owner only) if there is none.
    pub fn load(path: &Path, create: bool) -> anyhow::Result<Self> {
        match std::fs::read_to_string(path) {
            Ok(text) => {
                let key = parse_key(text.trim())
                    .with_context(|| format!("read the secret key in {}", path.display()))?;
                warn_if_shared(path);
                Ok(Self::from_key(key))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && create => {
                let mut key = [0u8; KEY_BYTES];
                getrandom::fill(&mut key).map_err(|e| anyhow::anyhow!("random key: {e}"))?;
                write_key(path, &key)
                    .with_context(|| format!("create the secret key {}", path.display()))?;
                tracing::info!(path = %path.display(), "created a secret key: keep it apart from the database's backups, and give every node of a cluster the same one");
                Ok(Self::from_key(key))
            }
            Err(e) => Err(e).with_context(|| format!("read the secret key {}", path.display())),
        }
    }

    /// `plain` sealed, bound to `context` (e.g. the user it belongs to): nonce, then the
    /// ciphertext and its tag.
    pub fn seal(&self, context: &[u8], plain: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_BYTES];
        getrandom::fill(&mut nonce).expect("the OS random source works");
        let sealed = self
            .seal
            .encrypt(
                &XNonce::from(nonce),
                Payload {
                    msg: plain,
                    aad: context,
                },
            )
            .expect("sealing a short value cannot fail");
        let mut out = nonce.to_vec();
        out.extend_from_slice(&sealed);
        out
    }

    /// What [`Sealer::seal`] sealed with this key and `context`; `None` for anything else
    /// (another key, another context, a changed byte).
    pub fn open(&self, context: &[u8], sealed: &[u8]) -> Option<Vec<u8>> {
        if sealed.len() < NONCE_BYTES {
            return None;
        }
        let (nonce, ciphertext) = sealed.split_at(NONCE_BYTES);
        let nonce: [u8; NONCE_BYTES] = nonce.try_into().ok()?;
        self.seal
            .decrypt(
                &XNonce::from(nonce),
                Payload {
                    msg: ciphertext,
                    aad: context,
                },
            )
            .ok()
    }

    /// The signature of `message`.
    pub fn sign(&self, message: &[u8]) -> [u8; 32] {
        hmac_sha256(&self.sign, message)
    }

    /// Whether `signature` is `message`'s (compared in constant time).
    pub fn verify(&self, message: &[u8], signature: &[u8]) -> bool {
        crate::mac::same(&self.sign(message), signature)
    }
}

fn parse_key(text: &str) -> anyhow::Result<[u8; KEY_BYTES]> {
    if text.len() != KEY_BYTES * 2 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        bail!("the key must be {} hexadecimal digits", KEY_BYTES * 2);
    }
    let mut key = [0u8; KEY_BYTES];
    for (i, byte) in key.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).expect("checked hex");
    }
    Ok(key)
}

fn write_key(path: &Path, key: &[u8; KEY_BYTES]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(format!("{}\n", crate::auth::hex(key)).as_bytes())?;
    file.sync_all()?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

fn warn_if_shared(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path)
        && meta.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(path = %path.display(), "the secret key file is readable by others than its owner: chmod 600 it");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_values_open_only_with_their_key_and_context() {
        let a = Sealer::from_key([1; 32]);
        let b = Sealer::from_key([2; 32]);
        let sealed = a.seal(b"user:1", b"the secret");
        assert!(!sealed.windows(10).any(|w| w == b"the secret"));
        assert_eq!(
            a.open(b"user:1", &sealed).as_deref(),
            Some(&b"the secret"[..])
        );
        assert_eq!(a.open(b"user:2", &sealed), None);
        assert_eq!(b.open(b"user:1", &sealed), None);
        let mut flipped = sealed.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert_eq!(a.open(b"user:1", &flipped), None);
        assert_eq!(a.open(b"user:1", &sealed[..10]), None);
        // A fresh nonce each time.
        assert_ne!(a.seal(b"user:1", b"the secret"), sealed);
    }

    #[test]
    fn signatures_verify_with_their_key_only() {
        let a = Sealer::from_key([1; 32]);
        let b = Sealer::from_key([2; 32]);
        let sig = a.sign(b"message");
        assert!(a.verify(b"message", &sig));
        assert!(!a.verify(b"messagf", &sig));
        assert!(!b.verify(b"message", &sig));
    }

    #[test]
    fn a_key_file_is_created_once_and_read_back() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/secret.key");
        assert!(Sealer::load(&path, false).is_err());
        let made = Sealer::load(&path, true).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let read = Sealer::load(&path, true).unwrap();
        let sealed = made.seal(b"c", b"v");
        assert_eq!(read.open(b"c", &sealed).as_deref(), Some(&b"v"[..]));
        std::fs::write(&path, "not hex").unwrap();
        assert!(Sealer::load(&path, true).is_err());
    }
}
