//! Chain verification, shared by the collector and `portcullis audit verify`.
//!
//! A [`ChainVerifier`] follows any number of nodes' chains. Each event is
//! given as the canonical bytes that were received; the verifier hashes those
//! bytes (it never re-encodes), decodes them and checks, per node:
//!
//! - the sequence: `seq = last + 1`; the same `seq` with the same hash again
//!   is a duplicate (de-duplicated, not a finding); the same `seq` with other
//!   bytes is a replay; a `seq` past `last + 1` is a gap; a `seq` that fills
//!   an earlier gap arrives out of order (reorder);
//! - the link: `prev_hash` is the hash of the previous event's bytes;
//! - checkpoints: the Ed25519 signature over
//!   [`chain::checkpoint_message`] by the node key;
//! - the node key: pinned by the operator, or learned from the first
//!   `Lifecycle STARTED` event (trust on first use); a lifecycle event that
//!   publishes another key is a finding;
//! - the clocks: wall time going back while the monotonic clock goes forward
//!   is a clock step (informational, not an error: order is `seq`).
//!
//! `Gap` events from the agent declare seqs it dropped unsent; a gap covered
//! by such a declaration is reported as declared (a warning), distinct from
//! an unexplained gap (an error). The declaration may come before or after
//! the gap is seen: [`NodeState::unexplained_gaps`] always holds the final
//! classification.
//!
//! A chain first seen at `seq > 1` (the verifier never saw what came before)
//! is anchored at that event: its `prev_hash` is taken as given, and an
//! `Anchored` finding says so.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use portcullis_proto::v1::{Event, event::Body, lifecycle::Phase};
use prost::Message as _;

use crate::chain::{self, GENESIS, Head, event_hash};
use crate::hex::hex;

/// How many recent (seq, hash) pairs per node are remembered to tell a
/// duplicate from a replay and to check late (reordered) events.
pub const RECENT_WINDOW: usize = 65_536;

/// What a finding is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FindingKind {
    /// The chain starts past seq 1 here; earlier events were never seen and
    /// this event's `prev_hash` is taken as given.
    Anchored,
    /// Seqs are missing and nothing declared them dropped.
    Gap,
    /// Seqs are missing and a `Gap` event from the agent declares them.
    DeclaredGap,
    /// A seq already seen arrives again with different bytes.
    Replay,
    /// An event fills an earlier gap: it arrived out of order.
    Reorder,
    /// A seq at or below the last one whose bytes are no longer remembered
    /// (before a restart, or past the recent window): treated as a
    /// duplicate, since it cannot be compared.
    Stale,
    /// `prev_hash` is not the hash of the previous event.
    ChainBreak,
    /// A checkpoint's signature does not verify with the node key.
    BadSignature,
    /// A checkpoint could not be checked: no key is known for the node.
    UnverifiedCheckpoint,
    /// A lifecycle event publishes a key other than the pinned one.
    KeyMismatch,
    /// A lifecycle event publishes a key other than the one first seen.
    KeyChanged,
    /// Wall clock went back while the monotonic clock went forward.
    ClockStep,
    /// The event belongs to another node than the stream it came on.
    WrongNode,
    /// The bytes are not an `Event`, or its envelope is invalid.
    Undecodable,
}

impl FindingKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FindingKind::Anchored => "anchored",
            FindingKind::Gap => "gap",
            FindingKind::DeclaredGap => "declared_gap",
            FindingKind::Replay => "replay",
            FindingKind::Reorder => "reorder",
            FindingKind::Stale => "stale",
            FindingKind::ChainBreak => "chain_break",
            FindingKind::BadSignature => "bad_signature",
            FindingKind::UnverifiedCheckpoint => "unverified_checkpoint",
            FindingKind::KeyMismatch => "key_mismatch",
            FindingKind::KeyChanged => "key_changed",
            FindingKind::ClockStep => "clock_step",
            FindingKind::WrongNode => "wrong_node",
            FindingKind::Undecodable => "undecodable",
        }
    }

    pub fn severity(self) -> Severity {
        match self {
            FindingKind::Anchored | FindingKind::ClockStep | FindingKind::Stale => Severity::Info,
            FindingKind::DeclaredGap | FindingKind::UnverifiedCheckpoint => Severity::Warning,
            FindingKind::Gap
            | FindingKind::Replay
            | FindingKind::Reorder
            | FindingKind::ChainBreak
            | FindingKind::BadSignature
            | FindingKind::KeyMismatch
            | FindingKind::KeyChanged
            | FindingKind::WrongNode
            | FindingKind::Undecodable => Severity::Error,
        }
    }
}

impl fmt::Display for FindingKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    Info,
    Warning,
    Error,
}

/// One thing the verifier noticed about one event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    pub kind: FindingKind,
    /// Empty when the bytes did not decode.
    pub node_id: String,
    /// The event's seq (0 when the bytes did not decode).
    pub seq: u64,
    pub message: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} (node {:?}, seq {}): {}",
            self.kind, self.node_id, self.seq, self.message
        )
    }
}

/// What became of an event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Disposition {
    /// Accepted into the chain (possibly with findings).
    New,
    /// The same bytes at the same seq were seen before: skip it.
    Duplicate,
    /// Not accepted (undecodable, another node, a replay): the chain state
    /// did not change.
    Rejected,
}

/// The verifier's answer for one event.
#[derive(Clone, Debug)]
pub struct Verdict {
    pub disposition: Disposition,
    /// The decoded event (absent when undecodable).
    pub event: Option<Event>,
    /// SHA-256 of the bytes given.
    pub hash: [u8; 32],
    pub findings: Vec<Finding>,
}

impl Verdict {
    /// The worst severity among the findings.
    pub fn worst(&self) -> Option<Severity> {
        self.findings.iter().map(|f| f.kind.severity()).max()
    }
}

/// How node keys are trusted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Trust {
    /// Only keys given by the operator; a node without one has no key.
    Pinned,
    /// The operator's key when there is one, else the first key seen.
    Tofu,
}

/// Where a node's chain stands, as far as the verifier has seen it.
#[derive(Clone, Debug)]
pub struct NodeState {
    pub node_id: String,
    /// The first seq accepted (1 unless the chain was anchored later).
    pub first_seq: u64,
    pub last_seq: u64,
    pub last_hash: [u8; 32],
    /// Events accepted (new ones, not duplicates).
    pub events: u64,
    /// The node's checkpoint key and whether the operator pinned it.
    pub key: Option<[u8; 32]>,
    pub key_pinned: bool,
    /// The seq of the last checkpoint whose signature verified.
    pub last_checkpoint: Option<u64>,
    /// Checkpoints whose signature verified.
    pub checkpoints: u64,
    /// Events accepted after the last verified checkpoint: not yet signed.
    pub since_checkpoint: u64,
    /// Missing seq ranges nothing has declared (inclusive).
    pub unexplained_gaps: Vec<(u64, u64)>,
    /// Missing seq ranges a `Gap` event declared (inclusive).
    pub declared_gaps: Vec<(u64, u64)>,
    last_time_ns: i64,
    last_mono_ns: u64,
    /// Declarations from `Gap` events, to classify gaps seen later.
    declarations: Vec<(u64, u64, u64)>,
    recent: BTreeMap<u64, [u8; 32]>,
}

impl NodeState {
    fn new(node_id: &str, key: Option<[u8; 32]>, key_pinned: bool) -> NodeState {
        NodeState {
            node_id: node_id.to_owned(),
            first_seq: 0,
            last_seq: 0,
            last_hash: GENESIS,
            events: 0,
            key,
            key_pinned,
            last_checkpoint: None,
            checkpoints: 0,
            since_checkpoint: 0,
            unexplained_gaps: Vec::new(),
            declared_gaps: Vec::new(),
            last_time_ns: i64::MIN,
            last_mono_ns: 0,
            declarations: Vec::new(),
            recent: BTreeMap::new(),
        }
    }

    pub fn head(&self) -> Head {
        Head {
            seq: self.last_seq,
            hash: self.last_hash,
        }
    }

    fn remember(&mut self, seq: u64, hash: [u8; 32]) {
        self.recent.insert(seq, hash);
        while self.recent.len() > RECENT_WINDOW {
            self.recent.pop_first();
        }
    }

    /// Removes `seq` from the unexplained gaps; true when it was in one.
    fn fill(&mut self, seq: u64) -> bool {
        let Some(i) = self
            .unexplained_gaps
            .iter()
            .position(|&(a, b)| a <= seq && seq <= b)
        else {
            return false;
        };
        let (a, b) = self.unexplained_gaps.remove(i);
        if a < seq {
            self.unexplained_gaps.push((a, seq - 1));
        }
        if seq < b {
            self.unexplained_gaps.push((seq + 1, b));
        }
        self.unexplained_gaps.sort_unstable();
        true
    }

    /// The declaration (gap event seq) covering all of `a..=b`, if any.
    fn declared(&self, a: u64, b: u64) -> Option<u64> {
        self.declarations
            .iter()
            .find(|&&(first, last, _)| first <= a && b <= last)
            .map(|&(_, _, at)| at)
    }
}

/// Follows the chains of any number of nodes.
#[derive(Debug)]
pub struct ChainVerifier {
    trust: Trust,
    pinned: HashMap<String, [u8; 32]>,
    nodes: HashMap<String, NodeState>,
}

/// The node id rule (the same as `agent.node_id`): 1-64 characters from
/// A-Z, a-z, 0-9, '.', '_' and '-'.
pub fn valid_node_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

impl ChainVerifier {
    /// `pinned`: operator-given keys per node id.
    pub fn new(trust: Trust, pinned: HashMap<String, [u8; 32]>) -> ChainVerifier {
        ChainVerifier {
            trust,
            pinned,
            nodes: HashMap::new(),
        }
    }

    pub fn trust(&self) -> Trust {
        self.trust
    }

    /// The operator's key for `node_id`, if pinned.
    pub fn pinned_key(&self, node_id: &str) -> Option<&[u8; 32]> {
        self.pinned.get(node_id)
    }

    fn state(&mut self, node_id: &str) -> &mut NodeState {
        if !self.nodes.contains_key(node_id) {
            let pinned = self.pinned.get(node_id).copied();
            let st = NodeState::new(node_id, pinned, pinned.is_some());
            self.nodes.insert(node_id.to_owned(), st);
        }
        self.nodes.get_mut(node_id).expect("inserted above")
    }

    /// Continues `node_id`'s chain after `head` (a collector restarting from
    /// its persisted state): the next event must be `head.seq + 1` and link
    /// to `head.hash`.
    pub fn resume(&mut self, node_id: &str, head: Head) {
        let st = self.state(node_id);
        if head.seq > 0 {
            st.first_seq = st.first_seq.max(1);
            st.last_seq = head.seq;
            st.last_hash = head.hash;
            st.remember(head.seq, head.hash);
        }
    }

    /// Forgets what was seen of `node_id` (but its pinned key) and continues
    /// after `head`.
    pub fn reset(&mut self, node_id: &str, head: Head) {
        self.nodes.remove(node_id);
        self.resume(node_id, head);
    }

    /// Sets the key a node proved it holds (the collector's handshake).
    /// A pinned key is never replaced.
    pub fn set_key(&mut self, node_id: &str, key: [u8; 32]) {
        let st = self.state(node_id);
        if !st.key_pinned {
            st.key = Some(key);
        }
    }

    pub fn node(&self, node_id: &str) -> Option<&NodeState> {
        self.nodes.get(node_id)
    }

    /// Every node seen, sorted by node id.
    pub fn nodes(&self) -> Vec<&NodeState> {
        let mut v: Vec<_> = self.nodes.values().collect();
        v.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        v
    }

    /// Events of `node_id` not yet covered by a verified checkpoint.
    pub fn unsigned(&self, node_id: &str) -> u64 {
        self.nodes.get(node_id).map_or(0, |s| s.since_checkpoint)
    }

    /// Checks one event of any node.
    pub fn accept(&mut self, bytes: &[u8]) -> Verdict {
        self.accept_inner(None, bytes)
    }

    /// Checks one event that must belong to `node_id` (a collector stream
    /// authenticated as that node); another node's event is rejected.
    pub fn accept_for(&mut self, node_id: &str, bytes: &[u8]) -> Verdict {
        self.accept_inner(Some(node_id), bytes)
    }

    fn accept_inner(&mut self, expected: Option<&str>, bytes: &[u8]) -> Verdict {
        let hash = event_hash(bytes);
        let rejected = |event: Option<Event>, finding: Finding| Verdict {
            disposition: Disposition::Rejected,
            event,
            hash,
            findings: vec![finding],
        };
        let ev = match Event::decode(bytes) {
            Ok(ev) => ev,
            Err(e) => {
                return rejected(
                    None,
                    Finding {
                        kind: FindingKind::Undecodable,
                        node_id: expected.unwrap_or_default().to_owned(),
                        seq: 0,
                        message: format!("not a portcullis.v1.Event: {e}"),
                    },
                );
            }
        };
        let finding = |kind, message: String| Finding {
            kind,
            node_id: ev.node_id.clone(),
            seq: ev.seq,
            message,
        };
        if let Some(want) = expected
            && ev.node_id != want
        {
            let f = finding(
                FindingKind::WrongNode,
                format!(
                    "event of node {:?} on a stream of node {want:?}",
                    ev.node_id
                ),
            );
            return rejected(Some(ev), f);
        }
        if !valid_node_id(&ev.node_id) || ev.seq == 0 || ev.prev_hash.len() != 32 {
            let f = finding(
                FindingKind::Undecodable,
                format!(
                    "invalid envelope (node id {:?}, seq {}, prev_hash of {} bytes)",
                    ev.node_id,
                    ev.seq,
                    ev.prev_hash.len()
                ),
            );
            return rejected(Some(ev), f);
        }
        if ev.body.is_none() {
            let f = finding(FindingKind::Undecodable, "event has no body".into());
            return rejected(Some(ev), f);
        }

        let trust = self.trust;
        let st = self.state(&ev.node_id);
        let mut findings = Vec::new();
        let seq = ev.seq;

        // Sequence and link.
        if st.last_seq > 0 && seq <= st.last_seq {
            match st.recent.get(&seq).copied() {
                Some(h) if h == hash => {
                    return Verdict {
                        disposition: Disposition::Duplicate,
                        event: Some(ev),
                        hash,
                        findings,
                    };
                }
                Some(h) => {
                    let f = finding(
                        FindingKind::Replay,
                        format!(
                            "seq {seq} was already seen with hash {}; these bytes hash to {}",
                            hex(&h),
                            hex(&hash)
                        ),
                    );
                    return rejected(Some(ev), f);
                }
                None if st.fill(seq) => {
                    findings.push(finding(
                        FindingKind::Reorder,
                        format!(
                            "seq {seq} arrives after seq {}: out of order (it fills an earlier gap)",
                            st.last_seq
                        ),
                    ));
                    match st.recent.get(&(seq - 1)) {
                        Some(prev) if prev.as_slice() != ev.prev_hash.as_slice() => {
                            findings.push(finding(
                                FindingKind::ChainBreak,
                                format!(
                                    "prev_hash {} is not the hash of seq {} ({})",
                                    hex(&ev.prev_hash),
                                    seq - 1,
                                    hex(prev)
                                ),
                            ));
                        }
                        _ => {}
                    }
                    st.remember(seq, hash);
                    st.events += 1;
                    // A late event is not covered by a later checkpoint's
                    // chain (that chain went through the bytes received in
                    // order), so it counts as unsigned.
                    st.since_checkpoint += 1;
                    return Verdict {
                        disposition: Disposition::New,
                        event: Some(ev),
                        hash,
                        findings,
                    };
                }
                None => {
                    let f = finding(
                        FindingKind::Stale,
                        format!(
                            "seq {seq} is at or below the last seq {} and its bytes are no longer known: skipped as a duplicate",
                            st.last_seq
                        ),
                    );
                    return Verdict {
                        disposition: Disposition::Duplicate,
                        event: Some(ev),
                        hash,
                        findings: vec![f],
                    };
                }
            }
        }
        if st.last_seq == 0 {
            if seq > 1 {
                findings.push(finding(
                    FindingKind::Anchored,
                    format!(
                        "chain first seen at seq {seq}: anchored here, prev_hash {} taken as given",
                        hex(&ev.prev_hash)
                    ),
                ));
            } else if ev.prev_hash.as_slice() != GENESIS.as_slice() {
                findings.push(finding(
                    FindingKind::ChainBreak,
                    format!(
                        "seq 1 must have an all-zero prev_hash, has {}",
                        hex(&ev.prev_hash)
                    ),
                ));
            }
            st.first_seq = seq;
        } else if seq > st.last_seq + 1 {
            let (a, b) = (st.last_seq + 1, seq - 1);
            match st.declared(a, b) {
                Some(at) => {
                    st.declared_gaps.push((a, b));
                    findings.push(finding(
                        FindingKind::DeclaredGap,
                        format!(
                            "seqs {a}..={b} missing, declared dropped by the gap event at seq {at}"
                        ),
                    ));
                }
                None => {
                    st.unexplained_gaps.push((a, b));
                    findings.push(finding(
                        FindingKind::Gap,
                        format!(
                            "seqs {a}..={b} missing ({} events) after seq {}; prev_hash {} taken as given",
                            b - a + 1,
                            st.last_seq,
                            hex(&ev.prev_hash)
                        ),
                    ));
                }
            }
        } else if ev.prev_hash.as_slice() != st.last_hash.as_slice() {
            findings.push(finding(
                FindingKind::ChainBreak,
                format!(
                    "prev_hash {} is not the hash of seq {} ({})",
                    hex(&ev.prev_hash),
                    st.last_seq,
                    hex(&st.last_hash)
                ),
            ));
        }

        // Clocks (informational).
        if st.last_seq > 0
            && ev.time_unix_ns < st.last_time_ns
            && ev.monotonic_ns >= st.last_mono_ns
        {
            findings.push(finding(
                FindingKind::ClockStep,
                format!(
                    "wall clock went back {} ms while the monotonic clock went forward",
                    (st.last_time_ns - ev.time_unix_ns) / 1_000_000
                ),
            ));
        }

        // The body.
        let mut checkpoint_ok = false;
        match &ev.body {
            Some(Body::Lifecycle(l)) if !l.public_key.is_empty() => {
                match <[u8; 32]>::try_from(l.public_key.as_slice()) {
                    Err(_) => findings.push(finding(
                        FindingKind::KeyMismatch,
                        format!(
                            "lifecycle event publishes a {}-byte key, not an Ed25519 key",
                            l.public_key.len()
                        ),
                    )),
                    Ok(k) => match st.key {
                        Some(have) if have != k && st.key_pinned => findings.push(finding(
                            FindingKind::KeyMismatch,
                            format!(
                                "lifecycle event publishes key {} but the pinned key is {}",
                                chain::key_id(&k),
                                chain::key_id(&have)
                            ),
                        )),
                        Some(have) if have != k => findings.push(finding(
                            FindingKind::KeyChanged,
                            format!(
                                "lifecycle event publishes key {} but the node's key was {} (first seen, kept)",
                                chain::key_id(&k),
                                chain::key_id(&have)
                            ),
                        )),
                        Some(_) => {}
                        None if trust == Trust::Tofu && l.phase == Phase::Started as i32 => {
                            st.key = Some(k);
                        }
                        None => {}
                    },
                }
            }
            Some(Body::Checkpoint(cp)) => match st.key {
                Some(key) => {
                    let msg = chain::checkpoint_message(&ev.node_id, seq, &ev.prev_hash);
                    if chain::verify_signature(&key, &msg, &cp.signature) {
                        checkpoint_ok = true;
                    } else {
                        findings.push(finding(
                            FindingKind::BadSignature,
                            format!(
                                "checkpoint signature does not verify with key {}",
                                chain::key_id(&key)
                            ),
                        ));
                    }
                }
                None => findings.push(finding(
                    FindingKind::UnverifiedCheckpoint,
                    "no key known for the node: checkpoint not checked (pin it with --keys)".into(),
                )),
            },
            Some(Body::Gap(g)) if g.first_seq <= g.last_seq => {
                st.declarations.push((g.first_seq, g.last_seq, seq));
                // Gaps already seen that this declaration covers.
                let (covered, rest): (Vec<_>, Vec<_>) = st
                    .unexplained_gaps
                    .iter()
                    .partition(|&&(a, b)| g.first_seq <= a && b <= g.last_seq);
                st.unexplained_gaps = rest;
                for (a, b) in covered {
                    st.declared_gaps.push((a, b));
                    findings.push(finding(
                        FindingKind::DeclaredGap,
                        format!("this gap event declares seqs {a}..={b}, missing earlier"),
                    ));
                }
            }
            _ => {}
        }

        st.last_seq = seq;
        st.last_hash = hash;
        st.last_time_ns = ev.time_unix_ns;
        st.last_mono_ns = ev.monotonic_ns;
        st.events += 1;
        st.remember(seq, hash);
        if checkpoint_ok {
            st.checkpoints += 1;
            st.last_checkpoint = Some(seq);
            st.since_checkpoint = 0;
        } else {
            st.since_checkpoint += 1;
        }
        Verdict {
            disposition: Disposition::New,
            event: Some(ev),
            hash,
            findings,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use portcullis_proto::v1::{Gap, Lifecycle};

    use super::*;
    use crate::chain::{Sealed, Sealer};
    use crate::node_key::NodeKey;

    fn t(s: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + s)
    }

    fn started(key: &NodeKey) -> Body {
        Body::Lifecycle(Lifecycle {
            phase: Phase::Started as i32,
            agent_version: "0.1.0".into(),
            public_key: key.public_key().to_vec(),
            key_id: chain::key_id(&key.public_key()),
            reason: "start".into(),
            ..Default::default()
        })
    }

    fn gap(a: u64, b: u64) -> Body {
        Body::Gap(Gap {
            first_seq: a,
            last_seq: b,
            reason: "drop_oldest".into(),
        })
    }

    fn filler() -> Body {
        gap(0, 0)
    }

    /// A node's chain: STARTED, `n` fillers, a checkpoint.
    fn chain(key: &NodeKey, n: u64) -> Vec<Sealed> {
        let mut s = Sealer::resume("n1", Head::EMPTY);
        let mut out = vec![s.seal(started(key), t(0), 1)];
        for i in 0..n {
            out.push(s.seal(filler(), t(i + 1), i + 2));
        }
        out.push(s.seal_checkpoint(key, n + 1, t(n + 2), n + 3));
        out
    }

    fn kinds(v: &Verdict) -> Vec<FindingKind> {
        v.findings.iter().map(|f| f.kind).collect()
    }

    fn tofu() -> ChainVerifier {
        ChainVerifier::new(Trust::Tofu, HashMap::new())
    }

    #[test]
    fn clean_chain_has_no_findings_and_is_signed() {
        let key = NodeKey::generate().unwrap();
        let mut v = tofu();
        let c = chain(&key, 3);
        for e in &c[..4] {
            let r = v.accept(&e.bytes);
            assert_eq!(r.disposition, Disposition::New);
            assert!(r.findings.is_empty(), "{:?}", r.findings);
        }
        assert_eq!(v.unsigned("n1"), 4);
        let r = v.accept(&c[4].bytes);
        assert!(r.findings.is_empty(), "{:?}", r.findings);
        let st = v.node("n1").unwrap();
        assert_eq!(
            (st.last_seq, st.last_checkpoint, st.events),
            (5, Some(5), 5)
        );
        assert_eq!(v.unsigned("n1"), 0);
        assert_eq!(st.key, Some(key.public_key()));
    }

    #[test]
    fn duplicate_is_deduped_and_replay_rejected() {
        let key = NodeKey::generate().unwrap();
        let mut v = tofu();
        let c = chain(&key, 2);
        for e in &c {
            v.accept(&e.bytes);
        }
        let r = v.accept(&c[1].bytes);
        assert_eq!(r.disposition, Disposition::Duplicate);
        assert!(r.findings.is_empty());
        // Other bytes at seq 2.
        let mut s = Sealer::resume("n1", Head::of(&c[0].bytes).unwrap());
        let forged = s.seal(gap(7, 7), t(99), 99);
        let r = v.accept(&forged.bytes);
        assert_eq!(r.disposition, Disposition::Rejected);
        assert_eq!(kinds(&r), vec![FindingKind::Replay]);
        assert_eq!(v.node("n1").unwrap().last_seq, 4);
    }

    #[test]
    fn gap_reorder_and_chain_break() {
        let key = NodeKey::generate().unwrap();
        let c = chain(&key, 4); // seqs 1..=6
        let mut v = tofu();
        v.accept(&c[0].bytes);
        v.accept(&c[1].bytes);
        // Skip seq 3.
        let r = v.accept(&c[3].bytes);
        assert_eq!(r.disposition, Disposition::New);
        assert_eq!(kinds(&r), vec![FindingKind::Gap]);
        assert_eq!(v.node("n1").unwrap().unexplained_gaps, vec![(3, 3)]);
        // Seq 3 arrives late: reorder, and it fills the gap.
        let r = v.accept(&c[2].bytes);
        assert_eq!(kinds(&r), vec![FindingKind::Reorder]);
        assert!(v.node("n1").unwrap().unexplained_gaps.is_empty());
        // Edited event at seq 5: its hash differs, so seq 6 does not link.
        let mut edited = Event::decode(c[4].bytes.as_slice()).unwrap();
        edited.time_unix_ns += 1;
        let r = v.accept(&edited.encode_to_vec());
        assert!(r.findings.is_empty());
        let r = v.accept(&c[5].bytes);
        assert_eq!(kinds(&r), vec![FindingKind::ChainBreak]);
    }

    #[test]
    fn bad_checkpoint_signature_and_unknown_key() {
        let key = NodeKey::generate().unwrap();
        let other = NodeKey::generate().unwrap();
        let mut s = Sealer::resume("n1", Head::EMPTY);
        let a = s.seal(started(&key), t(0), 1);
        let cp = s.seal_checkpoint(&other, 1, t(1), 2);
        let mut v = tofu();
        v.accept(&a.bytes);
        let r = v.accept(&cp.bytes);
        assert_eq!(kinds(&r), vec![FindingKind::BadSignature]);
        assert_eq!(v.unsigned("n1"), 2);
        // Without STARTED, pinned mode, no key: unverified.
        let mut s = Sealer::resume("n1", Head::EMPTY);
        s.seal(filler(), t(0), 1);
        let cp = s.seal_checkpoint(&key, 1, t(1), 2);
        let mut v = ChainVerifier::new(Trust::Pinned, HashMap::new());
        let r = v.accept(&cp.bytes);
        assert_eq!(
            kinds(&r),
            vec![FindingKind::Anchored, FindingKind::UnverifiedCheckpoint]
        );
    }

    #[test]
    fn key_mismatch_pinned_and_key_change_tofu() {
        let key = NodeKey::generate().unwrap();
        let other = NodeKey::generate().unwrap();
        let mut s = Sealer::resume("n1", Head::EMPTY);
        let a = s.seal(started(&key), t(0), 1);
        let b = s.seal(started(&other), t(1), 2);
        let cp = s.seal_checkpoint(&key, 2, t(2), 3);

        let pinned = HashMap::from([("n1".to_owned(), other.public_key())]);
        let mut v = ChainVerifier::new(Trust::Pinned, pinned);
        assert_eq!(kinds(&v.accept(&a.bytes)), vec![FindingKind::KeyMismatch]);
        assert!(v.accept(&b.bytes).findings.is_empty());
        // Signed with `key`, not the pinned one.
        assert_eq!(kinds(&v.accept(&cp.bytes)), vec![FindingKind::BadSignature]);

        let mut v = tofu();
        assert!(v.accept(&a.bytes).findings.is_empty());
        assert_eq!(kinds(&v.accept(&b.bytes)), vec![FindingKind::KeyChanged]);
        // The first key stays.
        assert!(v.accept(&cp.bytes).findings.is_empty());
    }

    #[test]
    fn declared_gap_before_or_after() {
        let key = NodeKey::generate().unwrap();
        // A gap event right after the gap it declares: both findings.
        let mut s = Sealer::resume("n1", Head::EMPTY);
        let one = s.seal(started(&key), t(0), 1);
        s.seal(filler(), t(1), 2);
        let g = s.seal(gap(2, 2), t(2), 3);
        let mut v = tofu();
        v.accept(&one.bytes);
        assert_eq!(
            kinds(&v.accept(&g.bytes)),
            vec![FindingKind::Gap, FindingKind::DeclaredGap]
        );
        assert!(v.node("n1").unwrap().unexplained_gaps.is_empty());
        // Declaration after the gap: seq 1, (2..=3 dropped), 4, gap event 5.
        let mut s = Sealer::resume("n1", Head::EMPTY);
        let one = s.seal(started(&key), t(0), 1);
        s.seal(filler(), t(1), 2);
        s.seal(filler(), t(2), 3);
        let four = s.seal(filler(), t(3), 4);
        let five = s.seal(gap(2, 3), t(4), 5);
        let mut v = tofu();
        v.accept(&one.bytes);
        assert_eq!(kinds(&v.accept(&four.bytes)), vec![FindingKind::Gap]);
        assert_eq!(
            kinds(&v.accept(&five.bytes)),
            vec![FindingKind::DeclaredGap]
        );
        let st = v.node("n1").unwrap();
        assert!(st.unexplained_gaps.is_empty());
        assert_eq!(st.declared_gaps, vec![(2, 3)]);
        // Declaration first: seq 1, gap event 2 declaring 3..=4, then 5.
        let mut s = Sealer::resume("n1", Head::EMPTY);
        let one = s.seal(started(&key), t(0), 1);
        let decl = s.seal(gap(3, 4), t(1), 2);
        s.seal(filler(), t(2), 3);
        s.seal(filler(), t(3), 4);
        let five = s.seal(filler(), t(4), 5);
        let mut v = tofu();
        v.accept(&one.bytes);
        v.accept(&decl.bytes);
        assert_eq!(
            kinds(&v.accept(&five.bytes)),
            vec![FindingKind::DeclaredGap]
        );
        assert!(v.node("n1").unwrap().unexplained_gaps.is_empty());
    }

    #[test]
    fn anchored_start_wrong_node_undecodable_and_clock_step() {
        let key = NodeKey::generate().unwrap();
        let c = chain(&key, 3);
        let mut v = tofu();
        let r = v.accept(&c[2].bytes);
        assert_eq!(kinds(&r), vec![FindingKind::Anchored]);
        assert_eq!(v.node("n1").unwrap().first_seq, 3);
        assert!(v.accept(&c[3].bytes).findings.is_empty());

        let r = v.accept_for("n2", &c[4].bytes);
        assert_eq!(r.disposition, Disposition::Rejected);
        assert_eq!(kinds(&r), vec![FindingKind::WrongNode]);

        let r = v.accept(b"\xff\xff\xff garbage");
        assert_eq!(r.disposition, Disposition::Rejected);
        assert_eq!(kinds(&r), vec![FindingKind::Undecodable]);
        assert!(
            v.accept(&Event::default().encode_to_vec()).findings[0].kind
                == FindingKind::Undecodable
        );

        // Wall clock steps back 10 s, monotonic forward.
        let mut s = Sealer::resume("c", Head::EMPTY);
        let a = s.seal(filler(), t(100), 1_000);
        let b = s.seal(filler(), t(90), 2_000);
        let mut v = tofu();
        v.accept(&a.bytes);
        let r = v.accept(&b.bytes);
        assert_eq!(kinds(&r), vec![FindingKind::ClockStep]);
        assert_eq!(r.worst(), Some(Severity::Info));
    }

    #[test]
    fn resume_continues_after_a_persisted_head() {
        let key = NodeKey::generate().unwrap();
        let c = chain(&key, 2);
        let mut v = tofu();
        v.resume("n1", Head::of(&c[1].bytes).unwrap());
        v.set_key("n1", key.public_key());
        assert!(v.accept(&c[2].bytes).findings.is_empty());
        assert!(v.accept(&c[3].bytes).findings.is_empty());
        assert_eq!(v.node("n1").unwrap().last_checkpoint, Some(4));
        assert_eq!(v.accept(&c[1].bytes).disposition, Disposition::Duplicate);
        // Before the resumed head: not remembered, skipped as stale.
        let r = v.accept(&c[0].bytes);
        assert_eq!(r.disposition, Disposition::Duplicate);
        assert_eq!(kinds(&r), vec![FindingKind::Stale]);
    }
}
