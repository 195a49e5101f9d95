//! Identity names: the one place that turns a token's (tenant, subject) into
//! the name the kernel, the audit trail, `agent status` and `agent revoke`
//! use. The name must be unambiguous, so that two different (tenant,
//! subject) pairs can never share limits, counters or revocation: each part
//! is percent-escaped (`%`, `/` and control characters, RFC 3986 §2.1
//! style) before they are joined with `/`. After escaping neither part
//! contains `/`, so the join is injective: `sub = "acme/alice"` without a
//! tenant is `acme%2Falice`, never the identity `acme/alice` (tenant
//! `acme`, subject `alice`). Names from the config (`[identities.NAME]`,
//! `[[admissions]]`) only use `a-z 0-9 _ -`, which escaping leaves alone.

use std::fmt::Write as _;

use crate::config::identity_key;

/// Who an identity is: the token's tenant (if the deployment has tenants)
/// and subject.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IdentityName {
    pub tenant: Option<String>,
    pub subject: String,
}

impl IdentityName {
    pub fn new(tenant: Option<&str>, subject: &str) -> IdentityName {
        IdentityName {
            tenant: tenant.map(str::to_owned),
            subject: subject.to_owned(),
        }
    }

    /// The escaped `tenant/subject` (or `subject`) form.
    pub fn display(&self) -> String {
        let mut out = String::with_capacity(self.subject.len() + 16);
        if let Some(t) = &self.tenant {
            escape_into(&mut out, t);
            out.push('/');
        }
        escape_into(&mut out, &self.subject);
        out
    }

    /// `Identity::key` in the kernel.
    pub fn key(&self) -> u64 {
        identity_key(&self.display())
    }

    /// Parses a displayed name back into its parts (what `agent revoke
    /// --identity` accepts). `None` for text no identity displays as.
    pub fn parse(display: &str) -> Option<IdentityName> {
        let (tenant, subject) = match display.split_once('/') {
            Some((t, s)) => (Some(unescape(t)?), unescape(s)?),
            None => (None, unescape(display)?),
        };
        if subject.is_empty() {
            return None;
        }
        Some(IdentityName { tenant, subject })
    }
}

impl std::fmt::Display for IdentityName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.display())
    }
}

fn needs_escape(c: char) -> bool {
    c == '%' || c == '/' || c.is_control()
}

fn escape_into(out: &mut String, part: &str) {
    for c in part.chars() {
        if needs_escape(c) {
            let mut buf = [0u8; 4];
            for b in c.encode_utf8(&mut buf).bytes() {
                let _ = write!(out, "%{b:02X}");
            }
        } else {
            out.push(c);
        }
    }
}

fn unescape(part: &str) -> Option<String> {
    let bytes = part.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = part.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else if bytes[i] == b'/' {
            return None;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    let s = String::from_utf8(out).ok()?;
    // Only the canonical escaping round-trips: `%61` for `a` would name the
    // same person twice.
    let mut again = String::new();
    escape_into(&mut again, &s);
    (again == part).then_some(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slash_in_the_subject_is_not_a_tenant() {
        let qualified = IdentityName::new(Some("acme"), "alice");
        let bare = IdentityName::new(None, "acme/alice");
        assert_eq!(qualified.display(), "acme/alice");
        assert_eq!(bare.display(), "acme%2Falice");
        assert_ne!(qualified.key(), bare.key());
        let split = IdentityName::new(Some("acme%2F"), "alice");
        assert_eq!(split.display(), "acme%252F/alice");
        assert_ne!(split.key(), qualified.key());
    }

    #[test]
    fn names_round_trip() {
        for (t, s) in [
            (None, "alice"),
            (Some("acme"), "alice"),
            (None, "a/b/c"),
            (Some("t/1"), "%41"),
            (Some(""), "bob"),
            (None, "line\nbreak"),
            (Some("ünï"), "cødé"),
        ] {
            let n = IdentityName::new(t, s);
            assert_eq!(IdentityName::parse(&n.display()), Some(n.clone()), "{n}");
        }
    }

    #[test]
    fn non_canonical_text_names_nobody() {
        for bad in ["", "a/b/c", "%", "%4", "%zz", "%61lice", "acme/", "%2f"] {
            assert_eq!(IdentityName::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn config_names_are_unchanged() {
        let n = IdentityName::new(None, "svc-batch_01");
        assert_eq!(n.display(), "svc-batch_01");
        assert_eq!(n.key(), identity_key("svc-batch_01"));
    }
}
