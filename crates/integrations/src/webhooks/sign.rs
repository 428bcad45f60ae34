//! Signing secrets and signatures in the Standard Webhooks form
//! (<https://www.standardwebhooks.com>), so receivers verify deliveries
//! with its published libraries: a secret is `whsec_` and the base64 of
//! random bytes; a signature is `v1,` and the base64 of
//! HMAC-SHA256(key = those bytes, "{webhook-id}.{webhook-timestamp}.{body}").
//! Written here because no maintained crate implements the scheme; its
//! pieces are the `hmac` and `sha2` crates.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use hmac::{Hmac, KeyInit, Mac};
use rand::RngCore;
use secrecy::zeroize::Zeroizing;
use secrecy::{ExposeSecret, SecretString};
use sha2::Sha256;

/// The prefix of a secret.
pub const SECRET_PREFIX: &str = "whsec_";

/// Random bytes in a new secret (the libraries accept 24 to 64).
const SECRET_BYTES: usize = 32;

/// A new secret: `whsec_<base64 of 32 random bytes>`.
pub fn new_secret() -> SecretString {
    let mut bytes = Zeroizing::new([0u8; SECRET_BYTES]);
    rand::thread_rng().fill_bytes(bytes.as_mut());
    SecretString::from(format!(
        "{SECRET_PREFIX}{}",
        STANDARD.encode(bytes.as_ref())
    ))
}

/// A secret's key: the bytes its base64 encodes. Never shown by `Debug`.
pub struct SigningKey(Zeroizing<Vec<u8>>);

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SigningKey(..)")
    }
}

impl SigningKey {
    /// The key of a `whsec_...` secret; `None` when it is not one.
    pub fn from_secret(secret: &SecretString) -> Option<SigningKey> {
        let text = secret.expose_secret();
        let encoded = text.strip_prefix(SECRET_PREFIX)?;
        let bytes = STANDARD.decode(encoded).ok()?;
        (!bytes.is_empty()).then(|| SigningKey(Zeroizing::new(bytes)))
    }

    /// `v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`.
    pub fn sign(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        // Any key length is accepted by HMAC: this cannot fail.
        let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(&self.0) else {
            unreachable!("HMAC accepts keys of any length")
        };
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
    }
}

/// The `webhook-signature` header: one signature per key, space-separated
/// (the new secret's first while a rotated one overlaps).
pub fn signature_header(keys: &[&SigningKey], id: &str, timestamp: i64, body: &[u8]) -> String {
    keys.iter()
        .map(|k| k.sign(id, timestamp, body))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signs_the_specifications_example() {
        // The example of the Standard Webhooks specification and of its
        // libraries' tests.
        let key = SigningKey::from_secret(&SecretString::from(
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".to_string(),
        ))
        .unwrap();
        let body = br#"{"test": 2432232314}"#;
        assert_eq!(
            key.sign("msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }

    #[test]
    fn new_secrets_are_random_and_parse() {
        let a = new_secret();
        let b = new_secret();
        assert_ne!(a.expose_secret(), b.expose_secret());
        assert!(a.expose_secret().starts_with(SECRET_PREFIX));
        let key = SigningKey::from_secret(&a).unwrap();
        assert_eq!(key.0.len(), SECRET_BYTES);
        assert_eq!(format!("{key:?}"), "SigningKey(..)");
        assert!(SigningKey::from_secret(&SecretString::from("nope".to_string())).is_none());
    }

    #[test]
    fn a_rotated_secret_adds_a_second_signature() {
        let new = SigningKey::from_secret(&new_secret()).unwrap();
        let old = SigningKey::from_secret(&new_secret()).unwrap();
        let header = signature_header(&[&new, &old], "1", 5, b"{}");
        let parts: Vec<_> = header.split(' ').collect();
        assert_eq!(parts, [new.sign("1", 5, b"{}"), old.sign("1", 5, b"{}")]);
    }
}
