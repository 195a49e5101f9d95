//! Who is calling and what they may call: decisions only. The caller comes
//! from the transport (a Unix socket peer's credentials, a TLS client
//! certificate's subject); roles come from `[control]`
//! (`agent/src/config/control.rs`).

use std::time::Instant;

use dashmap::DashMap;

use crate::config::{ControlSection, Grantee, Role};

/// The authenticated peer of one call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// A Unix socket peer (SO_PEERCRED).
    Unix {
        uid: u32,
        gid: u32,
        pid: Option<i32>,
    },
    /// A TLS client, by its certificate's subject (RFC 4514 text).
    Cert { subject: String },
}

impl Caller {
    /// How the audit record and the rate limiter name the caller.
    pub fn name(&self) -> String {
        match self {
            Caller::Unix { uid, gid, .. } => format!("uid:{uid} gid:{gid}"),
            Caller::Cert { subject } => format!("cert:{subject}"),
        }
    }

    /// Every role `cfg` grants this caller, lowest first. The node's root
    /// is always an operator: it can write the pinned maps anyway.
    pub fn roles(&self, cfg: &ControlSection) -> Vec<Role> {
        let mut roles: Vec<Role> = cfg
            .roles
            .iter()
            .filter(|(g, _)| self.is(g))
            .map(|(_, r)| *r)
            .collect();
        if matches!(self, Caller::Unix { uid: 0, .. }) {
            roles.push(Role::Operator);
        }
        roles.sort();
        roles.dedup();
        roles
    }

    fn is(&self, g: &Grantee) -> bool {
        match (self, g) {
            (Caller::Unix { uid, .. }, Grantee::Uid(u)) => uid == u,
            (Caller::Unix { gid, .. }, Grantee::Gid(g)) => gid == g,
            (Caller::Cert { subject }, Grantee::Subject(s)) => same_subject(subject, s),
            _ => false,
        }
    }
}

/// Distinguished names compared as sets of `type=value` attributes: RFC
/// 4514 §2.1 writes RDNs last-first while certificates and tools often
/// print them first-last, and people put spaces after the commas
/// (`CN=gw, O=acme`). Every attribute must match; none may be extra.
fn same_subject(a: &str, b: &str) -> bool {
    let norm = |s: &str| -> Vec<String> {
        let mut v: Vec<String> = s.split(',').map(|p| p.trim().to_string()).collect();
        v.sort();
        v
    };
    norm(a) == norm(b)
}

/// Which roles may make a call. Reads are the viewer's; writes (named apart,
/// such as `Services.SetMode`) and anything not listed here need
/// [`Role::Operator`].
pub fn allowed(method: &str) -> &'static [Role] {
    use Role::*;
    match method {
        "Status" => &[Viewer, Admitter, Operator],
        "ListAdmissions" | "ListFlows" | "Stats" | "Services" | "Policy" | "Watch" | "Budget"
        | "Spend" => &[Viewer, Operator],
        "Admit" | "ReportUsage" => &[Admitter, Operator],
        _ => &[Operator],
    }
}

/// The role that authorises `method` for a caller holding `roles`, if any.
pub fn authorise(method: &str, roles: &[Role]) -> Option<Role> {
    allowed(method)
        .iter()
        .copied()
        .filter(|r| roles.contains(r))
        .min()
}

/// Calls per caller: a token bucket each, shared by every connection of
/// the caller (a caller cannot multiply its rate by opening sockets).
/// Concurrent calls touch only their own caller's entry.
pub struct CallLimiter {
    per_sec: f64,
    burst: f64,
    buckets: DashMap<String, (f64, Instant)>,
}

/// Callers remembered before idle ones are forgotten.
const MAX_CALLERS: usize = 4096;

impl CallLimiter {
    pub fn new(per_sec: u32, burst: u32) -> CallLimiter {
        CallLimiter {
            per_sec: f64::from(per_sec),
            burst: f64::from(burst),
            buckets: DashMap::new(),
        }
    }

    /// Takes one call from `caller`'s bucket; false when it is empty.
    pub fn take(&self, caller: &str, now: Instant) -> bool {
        if self.buckets.len() >= MAX_CALLERS && !self.buckets.contains_key(caller) {
            // Full buckets carry no information: forget them.
            let full = self.burst;
            let rate = self.per_sec;
            self.buckets.retain(|_, (tokens, at)| {
                *tokens + now.duration_since(*at).as_secs_f64() * rate < full
            });
        }
        let mut entry = self
            .buckets
            .entry(caller.to_string())
            .or_insert((self.burst, now));
        let (tokens, at) = entry.value_mut();
        let refill = now.saturating_duration_since(*at).as_secs_f64() * self.per_sec;
        *tokens = (*tokens + refill).min(self.burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn cfg(roles: Vec<(Grantee, Role)>) -> ControlSection {
        ControlSection {
            roles,
            ..ControlSection::default()
        }
    }

    #[test]
    fn roles_come_from_uid_gid_and_subject() {
        let c = cfg(vec![
            (Grantee::Uid(1000), Role::Viewer),
            (Grantee::Gid(50), Role::Admitter),
            (Grantee::Subject("CN=gw,O=acme".into()), Role::Operator),
        ]);
        let unix = |uid, gid| Caller::Unix {
            uid,
            gid,
            pid: None,
        };
        assert_eq!(unix(1000, 1).roles(&c), vec![Role::Viewer]);
        assert_eq!(unix(1000, 50).roles(&c), vec![Role::Viewer, Role::Admitter]);
        assert_eq!(unix(7, 7).roles(&c), Vec::<Role>::new());
        assert_eq!(unix(0, 0).roles(&c), vec![Role::Operator]);
        let cert = |s: &str| Caller::Cert { subject: s.into() };
        assert_eq!(cert("CN=gw, O=acme").roles(&c), vec![Role::Operator]);
        assert_eq!(cert("CN=gw,O=evil").roles(&c), Vec::<Role>::new());
        assert_eq!(cert("O=acme, CN=gw").roles(&c), vec![Role::Operator]);
        assert_eq!(
            cert("CN=gw").roles(&c),
            Vec::<Role>::new(),
            "an attribute short"
        );
        assert_eq!(
            cert("CN=gw,O=acme,OU=x").roles(&c),
            Vec::<Role>::new(),
            "one extra"
        );
        // A certificate never matches uid grants and vice versa.
        assert_eq!(cert("uid:1000").roles(&c), Vec::<Role>::new());
    }

    #[test]
    fn each_call_needs_its_role() {
        use Role::*;
        assert_eq!(authorise("Status", &[Admitter]), Some(Admitter));
        assert_eq!(authorise("Admit", &[Viewer]), None);
        assert_eq!(authorise("Admit", &[Admitter]), Some(Admitter));
        assert_eq!(authorise("Revoke", &[Viewer, Admitter]), None);
        assert_eq!(authorise("Revoke", &[Operator]), Some(Operator));
        assert_eq!(authorise("ListFlows", &[Admitter]), None);
        assert_eq!(authorise("Watch", &[Viewer]), Some(Viewer));
        assert_eq!(authorise("NoSuchCall", &[Viewer, Admitter]), None);
        assert_eq!(authorise("Services", &[Viewer]), Some(Viewer));
        assert_eq!(authorise("Services.SetMode", &[Viewer, Admitter]), None);
        assert_eq!(authorise("Services.SetMode", &[Operator]), Some(Operator));
    }

    #[test]
    fn a_caller_gets_its_burst_then_its_rate() {
        let l = CallLimiter::new(10, 3);
        let t0 = Instant::now();
        assert!((0..3).all(|_| l.take("a", t0)));
        assert!(!l.take("a", t0));
        // Another caller is unaffected.
        assert!(l.take("b", t0));
        // 100 ms at 10/s refills one call.
        assert!(l.take("a", t0 + Duration::from_millis(100)));
        assert!(!l.take("a", t0 + Duration::from_millis(100)));
    }
}
