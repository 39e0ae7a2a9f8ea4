//! The variant-override contract: which request header and cookie names a strategy may name
//! (`[traffic] override_header` / `override_cookie`), and which values they recognise. Shared
//! by the coordinator (which validates the strategy) and the agent (which checks what arrives
//! on the wire before writing it into a balancer's configuration): both must agree, so the
//! rules live once, next to the wire fields that carry the names.
//!
//! Why these character sets, narrower than HTTP's tokens: every balancer must be able to
//! address the name. nginx reads a header as `$http_<name>` (lowercased, `-` as `_`) and
//! ignores headers containing `_` by default (`underscores_in_headers off`); it reads a cookie
//! as `$cookie_<name>`, whose name ends at the first character outside `[A-Za-z0-9_]`.
//! HAProxy's `req.hdr()` and `req.cook()` take all of these as they are.

/// Longest header or cookie name, in bytes.
pub const MAX_NAME_BYTES: usize = 64;

/// The value that sends a request to the canary (compared ASCII case-insensitively).
pub const CANARY_VALUE: &str = "canary";
/// The value that sends a request to the stable variant (compared ASCII case-insensitively).
pub const STABLE_VALUE: &str = "stable";

/// Checks a header name: 1..=[`MAX_NAME_BYTES`] bytes of `A-Z a-z 0-9 -`, starting and
/// ending with a letter or digit (e.g. `X-Serin-Variant`). The error says what is wrong and
/// quotes the name; callers prefix the field.
pub fn check_header_name(name: &str) -> Result<(), String> {
    check_name(name, '-', "A-Z a-z 0-9 and '-'", "X-Serin-Variant")
}

/// Checks a cookie name: 1..=[`MAX_NAME_BYTES`] bytes of `A-Z a-z 0-9 _`, starting and ending
/// with a letter or digit (e.g. `serin_variant`).
pub fn check_cookie_name(name: &str) -> Result<(), String> {
    check_name(name, '_', "A-Z a-z 0-9 and '_'", "serin_variant")
}

fn check_name(name: &str, separator: char, allowed: &str, example: &str) -> Result<(), String> {
    let problem = if name.is_empty() {
        Some("it is empty".to_owned())
    } else if name.len() > MAX_NAME_BYTES {
        Some(format!(
            "{} bytes is longer than the limit of {MAX_NAME_BYTES} bytes",
            name.len()
        ))
    } else if let Some(c) = name
        .chars()
        .find(|&c| !(c.is_ascii_alphanumeric() || c == separator))
    {
        Some(format!("{c:?} is not allowed (only {allowed})"))
    } else if name.starts_with(separator) || name.ends_with(separator) {
        Some("it must start and end with a letter or digit".to_owned())
    } else {
        None
    };
    match problem {
        None => Ok(()),
        Some(problem) => Err(format!(
            "{name:?} is not usable: {problem}, e.g. \"{example}\""
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_names_are_letters_digits_and_inner_dashes() {
        for good in ["X-Serin-Variant", "x-canary", "V", "X-1", &"a".repeat(64)] {
            assert_eq!(check_header_name(good), Ok(()), "{good}");
        }
        for (bad, why) in [
            ("", "empty"),
            ("X_Serin", "'_' is not allowed"),
            ("X Serin", "' ' is not allowed"),
            ("X-Serin:", "':' is not allowed"),
            ("X-Serin\n", "'\\n' is not allowed"),
            ("Ünicode", "'Ü' is not allowed"),
            ("-X", "start and end"),
            ("X-", "start and end"),
            (
                &"a".repeat(65),
                "65 bytes is longer than the limit of 64 bytes",
            ),
        ] {
            let err = check_header_name(bad).unwrap_err();
            assert!(err.contains(why), "{bad:?}: {err}");
            assert!(err.contains(&format!("{bad:?}")), "{bad:?}: {err}");
        }
    }

    #[test]
    fn cookie_names_are_letters_digits_and_inner_underscores() {
        for good in ["serin_variant", "SerinVariant", "c", "v2"] {
            assert_eq!(check_cookie_name(good), Ok(()), "{good}");
        }
        for (bad, why) in [
            ("", "empty"),
            ("serin-variant", "'-' is not allowed"),
            ("a=b", "'=' is not allowed"),
            ("a;b", "';' is not allowed"),
            ("_a", "start and end"),
            ("a_", "start and end"),
            ("$cookie_a", "'$' is not allowed"),
        ] {
            let err = check_cookie_name(bad).unwrap_err();
            assert!(err.contains(why), "{bad:?}: {err}");
        }
    }
}
