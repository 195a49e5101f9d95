//! `Watch`: durable audit events streamed to a client as they are written,
//! filtered by kind, identity and service. Each client has a bounded
//! buffer (`control.watch_buffer`); a client that stops reading is cut off
//! with a reason instead of slowing the agent (the auditor never waits for
//! a watcher: `agent/src/audit/auditor.rs` hands each event's bytes over
//! without copying and moves on).

use bytes::Bytes;
use portcullis_proto::v1::{self, event::Body};
use prost::Message;
use tokio::sync::{broadcast, mpsc};
use tonic::Status;

/// `Event.body` field names a client may filter on.
pub const KINDS: [&str; 14] = [
    "lifecycle",
    "admission_granted",
    "admission_denied",
    "revocation",
    "policy_change",
    "drop_summary",
    "cost_report",
    "control_call",
    "checkpoint",
    "gap",
    "spool_pressure",
    "key_set_change",
    "detection",
    "budget",
];

fn kind(b: &Body) -> &'static str {
    match b {
        Body::Lifecycle(_) => KINDS[0],
        Body::AdmissionGranted(_) => KINDS[1],
        Body::AdmissionDenied(_) => KINDS[2],
        Body::Revocation(_) => KINDS[3],
        Body::PolicyChange(_) => KINDS[4],
        Body::DropSummary(_) => KINDS[5],
        Body::CostReport(_) => KINDS[6],
        Body::ControlCall(_) => KINDS[7],
        Body::Checkpoint(_) => KINDS[8],
        Body::Gap(_) => KINDS[9],
        Body::SpoolPressure(_) => KINDS[10],
        Body::KeySetChange(_) => KINDS[11],
        Body::Detection(_) => KINDS[12],
        Body::Budget(_) => KINDS[13],
    }
}

/// Which events a client asked for.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    kinds: Vec<&'static str>,
    identity: String,
    service: String,
}

impl Filter {
    pub fn parse(req: &v1::WatchRequest) -> Result<Filter, Status> {
        let mut kinds = Vec::new();
        for k in &req.kinds {
            match KINDS.iter().find(|known| *known == k) {
                Some(known) => kinds.push(*known),
                None => {
                    return Err(Status::invalid_argument(format!(
                        "kinds: {k:?} is not an event kind; use any of {}",
                        KINDS.join(", ")
                    )));
                }
            }
        }
        Ok(Filter {
            kinds,
            identity: req.identity.clone(),
            service: req.service.clone(),
        })
    }

    /// Whether the event (canonical bytes) passes. An event this agent
    /// cannot decode is passed: a filter must not hide what it cannot read.
    pub fn keeps(&self, event: &[u8]) -> bool {
        if self.kinds.is_empty() && self.identity.is_empty() && self.service.is_empty() {
            return true;
        }
        let Ok(ev) = v1::Event::decode(event) else {
            return true;
        };
        let Some(body) = &ev.body else {
            return self.kinds.is_empty() && self.identity.is_empty() && self.service.is_empty();
        };
        if !self.kinds.is_empty() && !self.kinds.contains(&kind(body)) {
            return false;
        }
        let id = |v: &str| self.identity.is_empty() || self.identity == v;
        let svc = |v: &str| self.service.is_empty() || self.service == v;
        match body {
            Body::AdmissionGranted(g) => {
                (id(&g.identity) || id(&g.identity_name)) && svc(&g.service)
            }
            Body::AdmissionDenied(d) => {
                (id(&d.identity) || id(&d.identity_name)) && svc(&d.service)
            }
            Body::Revocation(r) => {
                (id(&r.target) || r.identities.iter().any(|n| id(n)))
                    && (self.service.is_empty() || (r.target_kind == "service" && svc(&r.target)))
            }
            Body::Detection(d) => self.identity.is_empty() && svc(&d.subject),
            Body::Budget(b) => {
                let keys = || b.key.split('|');
                (self.identity.is_empty()
                    || id(&b.identity)
                    || keys().any(id)
                    || b.scope.contains(&format!("identity={}", self.identity)))
                    && (self.service.is_empty()
                        || keys().any(svc)
                        || b.scope.contains(&format!("service={}", self.service)))
            }
            Body::CostReport(c) => c.lines.iter().any(|l| id(&l.identity) && svc(&l.service)),
            _ => self.identity.is_empty() && self.service.is_empty(),
        }
    }
}

/// Forwards durable events from `events` to a client's buffer of `buffer`
/// events until the client goes away, the agent stops, or the client falls
/// behind. Returns why it ended (for the audit record).
pub async fn forward(
    mut events: broadcast::Receiver<(u64, Bytes)>,
    filter: Filter,
    out: mpsc::Sender<Result<v1::WatchEvent, Status>>,
    buffer: usize,
) -> String {
    loop {
        tokio::select! {
            got = events.recv() => match got {
                Ok((seq, bytes)) => {
                    if !filter.keeps(&bytes) {
                        continue;
                    }
                    // One slot stays free for the reason a client is cut off.
                    if out.capacity() <= 1 {
                        let why = format!(
                            "watch client not reading: {buffer} events queued (control.watch_buffer); disconnected, resume from the collector or reconnect"
                        );
                        let _ = out.try_send(Err(Status::resource_exhausted(why.clone())));
                        return why;
                    }
                    let _ = out.try_send(Ok(v1::WatchEvent { seq, event: bytes }));
                }
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    let why = format!("watch stream fell {n} events behind the audit trail; disconnected, reconnect");
                    let _ = out.try_send(Err(Status::resource_exhausted(why.clone())));
                    return why;
                }
                Err(broadcast::error::RecvError::Closed) => return "the agent is stopping".into(),
            },
            _ = out.closed() => return "client closed the stream".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(body: Body) -> Vec<u8> {
        v1::Event {
            seq: 1,
            body: Some(body),
            ..Default::default()
        }
        .encode_to_vec()
    }

    #[test]
    fn filters_by_kind_identity_and_service() {
        let granted = event(Body::AdmissionGranted(v1::AdmissionGranted {
            identity: "alice".into(),
            identity_name: "acme/alice".into(),
            service: "llm".into(),
            ..Default::default()
        }));
        let gap = event(Body::Gap(v1::Gap::default()));
        let f = |kinds: &[&str], identity: &str, service: &str| {
            Filter::parse(&v1::WatchRequest {
                kinds: kinds.iter().map(|s| s.to_string()).collect(),
                identity: identity.into(),
                service: service.into(),
            })
            .unwrap()
        };
        assert!(f(&[], "", "").keeps(&granted) && f(&[], "", "").keeps(&gap));
        assert!(f(&["admission_granted"], "", "").keeps(&granted));
        assert!(!f(&["admission_granted"], "", "").keeps(&gap));
        assert!(f(&[], "acme/alice", "llm").keeps(&granted));
        assert!(f(&[], "alice", "").keeps(&granted));
        assert!(!f(&[], "bob", "").keeps(&granted));
        assert!(!f(&[], "", "other").keeps(&granted));
        assert!(!f(&[], "alice", "").keeps(&gap));
        let e = Filter::parse(&v1::WatchRequest {
            kinds: vec!["admissions".into()],
            ..Default::default()
        })
        .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
    }

    #[tokio::test]
    async fn a_client_that_does_not_read_is_cut_off_with_a_reason() {
        let (tx, rx) = broadcast::channel(64);
        let (out, mut client) = mpsc::channel(3 + 1);
        let task = tokio::spawn(forward(rx, Filter::default(), out, 3));
        for seq in 1..=10u64 {
            tx.send((seq, Bytes::from_static(b""))).unwrap();
        }
        let why = task.await.unwrap();
        assert!(why.contains("not reading"), "{why}");
        let mut got = Vec::new();
        while let Some(m) = client.recv().await {
            got.push(m);
        }
        assert_eq!(got.len(), 4);
        assert!(got[..3].iter().all(|m| m.is_ok()));
        let last = got[3].as_ref().unwrap_err();
        assert_eq!(last.code(), tonic::Code::ResourceExhausted);
    }
}
