//! Tokens encrypted at rest: AES-256-GCM with a random 96-bit nonce per
//! value, bound to the row and field it belongs to (associated data), under
//! a named key so keys can be rotated.
//!
//! `INTEGRATIONS_ENCRYPTION_KEYS=id:base64key,...`: the first key encrypts,
//! all decrypt. Key material never appears in errors or `Debug`.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use rand::RngCore;

/// The environment variable holding the keys.
pub const KEYS_ENV: &str = "INTEGRATIONS_ENCRYPTION_KEYS";

const NONCE_LEN: usize = 12;

/// What went wrong with keys or ciphertexts. Never contains key material or
/// plaintext.
#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    /// `INTEGRATIONS_ENCRYPTION_KEYS` is missing or malformed.
    #[error("{KEYS_ENV} is invalid: {0}")]
    InvalidKeys(String),
    /// A value was encrypted under a key that is not configured.
    #[error("a token is encrypted with key '{0}', which is not in {KEYS_ENV}; add it back (keys are only removed after `integrations rotate-keys`)")]
    UnknownKey(String),
    /// Authentication failed: wrong key, or the value was altered or moved.
    #[error("a token could not be decrypted with key '{0}' (altered, moved between rows, or the key changed)")]
    Corrupt(String),
    /// The development key file could not be read or written.
    #[error("development key file {path}: {reason}")]
    KeyFile {
        /// The file.
        path: String,
        /// What happened.
        reason: String,
    },
}

/// The configured keys.
pub struct Keyring {
    current: String,
    keys: HashMap<String, Aes256Gcm>,
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut ids: Vec<&String> = self.keys.keys().collect();
        ids.sort();
        f.debug_struct("Keyring")
            .field("current", &self.current)
            .field("key_ids", &ids)
            .finish()
    }
}

impl Keyring {
    /// Parses `id:base64key,...`: ids of 1 to 32 letters, digits, `-` or
    /// `_`; keys of 32 bytes, standard base64.
    pub fn parse(spec: &str) -> Result<Keyring, CryptoError> {
        let mut current = None;
        let mut keys = HashMap::new();
        for (i, entry) in spec.split(',').map(str::trim).enumerate() {
            if entry.is_empty() {
                continue;
            }
            let (id, key) = entry.split_once(':').ok_or_else(|| {
                CryptoError::InvalidKeys(format!(
                    "entry {} is not id:base64key (e.g. k1:$(openssl rand -base64 32))",
                    i + 1
                ))
            })?;
            if id.is_empty()
                || id.len() > 32
                || !id
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(CryptoError::InvalidKeys(format!(
                    "key id '{}' is not valid; accepted: 1 to 32 letters, digits, '-' or '_'",
                    id.chars().take(40).collect::<String>()
                )));
            }
            let bytes = STANDARD
                .decode(key.trim())
                .map_err(|_| CryptoError::InvalidKeys(format!("key '{id}' is not valid base64")))?;
            let cipher = Aes256Gcm::new_from_slice(&bytes).map_err(|_| {
                CryptoError::InvalidKeys(format!(
                    "key '{id}' is {} bytes; accepted: 32 bytes (AES-256), e.g. openssl rand -base64 32",
                    bytes.len()
                ))
            })?;
            if keys.insert(id.to_string(), cipher).is_some() {
                return Err(CryptoError::InvalidKeys(format!(
                    "key id '{id}' appears twice"
                )));
            }
            current.get_or_insert_with(|| id.to_string());
        }
        let current = current.ok_or_else(|| {
            CryptoError::InvalidKeys(
                "no key given; set it to id:base64key (32 random bytes)".into(),
            )
        })?;
        Ok(Keyring { current, keys })
    }

    /// A new random key spec `id:base64key`.
    pub fn generate_spec(id: &str) -> String {
        let mut key = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut key);
        format!("{id}:{}", STANDARD.encode(key))
    }

    /// The development mode's key: read from `path`, or created there (mode
    /// 0600) when missing. Returns the keyring and whether it was created.
    pub fn load_or_create(path: &Path) -> Result<(Keyring, bool), CryptoError> {
        let err = |reason: String| CryptoError::KeyFile {
            path: path.display().to_string(),
            reason,
        };
        match std::fs::read_to_string(path) {
            Ok(spec) => Ok((Keyring::parse(spec.trim())?, false)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let spec = Keyring::generate_spec("dev1");
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
                }
                write_private(path, &spec).map_err(|e| err(e.to_string()))?;
                Ok((Keyring::parse(&spec)?, true))
            }
            Err(e) => Err(err(e.to_string())),
        }
    }

    /// The id of the key new values are encrypted with.
    pub fn current_id(&self) -> &str {
        &self.current
    }

    /// Encrypts under the current key. `aad` binds the ciphertext to where
    /// it is stored (e.g. `integration:github:12345:access`).
    pub fn encrypt(&self, plaintext: &[u8], aad: &str) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        rand::thread_rng().fill_bytes(&mut nonce);
        let cipher = self.cipher(&self.current);
        let mut out = nonce.to_vec();
        // Encryption with a valid key and in-memory buffers cannot fail.
        if let Some(cipher) = cipher {
            if let Ok(ct) = cipher.encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: plaintext,
                    aad: aad.as_bytes(),
                },
            ) {
                out.extend_from_slice(&ct);
            }
        }
        out
    }

    /// Decrypts a value stored under `key_id`.
    pub fn decrypt(&self, key_id: &str, value: &[u8], aad: &str) -> Result<Vec<u8>, CryptoError> {
        let cipher = self
            .cipher(key_id)
            .ok_or_else(|| CryptoError::UnknownKey(key_id.to_string()))?;
        if value.len() < NONCE_LEN + 16 {
            return Err(CryptoError::Corrupt(key_id.to_string()));
        }
        let (nonce, ct) = value.split_at(NONCE_LEN);
        cipher
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: ct,
                    aad: aad.as_bytes(),
                },
            )
            .map_err(|_| CryptoError::Corrupt(key_id.to_string()))
    }

    fn cipher(&self, id: &str) -> Option<&Aes256Gcm> {
        self.keys.get(id)
    }
}

fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(contents.as_bytes())?;
    f.write_all(b"\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(spec: &str) -> Keyring {
        Keyring::parse(spec).unwrap()
    }

    #[test]
    fn round_trip_with_fresh_nonces() {
        let spec = Keyring::generate_spec("k1");
        let k = ring(&spec);
        let a = k.encrypt(b"tok", "aad");
        let b = k.encrypt(b"tok", "aad");
        assert_ne!(a, b, "a random nonce per value");
        assert_eq!(k.decrypt("k1", &a, "aad").unwrap(), b"tok");
    }

    #[test]
    fn ciphertext_is_bound_to_its_place() {
        let k = ring(&Keyring::generate_spec("k1"));
        let a = k.encrypt(b"tok", "integration:github:1:access");
        assert!(k.decrypt("k1", &a, "integration:github:2:access").is_err());
        let mut flipped = a.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        assert!(matches!(
            k.decrypt("k1", &flipped, "integration:github:1:access"),
            Err(CryptoError::Corrupt(_))
        ));
    }

    #[test]
    fn first_key_encrypts_all_decrypt() {
        let old = Keyring::generate_spec("old");
        let new = Keyring::generate_spec("new");
        let before = ring(&old);
        let value = before.encrypt(b"tok", "x");
        let after = ring(&format!("{new},{old}"));
        assert_eq!(after.current_id(), "new");
        assert_eq!(after.decrypt("old", &value, "x").unwrap(), b"tok");
        let only_new = ring(&new);
        assert!(matches!(
            only_new.decrypt("old", &value, "x"),
            Err(CryptoError::UnknownKey(_))
        ));
    }

    #[test]
    fn bad_specs_say_what_is_wrong_without_key_material() {
        let key = STANDARD.encode([7u8; 16]);
        for (spec, needle) in [
            ("", "no key given"),
            ("nocolon", "id:base64key"),
            ("k1:!!!", "not valid base64"),
            (&format!("k1:{key}") as &str, "16 bytes"),
            ("bad id:AAAA", "not valid"),
        ] {
            let e = Keyring::parse(spec).unwrap_err().to_string();
            assert!(e.contains(needle), "{spec}: {e}");
            assert!(!e.contains(&key));
        }
        let dup = Keyring::generate_spec("k1");
        assert!(Keyring::parse(&format!("{dup},{dup}"))
            .unwrap_err()
            .to_string()
            .contains("twice"));
    }

    #[test]
    fn debug_shows_ids_only() {
        let spec = Keyring::generate_spec("k1");
        let shown = format!("{:?}", ring(&spec));
        let key = spec.split_once(':').unwrap().1;
        assert!(shown.contains("k1") && !shown.contains(key), "{shown}");
    }

    #[test]
    fn development_key_is_created_once_and_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("encryption.key");
        let (a, created) = Keyring::load_or_create(&path).unwrap();
        assert!(created);
        let (b, created) = Keyring::load_or_create(&path).unwrap();
        assert!(!created);
        let v = a.encrypt(b"x", "y");
        assert_eq!(b.decrypt(a.current_id(), &v, "y").unwrap(), b"x");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
