//! Deploy templates (`[deploy]` image, args and commands, docs/deploy.md): which placeholders
//! they may use and how they are filled. The coordinator validates a strategy's templates with
//! [`check`] and the agent renders them with [`render`]: one rule on both sides of the wire.
//!
//! `{name}` is a placeholder; `{{` and `}}` are literal braces; `${…}` is left alone, so shell
//! variables (`${HOME}`) pass through to `sh -c` untouched.

/// The placeholders a template may use (`shard_count`: the service's shard count, 0 when it
/// is not sharded).
pub const PLACEHOLDERS: [&str; 8] = [
    "version",
    "service",
    "instance",
    "variant",
    "address",
    "host",
    "port",
    "shard_count",
];

/// One piece of a template.
enum Piece<'a> {
    Text(&'a str),
    Placeholder(&'a str),
}

/// Splits `template`; the error names the first unknown or unclosed placeholder.
fn pieces(template: &str) -> Result<Vec<Piece<'_>>, String> {
    let mut out = Vec::new();
    let bytes = template.as_bytes();
    let (mut i, mut start) = (0, 0);
    while i < bytes.len() {
        match bytes[i] {
            b'{' if bytes.get(i + 1) == Some(&b'{') => {
                out.push(Piece::Text(&template[start..=i]));
                i += 2;
                start = i;
            }
            b'}' if bytes.get(i + 1) == Some(&b'}') => {
                out.push(Piece::Text(&template[start..=i]));
                i += 2;
                start = i;
            }
            b'$' if bytes.get(i + 1) == Some(&b'{') => {
                // A shell expansion: copied up to its closing brace.
                let close = template[i..].find('}').map_or(bytes.len(), |c| i + c + 1);
                i = close;
            }
            b'{' => {
                out.push(Piece::Text(&template[start..i]));
                let Some(len) = template[i + 1..].find('}') else {
                    return Err(format!(
                        "unclosed placeholder at byte {i} (write {{{{ for a literal brace)"
                    ));
                };
                let name = &template[i + 1..i + 1 + len];
                if !PLACEHOLDERS.contains(&name) {
                    return Err(format!(
                        "unknown placeholder {{{name}}}: use one of {} (or {{{{ and }}}} for literal braces)",
                        PLACEHOLDERS.map(|p| format!("{{{p}}}")).join(", ")
                    ));
                }
                out.push(Piece::Placeholder(name));
                i += len + 2;
                start = i;
            }
            _ => i += 1,
        }
    }
    out.push(Piece::Text(&template[start..]));
    Ok(out)
}

/// Checks that `template` uses known placeholders only.
pub fn check(template: &str) -> Result<(), String> {
    pieces(template).map(|_| ())
}

/// Fills `template`'s placeholders with `value(name)`.
pub fn render(template: &str, value: impl Fn(&str) -> String) -> Result<String, String> {
    let mut out = String::with_capacity(template.len());
    for piece in pieces(template)? {
        match piece {
            Piece::Text(t) => out.push_str(t),
            Piece::Placeholder(p) => out.push_str(&value(p)),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fill(t: &str) -> Result<String, String> {
        render(t, |p| format!("<{p}>"))
    }

    #[test]
    fn placeholders_are_filled_and_literal_braces_and_shell_variables_pass_through() {
        assert_eq!(
            fill("systemctl restart api@{version}").unwrap(),
            "systemctl restart api@<version>"
        );
        assert_eq!(fill("{host}:{port}").unwrap(), "<host>:<port>");
        assert_eq!(fill("echo ${HOME} {{x}}").unwrap(), "echo ${HOME} {x}");
        assert_eq!(fill("awk '{{print $1}}'").unwrap(), "awk '{print $1}'");
        assert_eq!(
            fill("serin demo-bot --shard-count {shard_count}").unwrap(),
            "serin demo-bot --shard-count <shard_count>"
        );
        assert_eq!(fill("").unwrap(), "");
        assert_eq!(fill("no placeholders").unwrap(), "no placeholders");
    }

    #[test]
    fn an_unknown_or_unclosed_placeholder_is_named() {
        let e = check("run {verison}").unwrap_err();
        assert!(
            e.contains("unknown placeholder {verison}") && e.contains("{version}"),
            "{e}"
        );
        let e = check("run {version").unwrap_err();
        assert!(e.contains("unclosed placeholder at byte 4"), "{e}");
        assert!(check("awk '{print $1}'").is_err());
        let e = check("--shards {shard_cnt}").unwrap_err();
        assert!(e.contains("{shard_count}"), "{e}");
    }
}
