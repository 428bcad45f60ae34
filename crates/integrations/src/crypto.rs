//! Tokens encrypted at rest under a named key so keys can be rotated, each
//! value bound to the row and field it belongs to (associated data).
//!
//! `INTEGRATIONS_ENCRYPTION_KEYS=id:base64key,...`: the first key encrypts,
//! all decrypt. Key material never appears in errors or `Debug`, and is
//! cleared from memory when the keyring is dropped.
//!
//! Two formats, told apart by a 4-byte marker:
//! - **v2** (written): `"IMS\x02" || nonce (24 bytes) || ciphertext+tag`,
//!   XChaCha20-Poly1305 under a subkey derived from the configured key with
//!   HKDF-SHA256. The 192-bit random nonce makes a repeat negligible however
//!   many values one key encrypts, so keys need no rotation for volume.
//! - **v1** (read only): `nonce (12 bytes) || ciphertext+tag`, AES-256-GCM
//!   under the configured key itself. Random 96-bit nonces cap a key at
//!   about 2^32 encryptions; nothing writes v1 any more, and
//!   `integrations rotate-keys` rewrites what is left as v2.
//!
//! A v1 value starts with the v2 marker by chance once in 2^32; decryption
//! then falls back to v1, and authentication decides (an altered value
//! fails both).

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::Aes256Gcm;
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use chacha20poly1305::XChaCha20Poly1305;
use hkdf::Hkdf;
use rand::RngCore;
use secrecy::zeroize::Zeroizing;
use sha2::Sha256;

/// The environment variable holding the keys.
pub const KEYS_ENV: &str = "INTEGRATIONS_ENCRYPTION_KEYS";

/// The marker that starts every value in the current format (v2).
pub const FORMAT_MARKER: &[u8; 4] = b"IMS\x02";

const KEY_LEN: usize = 32;
const TAG_LEN: usize = 16;
const NONCE_LEN: usize = 24;
const LEGACY_NONCE_LEN: usize = 12;
/// HKDF `info` of the v2 subkey: a key serves each algorithm under its own
/// derived key, never the same bytes for two ciphers.
const V2_KEY_INFO: &[u8] = b"integrations token encryption v2: XChaCha20-Poly1305";

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
    /// The cipher refused to encrypt (a value too large for it); nothing is
    /// stored.
    #[error("a token could not be encrypted with key '{0}'")]
    EncryptFailed(String),
    /// The development key file could not be read or written.
    #[error("development key file {path}: {reason}")]
    KeyFile {
        /// The file.
        path: String,
        /// What happened.
        reason: String,
    },
}

/// One configured key, as the two ciphers it serves. Both clear their key
/// material when dropped (chacha20poly1305 always; AES through the `aes`
/// and `aes-gcm` crates' `zeroize` features).
struct Key {
    /// v2: XChaCha20-Poly1305 under the HKDF subkey.
    current: XChaCha20Poly1305,
    /// v1: AES-256-GCM under the key itself, to read old values.
    legacy: Aes256Gcm,
}

/// The configured keys.
pub struct Keyring {
    current: String,
    keys: HashMap<String, Key>,
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

impl Key {
    /// The ciphers of a 32-byte key (checked by the caller).
    fn new(id: &str, key: &[u8]) -> Result<Key, CryptoError> {
        let invalid = || CryptoError::InvalidKeys(format!("key '{id}' cannot be used"));
        let mut subkey = Zeroizing::new([0u8; KEY_LEN]);
        Hkdf::<Sha256>::new(None, key)
            .expand(V2_KEY_INFO, subkey.as_mut())
            .map_err(|_| invalid())?;
        Ok(Key {
            current: XChaCha20Poly1305::new_from_slice(subkey.as_ref()).map_err(|_| invalid())?,
            legacy: Aes256Gcm::new_from_slice(key).map_err(|_| invalid())?,
        })
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
            let bytes = Zeroizing::new(STANDARD.decode(key.trim()).map_err(|_| {
                CryptoError::InvalidKeys(format!("key '{id}' is not valid base64"))
            })?);
            if bytes.len() != KEY_LEN {
                return Err(CryptoError::InvalidKeys(format!(
                    "key '{id}' is {} bytes; accepted: 32 bytes (AES-256), e.g. openssl rand -base64 32",
                    bytes.len()
                )));
            }
            if keys.insert(id.to_string(), Key::new(id, &bytes)?).is_some() {
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
        let mut key = Zeroizing::new([0u8; KEY_LEN]);
        rand::thread_rng().fill_bytes(key.as_mut());
        format!("{id}:{}", STANDARD.encode(key.as_ref()))
    }

    /// The development mode's key: read from `path`, or created there (mode
    /// 0600) when missing. Returns the keyring and whether it was created.
    pub fn load_or_create(path: &Path) -> Result<(Keyring, bool), CryptoError> {
        let err = |reason: String| CryptoError::KeyFile {
            path: path.display().to_string(),
            reason,
        };
        match std::fs::read_to_string(path) {
            Ok(spec) => {
                let spec = Zeroizing::new(spec);
                Ok((Keyring::parse(spec.trim())?, false))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let spec = Zeroizing::new(Keyring::generate_spec("dev1"));
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

    /// Encrypts under the current key, in the current format. `aad` binds
    /// the ciphertext to where it is stored (e.g.
    /// `integration:github:12345:access`).
    pub fn encrypt(&self, plaintext: &[u8], aad: &str) -> Result<Vec<u8>, CryptoError> {
        let key = self
            .keys
            .get(&self.current)
            .ok_or_else(|| CryptoError::UnknownKey(self.current.clone()))?;
        let mut nonce = [0u8; NONCE_LEN];
        rand::thread_rng().fill_bytes(&mut nonce);
        let ct = key
            .current
            .encrypt(
                (&nonce).into(),
                Payload {
                    msg: plaintext,
                    aad: aad.as_bytes(),
                },
            )
            .map_err(|_| CryptoError::EncryptFailed(self.current.clone()))?;
        let mut out = Vec::with_capacity(FORMAT_MARKER.len() + NONCE_LEN + ct.len());
        out.extend_from_slice(FORMAT_MARKER);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        Ok(out)
    }

    /// Decrypts a value stored under `key_id`, in either format. The
    /// plaintext is cleared from memory when dropped.
    pub fn decrypt(
        &self,
        key_id: &str,
        value: &[u8],
        aad: &str,
    ) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
        let key = self
            .keys
            .get(key_id)
            .ok_or_else(|| CryptoError::UnknownKey(key_id.to_string()))?;
        let corrupt = || CryptoError::Corrupt(key_id.to_string());
        let aad = aad.as_bytes();
        if let Some(rest) = value.strip_prefix(FORMAT_MARKER.as_slice()) {
            if rest.len() >= NONCE_LEN + TAG_LEN {
                let (nonce, msg) = rest.split_at(NONCE_LEN);
                if let Ok(plain) = key.current.decrypt(nonce.into(), Payload { msg, aad }) {
                    return Ok(Zeroizing::new(plain));
                }
            }
        }
        // v1, or a v1 value that starts with the marker by chance.
        if value.len() < LEGACY_NONCE_LEN + TAG_LEN {
            return Err(corrupt());
        }
        let (nonce, msg) = value.split_at(LEGACY_NONCE_LEN);
        key.legacy
            .decrypt(nonce.into(), Payload { msg, aad })
            .map(Zeroizing::new)
            .map_err(|_| corrupt())
    }

    /// Whether a stored value is in the current format (else
    /// `rotate-keys` rewrites it).
    pub fn is_current_format(value: &[u8]) -> bool {
        value.starts_with(FORMAT_MARKER)
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
        let a = k.encrypt(b"tok", "aad").unwrap();
        let b = k.encrypt(b"tok", "aad").unwrap();
        assert_ne!(a, b, "a random nonce per value");
        assert!(Keyring::is_current_format(&a));
        assert_eq!(a.len(), 4 + 24 + 3 + 16);
        assert_eq!(k.decrypt("k1", &a, "aad").unwrap().as_slice(), b"tok");
    }

    /// Written by the previous release (AES-256-GCM, 12-byte nonce first)
    /// under the key 0x42 * 32: must stay readable.
    const LEGACY_SPEC: &str = "legacy:QkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkI=";
    const LEGACY_ACCESS: &str = "7d08ce7bd9a4f474ed44f5a3c0ea1ae45df3d38c527177ed68371679417f4f15ef463553490e51861f5d8c4324d2dc";

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn values_of_the_previous_format_still_decrypt() {
        let k = ring(LEGACY_SPEC);
        let old = unhex(LEGACY_ACCESS);
        assert!(!Keyring::is_current_format(&old));
        let aad = "integration:good:acct-legacy:access";
        assert_eq!(
            k.decrypt("legacy", &old, aad).unwrap().as_slice(),
            b"legacy-access-token"
        );
        assert!(k
            .decrypt("legacy", &old, "integration:good:other:access")
            .is_err());
        // New values under the same key are v2 and use another (derived) key:
        // AES-GCM under the configured key cannot open them.
        let new = k.encrypt(b"legacy-access-token", aad).unwrap();
        assert!(Keyring::is_current_format(&new));
        let key = &k.keys["legacy"];
        let (nonce, msg) = new[4..].split_at(12);
        assert!(key
            .legacy
            .decrypt(
                nonce.into(),
                Payload {
                    msg,
                    aad: aad.as_bytes()
                }
            )
            .is_err());
    }

    #[test]
    fn a_v1_value_that_starts_with_the_marker_by_chance_still_decrypts() {
        let k = ring(&Keyring::generate_spec("k1"));
        let mut nonce = [7u8; 12];
        nonce[..4].copy_from_slice(FORMAT_MARKER);
        let ct = k.keys["k1"]
            .legacy
            .encrypt(
                (&nonce).into(),
                Payload {
                    msg: b"tok",
                    aad: b"x",
                },
            )
            .unwrap();
        let value = [nonce.as_slice(), &ct].concat();
        assert!(Keyring::is_current_format(&value));
        assert_eq!(k.decrypt("k1", &value, "x").unwrap().as_slice(), b"tok");
    }

    #[test]
    fn encrypting_without_the_current_key_fails_instead_of_storing_a_bare_nonce() {
        let k = Keyring {
            current: "gone".into(),
            keys: HashMap::new(),
        };
        assert!(matches!(
            k.encrypt(b"tok", "x"),
            Err(CryptoError::UnknownKey(id)) if id == "gone"
        ));
    }

    #[test]
    fn ciphertext_is_bound_to_its_place() {
        let k = ring(&Keyring::generate_spec("k1"));
        let a = k.encrypt(b"tok", "integration:github:1:access").unwrap();
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
        let value = before.encrypt(b"tok", "x").unwrap();
        let after = ring(&format!("{new},{old}"));
        assert_eq!(after.current_id(), "new");
        assert_eq!(
            after.decrypt("old", &value, "x").unwrap().as_slice(),
            b"tok"
        );
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
        let v = a.encrypt(b"x", "y").unwrap();
        assert_eq!(b.decrypt(a.current_id(), &v, "y").unwrap().as_slice(), b"x");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}
