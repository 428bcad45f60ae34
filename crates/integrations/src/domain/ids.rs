//! `user_id`, `provider` and `account_id`: length and character limits
//! enforced once, at the edge.

use std::fmt;

/// A value that failed validation: names the field, and what is accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field} is invalid: {reason}")]
pub struct InvalidInput {
    /// The field (`user_id`, `provider`, `account_id`, ...).
    pub field: &'static str,
    /// What is wrong and what is accepted.
    pub reason: String,
}

impl InvalidInput {
    /// A validation failure for `field`.
    pub fn new(field: &'static str, reason: impl Into<String>) -> InvalidInput {
        InvalidInput {
            field,
            reason: reason.into(),
        }
    }
}

fn check(
    field: &'static str,
    value: &str,
    max: usize,
    allowed: impl Fn(char) -> bool,
    accepted: &str,
) -> Result<String, InvalidInput> {
    if value.is_empty() {
        return Err(InvalidInput::new(
            field,
            format!("it is empty; accepted: {accepted}"),
        ));
    }
    if value.len() > max {
        return Err(InvalidInput::new(
            field,
            format!("it is {} bytes long; accepted: at most {max}", value.len()),
        ));
    }
    if let Some(c) = value.chars().find(|c| !allowed(*c)) {
        return Err(InvalidInput::new(
            field,
            format!("it contains {c:?}; accepted: {accepted}"),
        ));
    }
    Ok(value.to_string())
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $field:literal, $max:expr, $allowed:expr, $pattern:literal, $accepted:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
        #[serde(transparent)]
        pub struct $name(String);

        impl $name {
            /// Longest value accepted, in bytes (every accepted character
            /// is ASCII, so also in characters).
            pub const MAX_LEN: usize = $max;

            /// The accepted values as an anchored regular expression, for
            /// the OpenAPI document (`parse` is the authority; a test keeps
            /// the two in step).
            pub const PATTERN: &'static str = $pattern;

            /// Validates a raw value.
            pub fn parse(value: &str) -> Result<$name, InvalidInput> {
                check($field, value, $max, $allowed, $accepted).map($name)
            }

            /// The value.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

fn id_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "-_.@:+|~=".contains(c)
}

id_type!(
    /// The application's user the integration belongs to.
    UserId,
    "user_id",
    128,
    id_char,
    "^[A-Za-z0-9._@:+|~=-]{1,128}$",
    "1 to 128 characters: letters, digits and - _ . @ : + | ~ ="
);

id_type!(
    /// The account on the provider's side (e.g. a GitHub user id).
    AccountId,
    "account_id",
    256,
    id_char,
    "^[A-Za-z0-9._@:+|~=-]{1,256}$",
    "1 to 256 characters: letters, digits and - _ . @ : + | ~ ="
);

id_type!(
    /// A provider's name as the registry knows it (`github`, `google`, ...).
    ProviderName,
    "provider",
    64,
    |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_',
    "^[a-z0-9_-]{1,64}$",
    "1 to 64 lowercase letters, digits, - or _"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_name_the_field_and_what_is_accepted() {
        assert!(UserId::parse("auth0|5f1e-user@example.com").is_ok());
        let e = UserId::parse("").unwrap_err().to_string();
        assert!(e.starts_with("user_id is invalid: it is empty"), "{e}");
        let e = UserId::parse(&"x".repeat(129)).unwrap_err().to_string();
        assert!(e.contains("129 bytes") && e.contains("at most 128"), "{e}");
        let e = AccountId::parse("a/b").unwrap_err().to_string();
        assert!(
            e.starts_with("account_id is invalid") && e.contains("'/'"),
            "{e}"
        );
        let e = ProviderName::parse("GitHub").unwrap_err().to_string();
        assert!(
            e.starts_with("provider is invalid") && e.contains("lowercase"),
            "{e}"
        );
        assert!(AccountId::parse("bad space").is_err());
        assert!(AccountId::parse("1234567890").is_ok());
    }

    /// The characters a `PATTERN`'s one class admits (`[...]`, with
    /// `a-z` ranges and a literal trailing `-`).
    fn class_of(pattern: &str) -> Vec<char> {
        let start = pattern.find('[').unwrap() + 1;
        let end = pattern.find(']').unwrap();
        let class: Vec<char> = pattern[start..end].chars().collect();
        let mut chars = Vec::new();
        let mut i = 0;
        while i < class.len() {
            if i + 2 < class.len() && class[i + 1] == '-' {
                chars.extend(class[i]..=class[i + 2]);
                i += 3;
            } else {
                chars.push(class[i]);
                i += 1;
            }
        }
        chars
    }

    #[test]
    fn openapi_patterns_admit_exactly_what_parse_accepts() {
        type Parse = fn(&str) -> bool;
        let cases: [(&str, usize, Parse); 3] = [
            (UserId::PATTERN, UserId::MAX_LEN, |v| {
                UserId::parse(v).is_ok()
            }),
            (AccountId::PATTERN, AccountId::MAX_LEN, |v| {
                AccountId::parse(v).is_ok()
            }),
            (ProviderName::PATTERN, ProviderName::MAX_LEN, |v| {
                ProviderName::parse(v).is_ok()
            }),
        ];
        for (pattern, max, parse) in cases {
            assert!(pattern.starts_with("^[") && pattern.ends_with(&format!("]{{1,{max}}}$")));
            let class = class_of(pattern);
            for c in (0u8..=127)
                .map(char::from)
                .chain(['é', '\u{0}', '\u{2028}'])
            {
                assert_eq!(parse(&c.to_string()), class.contains(&c), "{pattern} {c:?}");
            }
            let ok = class[0].to_string();
            assert!(parse(&ok.repeat(max)) && !parse(&ok.repeat(max + 1)) && !parse(""));
        }
    }
}
