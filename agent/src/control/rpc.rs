//! The `portcullis.v1.Control` service: every call is authenticated from
//! its transport, authorised by role, rate-limited per caller, run, and
//! audited as a `ControlCall` (who, which call, arguments without secrets,
//! the outcome).

use std::{net::IpAddr, pin::Pin, sync::Arc, time::Instant};

use dashmap::DashMap;
use portcullis_proto::v1::{self, control_server::Control, event::Body};
use tokio::sync::mpsc;
use tokio_stream::{Stream, wrappers::ReceiverStream};
use tonic::{Request, Response, Status, transport::server::UdsConnectInfo};

use super::{
    Node,
    auth::{self, CallLimiter, Caller},
    budgets, listing, revoke,
    usage::{self, SeenReports},
    watch,
};
use crate::{
    config::{Config, Role, ServiceMode, ServiceSpec},
    daemon::services::ApplyError,
    daemon::{
        knock_service::{KnockRefusal, Refused},
        origin_word,
    },
    loader::{clock, maps::TableFill},
    policy::PolicySet,
};

/// One authorised call in progress.
struct Call {
    caller: String,
    role: Role,
    roles: Vec<Role>,
    method: &'static str,
    request: String,
}

pub struct ControlApi {
    node: Arc<Node>,
    limiter: CallLimiter,
    /// Calls refused for rate per caller: the audit trail gets the 1st,
    /// 2nd, 4th, 8th... so a flood cannot flood the trail too.
    rate_refused: DashMap<String, u64>,
    /// `ReportUsage` ids already charged, so retries are not.
    seen_reports: Arc<SeenReports>,
}

impl ControlApi {
    pub fn new(node: Arc<Node>) -> ControlApi {
        let c = &node.cfg().control;
        ControlApi {
            limiter: CallLimiter::new(c.calls_per_sec, c.calls_burst),
            rate_refused: DashMap::new(),
            seen_reports: Arc::default(),
            node,
        }
    }

    /// Who called, from the transport: a Unix socket's peer credentials,
    /// or the subject of the client certificate the TLS handshake verified
    /// against `control.client_ca`.
    fn caller<T>(req: &Request<T>) -> Option<Caller> {
        if let Some(info) = req.extensions().get::<UdsConnectInfo>() {
            let cred = info.peer_cred?;
            return Some(Caller::Unix {
                uid: cred.uid(),
                gid: cred.gid(),
                pid: cred.pid(),
            });
        }
        let certs = req.peer_certs()?;
        let leaf = certs.first()?;
        let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
        Some(Caller::Cert {
            subject: cert.subject().to_string(),
        })
    }

    /// Authenticates and authorises `method` before anything runs.
    fn begin<T>(
        &self,
        req: &Request<T>,
        method: &'static str,
        request: String,
    ) -> Result<Call, Status> {
        let Some(caller) = Self::caller(req) else {
            self.audit("unknown", "", method, &request, false, "unauthenticated");
            return Err(Status::unauthenticated(
                "no peer identity on this connection: call over the control socket, or over TLS with a client certificate",
            ));
        };
        let name = caller.name();
        let roles = caller.roles(&self.node.cfg().control);
        let Some(role) = auth::authorise(method, &roles) else {
            let need: Vec<&str> = auth::allowed(method).iter().map(|r| r.as_str()).collect();
            let has: Vec<&str> = roles.iter().map(|r| r.as_str()).collect();
            let why = format!(
                "{method} needs one of the roles {}; {name} has {}; grant it in [control] (viewers, admitters, operators)",
                need.join(", "),
                if has.is_empty() {
                    "none".to_string()
                } else {
                    has.join(", ")
                }
            );
            self.audit(
                &name,
                "",
                method,
                &request,
                false,
                &format!("permission denied: {why}"),
            );
            return Err(Status::permission_denied(why));
        };
        if !self.limiter.take(&name, Instant::now()) {
            let n = {
                let mut e = self.rate_refused.entry(name.clone()).or_insert(0);
                *e += 1;
                *e
            };
            if n.is_power_of_two() {
                self.audit(
                    &name,
                    role.as_str(),
                    method,
                    &request,
                    false,
                    &format!("rate limited ({n} calls refused for rate so far)"),
                );
            }
            return Err(Status::resource_exhausted(format!(
                "{name}: over control.calls_per_sec ({} per second, burst {}); slow down and retry",
                self.node.cfg().control.calls_per_sec,
                self.node.cfg().control.calls_burst
            )));
        }
        Ok(Call {
            caller: name,
            role,
            roles,
            method,
            request,
        })
    }

    /// Audits the call's outcome and hands the result back.
    fn end<R>(&self, call: Call, result: Result<R, Status>) -> Result<Response<R>, Status> {
        let outcome = match &result {
            Ok(_) => "ok".to_string(),
            Err(s) => format!("{:?}: {}", s.code(), s.message()),
        };
        self.audit(
            &call.caller,
            call.role.as_str(),
            call.method,
            &call.request,
            true,
            &outcome,
        );
        result.map(Response::new)
    }

    fn audit(
        &self,
        caller: &str,
        role: &str,
        method: &str,
        request: &str,
        allowed: bool,
        outcome: &str,
    ) {
        let ev = v1::ControlCall {
            caller: caller.to_string(),
            role: role.to_string(),
            method: method.to_string(),
            request: request.to_string(),
            allowed,
            outcome: outcome.to_string(),
        };
        if let Err(e) = self.node.auditor.record(Body::ControlCall(ev)) {
            tracing::error!(event = "audit_failed", error = %e, method, caller, "control call not audited");
        }
        if allowed {
            tracing::info!(
                event = "control_call",
                caller,
                method,
                request,
                outcome,
                "control call"
            );
        } else {
            tracing::warn!(
                event = "control_call_refused",
                caller,
                method,
                request,
                outcome,
                "control call refused"
            );
        }
    }

    fn policy_set(&self) -> Arc<PolicySet> {
        match &self.node.knocks {
            Some(k) => k.service.admitter().policies().current(),
            None => Arc::new(PolicySet::default_set()),
        }
    }

    fn status(&self, call: &Call) -> Result<v1::StatusReply, Status> {
        let n = &self.node;
        let (tables, admissions, flows) = n
            .enforcer
            .observe(|m| -> Result<_, crate::loader::KernelError> {
                let flows = m.flow_count() as u32;
                Ok((
                    m.occupancy(Some(flows))?,
                    m.admissions().len() as u32,
                    flows,
                ))
            })
            .map_err(|e| Status::internal(format!("kernel maps: {e}")))?;
        let a = n.auditor.stats();
        Ok(v1::StatusReply {
            version: env!("CARGO_PKG_VERSION").to_string(),
            node_id: n.cfg().agent.node_id.clone(),
            origin: origin_word(n.origin).to_string(),
            interfaces: n.cfg().kernel.interfaces.clone(),
            attach_mode: format!("{:?}", n.cfg().kernel.xdp_mode).to_lowercase(),
            policy_version: self.policy_set().version().to_string(),
            tables: tables.iter().map(table_fill).collect(),
            spool_events: a.sealed_seq.saturating_sub(a.acked_seq),
            spool_bytes: a.spool_bytes,
            sealed_seq: a.sealed_seq,
            acked_seq: a.acked_seq,
            collector_lag_secs: n
                .findings
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .collector_lag_secs,
            pin_durability: n.pin_durability.clone(),
            live_admissions: admissions,
            live_flows: flows,
            shadow_services: n
                .cfg()
                .services
                .iter()
                .filter(|s| n.enforcer.mode(s.id) == ServiceMode::Shadow)
                .map(|s| s.name.clone())
                .collect(),
            caller: call.caller.clone(),
            roles: call.roles.iter().map(|r| r.as_str().to_string()).collect(),
        })
    }

    fn names(&self) -> Result<listing::Names, Status> {
        let identities = self
            .node
            .enforcer
            .observe(|m| m.live_identities())
            .map_err(|e| Status::internal(format!("kernel maps: {e}")))?
            .into_iter()
            .map(|(slot, _, name)| (slot, name))
            .collect();
        let services = self
            .node
            .cfg()
            .services
            .iter()
            .map(|s| (s.id, s.name.clone()))
            .collect();
        Ok(listing::Names {
            identities,
            services,
        })
    }

    fn stats(&self, req: &v1::StatsRequest) -> Result<v1::StatsReply, Status> {
        let n = &self.node;
        let kernel = |e: crate::loader::KernelError| Status::internal(format!("kernel maps: {e}"));
        let counts = n.enforcer.observe(|m| m.reason_counts()).map_err(kernel)?;
        let count = |offset: u32| -> Vec<v1::ReasonCount> {
            portcullis_common::Reason::ALL
                .iter()
                .map(|r| v1::ReasonCount {
                    reason: r.name().to_string(),
                    packets: counts[(offset + *r as u32) as usize],
                })
                .collect()
        };
        let drops = count(0);
        let shadow_drops = count(portcullis_common::SHADOW_COUNTERS);
        let (refusals, granted) = match &n.knocks {
            Some(k) => (
                k.service
                    .counters()
                    .snapshot()
                    .into_iter()
                    .map(|(reason, packets)| v1::ReasonCount {
                        reason: reason.to_string(),
                        packets,
                    })
                    .collect(),
                k.service
                    .counters()
                    .granted
                    .load(std::sync::atomic::Ordering::Relaxed),
            ),
            None => (Vec::new(), 0),
        };
        let live = n
            .enforcer
            .observe(|m| m.live_identities())
            .map_err(kernel)?;
        if !req.identity.is_empty() && !live.iter().any(|(_, _, name)| *name == req.identity) {
            return Err(Status::not_found(format!(
                "identity {:?} is not in the kernel (never admitted, or reclaimed); `portcullis ctl stats` lists the ones it holds",
                req.identity
            )));
        }
        let mut identities = Vec::new();
        for (slot, _, name) in live {
            if !req.identity.is_empty() && name != req.identity {
                continue;
            }
            let s = n
                .enforcer
                .observe(|m| m.identity_stats(slot))
                .map_err(kernel)?;
            let spend = n.book.identity(&name);
            identities.push(v1::IdentityCounters {
                identity: name,
                connections: s.connections,
                packets_in: s.packets_in,
                bytes_in: s.bytes_in,
                packets_out: s.packets_out,
                bytes_out: s.bytes_out,
                dropped: s.dropped,
                month_micros: spend.month_micros,
                day_micros: spend.day_micros,
            });
        }
        identities.sort_by(|a, b| a.identity.cmp(&b.identity));
        Ok(v1::StatsReply {
            drops,
            shadow_drops,
            refusals,
            granted,
            identities,
            currency: n.cfg().accounting.currency.clone(),
        })
    }

    fn services_reply(&self) -> v1::ServicesReply {
        let services = self
            .node
            .cfg()
            .services
            .iter()
            .map(|s| v1::ServiceInfo {
                name: s.name.clone(),
                protocol: s.protocol.as_str().to_string(),
                port: u32::from(s.port),
                address: s.address.map(|a| a.to_string()).unwrap_or_default(),
                action: s.action.as_str().to_string(),
                mode: self.node.enforcer.mode(s.id).as_str().to_string(),
                model_version: s.model.version.clone(),
            })
            .collect();
        v1::ServicesReply {
            services,
            ..Default::default()
        }
    }

    /// Adds or removes a service: `edit` makes the next configuration from
    /// the one in force; a refusal names the field.
    fn edit_services(
        &self,
        edit: impl FnOnce(&Config) -> Result<Config, crate::config::ConfigError>,
    ) -> Result<v1::ServicesReply, Status> {
        let change = crate::daemon::services::edit(&self.node, "control API", edit).map_err(
            |e| match e {
                ApplyError::Invalid(e) => Status::invalid_argument(e.to_string()),
                ApplyError::Policy(m) => Status::failed_precondition(m),
                ApplyError::Kernel(m) => Status::internal(m),
            },
        )?;
        Ok(v1::ServicesReply {
            admissions_removed: u32::try_from(change.admissions_removed).unwrap_or(u32::MAX),
            flows_removed: u32::try_from(change.flows_removed).unwrap_or(u32::MAX),
            ..self.services_reply()
        })
    }

    /// Switches a service's mode in the kernel. The switch is on the
    /// record as this call's `ControlCall` (and logged with the old mode).
    fn set_mode(&self, m: &v1::SetMode) -> Result<(), Status> {
        let cfg = &self.node.cfg();
        let svc = cfg
            .service(&m.service)
            .ok_or_else(|| listing::unknown_service(cfg, &m.service))?;
        let mode = ServiceMode::parse(&m.mode).ok_or_else(|| {
            Status::invalid_argument(format!(
                "mode {:?} is not a mode; use \"enforce\" or \"shadow\"",
                m.mode
            ))
        })?;
        let was = self
            .node
            .enforcer
            .set_mode(svc.id, mode)
            .map_err(|e| Status::internal(format!("kernel maps: {e}")))?;
        tracing::warn!(
            event = "service_mode",
            service = %svc.name,
            from = was.as_str(),
            to = mode.as_str(),
            "service mode switched"
        );
        Ok(())
    }

    async fn admit(&self, req: &v1::AdmitRequest) -> Result<v1::AdmitReply, Status> {
        let Some(k) = &self.node.knocks else {
            return Err(Status::failed_precondition(
                "this node admits no tokens: its config has no [tokens] section",
            ));
        };
        if req.token.is_empty() {
            return Err(Status::invalid_argument(
                "token is empty; pass the client's bearer token",
            ));
        }
        let source: IpAddr = req.client_address.parse().map_err(|_| {
            Status::invalid_argument(format!(
                "client_address {:?} is not an IP address; give the client's address, e.g. 10.0.0.7",
                req.client_address
            ))
        })?;
        let port = u16::try_from(req.source_port).map_err(|_| {
            Status::invalid_argument(format!(
                "source_port {} is not a port; give 1-65535, or 0 for every port",
                req.source_port
            ))
        })?;
        if self.node.cfg().service(&req.service).is_none() {
            return Err(listing::unknown_service(&self.node.cfg(), &req.service));
        }
        let now = std::time::SystemTime::now();
        match k
            .service
            .admit_rpc(&req.token, &req.service, source, port, now)
            .await
        {
            Ok(g) => {
                tracing::info!(event = "admission_granted", method = "admit_rpc", subject = %g.subject, service = %g.service, source = %g.source, "admitted through the control API");
                Ok(v1::AdmitReply {
                    identity: g.subject,
                    tenant: g.tenant.unwrap_or_default(),
                    service: g.service,
                    source: g.source.to_string(),
                    expires_unix_ms: portcullis_trail::time::unix_ms(g.expires),
                    policies: g.policies,
                    policy_version: g.policy_version,
                })
            }
            Err(r) => Err(refused(&r)),
        }
    }

    fn policy(&self, req: &v1::PolicyRequest) -> Result<v1::PolicyReply, Status> {
        use v1::policy_request::Op;
        match &req.op {
            None | Some(Op::Get(_)) => Ok(policy_reply(&self.policy_set())),
            Some(Op::Validate(files)) => {
                let (policies, schema) = self.candidate(files)?;
                Ok(match self.check_policies(&policies, schema.as_deref()) {
                    Ok(set) => policy_reply(&set),
                    Err(error) => invalid_policy(error),
                })
            }
            Some(Op::Apply(files)) => {
                let Some(k) = &self.node.knocks else {
                    return Err(Status::failed_precondition(
                        "this node admits no tokens (no [tokens] section): no policy decides here",
                    ));
                };
                let given_schema = files.files.keys().any(|n| n.ends_with(".cedarschema"));
                let (policies, schema) = self.candidate(files)?;
                if let Err(error) = self.check_policies(&policies, schema.as_deref()) {
                    // Nothing is written: the set in force stays.
                    return Ok(invalid_policy(error));
                }
                k.apply_policy(&policies, schema.as_deref().filter(|_| given_schema))
                    .map_err(|e| Status::failed_precondition(format!("{e:#}")))?;
                Ok(policy_reply(&self.policy_set()))
            }
        }
    }

    /// The files of a request; without a schema among them, the one the
    /// node's policy directory has (so validation matches what applies).
    fn candidate(&self, files: &v1::PolicyFiles) -> Result<PolicySources, Status> {
        let (policies, mut schema) = policy_files(files)?;
        if schema.is_none()
            && let Some(dir) = &self.node.cfg().policy_dir
            && let Ok(entries) = std::fs::read_dir(dir)
        {
            schema = entries
                .flatten()
                .map(|e| e.path())
                .find(|p| p.extension().is_some_and(|x| x == "cedarschema"))
                .and_then(|p| std::fs::read_to_string(p).ok());
        }
        Ok((policies, schema))
    }

    fn check_policies(
        &self,
        policies: &[(String, String)],
        schema: Option<&str>,
    ) -> Result<PolicySet, String> {
        let cfg = self.node.cfg();
        let known: Vec<&str> = cfg.services.iter().map(|s| s.name.as_str()).collect();
        PolicySet::from_sources(policies, schema)
            .and_then(|set| set.check_services(&known).map(|()| set))
            .map_err(|e| e.to_string())
    }
}

fn policy_reply(set: &PolicySet) -> v1::PolicyReply {
    v1::PolicyReply {
        version: set.version().to_string(),
        policies: u32::try_from(set.len()).unwrap_or(u32::MAX),
        ids: set.ids().map(str::to_string).collect(),
        valid: true,
        error: String::new(),
    }
}

fn invalid_policy(error: String) -> v1::PolicyReply {
    v1::PolicyReply {
        valid: false,
        error,
        ..Default::default()
    }
}

/// Largest set of policy files one `Validate` takes.
const MAX_POLICY_BYTES: usize = 1 << 20;

/// Policy files `(name, text)` and the schema's text, if one was given.
type PolicySources = (Vec<(String, String)>, Option<String>);

/// `*.cedar` files and at most one `*.cedarschema`, bounded in size.
fn policy_files(f: &v1::PolicyFiles) -> Result<PolicySources, Status> {
    let total: usize = f.files.iter().map(|(k, v)| k.len() + v.len()).sum();
    if total > MAX_POLICY_BYTES {
        return Err(Status::invalid_argument(format!(
            "files: {total} bytes is over the {MAX_POLICY_BYTES}-byte limit of one validation"
        )));
    }
    let mut policies = Vec::new();
    let mut schema = None;
    for (name, text) in &f.files {
        if name.contains('/') || name.is_empty() {
            return Err(Status::invalid_argument(format!(
                "files: {name:?} is not a file name"
            )));
        }
        if name.ends_with(".cedarschema") {
            if schema.replace(text.clone()).is_some() {
                return Err(Status::invalid_argument(
                    "files: more than one *.cedarschema",
                ));
            }
        } else if name.ends_with(".cedar") {
            policies.push((name.clone(), text.clone()));
        } else {
            return Err(Status::invalid_argument(format!(
                "files: {name:?} is neither *.cedar nor *.cedarschema"
            )));
        }
    }
    if policies.is_empty() {
        return Err(Status::invalid_argument(
            "files: no *.cedar file to validate",
        ));
    }
    Ok((policies, schema))
}

/// A refused `Admit` as a status: the caller is a trusted gateway, so it
/// learns the reason (a knock's sender never does).
fn refused(r: &Refused) -> Status {
    let msg = format!("{}: {}", r.reason(), r.refusal);
    match &r.refusal {
        KnockRefusal::Denied(crate::admission::refusal::Refusal::UnknownService(_)) => {
            Status::not_found(msg)
        }
        KnockRefusal::Denied(_) => Status::permission_denied(msg),
        KnockRefusal::Kernel(_) => Status::resource_exhausted(msg),
        KnockRefusal::AuditFull | KnockRefusal::AuditFailed(_) => Status::unavailable(msg),
    }
}

fn table_fill(t: &TableFill) -> v1::TableFill {
    v1::TableFill {
        map: t.map.to_string(),
        entries: t.entries,
        capacity: t.capacity,
        knob: t.knob.to_string(),
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<v1::WatchEvent, Status>> + Send>>;

#[tonic::async_trait]
impl Control for ControlApi {
    async fn status(
        &self,
        req: Request<v1::StatusRequest>,
    ) -> Result<Response<v1::StatusReply>, Status> {
        let call = self.begin(&req, "Status", String::new())?;
        let r = self.status(&call);
        self.end(call, r)
    }

    async fn admit(
        &self,
        req: Request<v1::AdmitRequest>,
    ) -> Result<Response<v1::AdmitReply>, Status> {
        let r = req.get_ref();
        // Never the token: it is a bearer credential.
        let summary = format!(
            "service={} client_address={} source_port={}",
            r.service, r.client_address, r.source_port
        );
        let call = self.begin(&req, "Admit", summary)?;
        let result = self.admit(req.get_ref()).await;
        self.end(call, result)
    }

    async fn revoke(
        &self,
        req: Request<v1::RevokeRequest>,
    ) -> Result<Response<v1::RevokeReply>, Status> {
        use v1::revoke_request::Target;
        let r = req.get_ref();
        let summary = match &r.target {
            Some(Target::Identity(i)) => format!("identity={}/{}", i.tenant, i.subject),
            // Audited as its hash, like every jti.
            Some(Target::Jti(j)) => format!(
                "jti_sha256={}",
                portcullis_trail::hex::hex(&crate::admission::jwk::sha256(j.as_bytes()))
            ),
            Some(Target::Source(s)) => format!("source={s}"),
            Some(Target::Tenant(t)) => format!("tenant={t}"),
            Some(Target::Service(s)) => format!("service={s}"),
            None => "no target".to_string(),
        };
        let call = self.begin(&req, "Revoke", summary)?;
        let result = match &req.get_ref().target {
            None => Err(Status::invalid_argument(
                "target is missing; name an identity, jti, source, tenant or service",
            )),
            Some(t) => revoke::revoke(&self.node, t, &req.get_ref().reason),
        };
        self.end(call, result)
    }

    async fn list_admissions(
        &self,
        req: Request<v1::ListAdmissionsRequest>,
    ) -> Result<Response<v1::ListAdmissionsReply>, Status> {
        let r = req.get_ref();
        let summary = format!(
            "identity={} service={} source={} page_size={}",
            r.identity, r.service, r.source, r.page_size
        );
        let call = self.begin(&req, "ListAdmissions", summary)?;
        let result = (|| {
            let r = req.get_ref();
            let cfg = &self.node.cfg();
            let filter = listing::Filter::parse(cfg, &r.identity, &r.service, &r.source)?;
            let size = listing::page_size(r.page_size, cfg.control.max_page_size)?;
            let names = self.names()?;
            let rows = self.node.enforcer.observe(|m| m.admissions());
            let rows = listing::admissions(rows, &names, &filter, clock::monotonic_ns());
            let (admissions, next_page_token, total) = listing::page(rows, size, &r.page_token)?;
            Ok(v1::ListAdmissionsReply {
                admissions,
                next_page_token,
                total,
            })
        })();
        self.end(call, result)
    }

    async fn list_flows(
        &self,
        req: Request<v1::ListFlowsRequest>,
    ) -> Result<Response<v1::ListFlowsReply>, Status> {
        let r = req.get_ref();
        let summary = format!(
            "identity={} service={} source={} page_size={}",
            r.identity, r.service, r.source, r.page_size
        );
        let call = self.begin(&req, "ListFlows", summary)?;
        let result = (|| {
            let r = req.get_ref();
            let cfg = &self.node.cfg();
            let filter = listing::Filter::parse(cfg, &r.identity, &r.service, &r.source)?;
            let size = listing::page_size(r.page_size, cfg.control.max_page_size)?;
            let names = self.names()?;
            let rows = self.node.enforcer.observe(|m| m.flows());
            let rows = listing::flows(rows, &names, &filter);
            let (flows, next_page_token, total) = listing::page(rows, size, &r.page_token)?;
            Ok(v1::ListFlowsReply {
                flows,
                next_page_token,
                total,
            })
        })();
        self.end(call, result)
    }

    async fn stats(
        &self,
        req: Request<v1::StatsRequest>,
    ) -> Result<Response<v1::StatsReply>, Status> {
        let summary = format!("identity={}", req.get_ref().identity);
        let call = self.begin(&req, "Stats", summary)?;
        let result = self.stats(req.get_ref());
        self.end(call, result)
    }

    async fn services(
        &self,
        req: Request<v1::ServicesRequest>,
    ) -> Result<Response<v1::ServicesReply>, Status> {
        use v1::services_request::Op;
        let (method, summary) = match &req.get_ref().op {
            None | Some(Op::Get(_)) => ("Services", "get".to_string()),
            Some(Op::SetMode(m)) => (
                "Services.SetMode",
                format!("service={} mode={}", m.service, m.mode),
            ),
            Some(Op::Add(a)) => (
                "Services.Add",
                format!(
                    "name={} protocol={} port={} address={} action={} mode={} price={:?}",
                    a.name, a.protocol, a.port, a.address, a.action, a.mode, a.price
                ),
            ),
            Some(Op::Remove(name)) => ("Services.Remove", format!("name={name}")),
        };
        let call = self.begin(&req, method, summary)?;
        let result = match &req.get_ref().op {
            Some(Op::SetMode(m)) => self.set_mode(m).map(|()| self.services_reply()),
            Some(Op::Add(a)) => self.edit_services(|cfg| cfg.with_service(&service_spec(a))),
            Some(Op::Remove(name)) => {
                let cfg = self.node.cfg();
                if cfg.service(name).is_none() {
                    Err(listing::unknown_service(&cfg, name))
                } else {
                    self.edit_services(|cfg| cfg.without_service(name))
                }
            }
            None | Some(Op::Get(_)) => Ok(self.services_reply()),
        };
        self.end(call, result)
    }

    async fn policy(
        &self,
        req: Request<v1::PolicyRequest>,
    ) -> Result<Response<v1::PolicyReply>, Status> {
        use v1::policy_request::Op;
        let (method, summary) = match &req.get_ref().op {
            None | Some(Op::Get(_)) => ("Policy", "get".to_string()),
            Some(Op::Validate(f)) => (
                "Policy",
                format!("validate files={:?}", f.files.keys().collect::<Vec<_>>()),
            ),
            Some(Op::Apply(f)) => (
                "Policy.Apply",
                format!("apply files={:?}", f.files.keys().collect::<Vec<_>>()),
            ),
        };
        let call = self.begin(&req, method, summary)?;
        let result = self.policy(req.get_ref());
        self.end(call, result)
    }

    async fn report_usage(
        &self,
        req: Request<v1::ReportUsageRequest>,
    ) -> Result<Response<v1::ReportUsageReply>, Status> {
        let r = req.get_ref().clone();
        let who = r
            .identity
            .as_ref()
            .map(|i| format!("{}/{}", i.tenant, i.subject))
            .unwrap_or_default();
        let summary = format!(
            "identity={who} service={} requests={} tokens_in={} tokens_out={} gpu_ms={} report_id={}",
            r.service, r.requests, r.tokens_in, r.tokens_out, r.gpu_ms, r.report_id
        );
        let call = self.begin(&req, "ReportUsage", summary)?;
        // The ledger is written (and synced) before the reply: off the
        // async workers.
        let node = self.node.clone();
        let seen = self.seen_reports.clone();
        let result = tokio::task::spawn_blocking(move || {
            usage::report(&node, &seen, &r, std::time::SystemTime::now())
        })
        .await
        .unwrap_or_else(|e| Err(Status::internal(format!("usage report failed: {e}"))));
        self.end(call, result)
    }

    async fn budget(
        &self,
        req: Request<v1::BudgetRequest>,
    ) -> Result<Response<v1::BudgetReply>, Status> {
        use v1::budget_request::Op;
        let (method, summary) = match &req.get_ref().op {
            Some(Op::Set(s)) => (
                "Budget.Set",
                format!(
                    "name={} identity={} tenant={} service={} period={} amount_micros={} thresholds={}",
                    s.name,
                    s.identity,
                    s.tenant,
                    s.service,
                    s.period,
                    s.amount_micros,
                    s.thresholds
                        .iter()
                        .map(|t| format!("{}:{}", t.percent, t.action))
                        .collect::<Vec<_>>()
                        .join(",")
                ),
            ),
            Some(Op::Remove(n)) => ("Budget.Remove", format!("name={n}")),
            Some(Op::Approve(a)) => (
                "Budget.Approve",
                format!(
                    "identity={} amount_micros={} until_unix_secs={} reason={}",
                    a.identity, a.amount_micros, a.until_unix_secs, a.reason
                ),
            ),
            _ => ("Budget", "list".to_string()),
        };
        let call = self.begin(&req, method, summary)?;
        // Edits write the ledger (synced): off the async workers.
        let node = self.node.clone();
        let r = req.into_inner();
        let caller = call.caller.clone();
        let result = tokio::task::spawn_blocking(move || budgets::budget(&node, &r, &caller))
            .await
            .unwrap_or_else(|e| Err(Status::internal(format!("budget call failed: {e}"))));
        self.end(call, result)
    }

    async fn spend(
        &self,
        req: Request<v1::SpendRequest>,
    ) -> Result<Response<v1::SpendReply>, Status> {
        let summary = format!("by={}", req.get_ref().by);
        let call = self.begin(&req, "Spend", summary)?;
        let result = budgets::spend(&self.node, req.get_ref());
        self.end(call, result)
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        req: Request<v1::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let r = req.get_ref();
        let summary = format!(
            "kinds={:?} identity={} service={}",
            r.kinds, r.identity, r.service
        );
        let call = self.begin(&req, "Watch", summary)?;
        let filter = match watch::Filter::parse(req.get_ref()) {
            Ok(f) => f,
            Err(e) => return self.end(call, Err(e)),
        };
        let buffer = self.node.cfg().control.watch_buffer;
        let (tx, rx) = mpsc::channel(buffer + 1);
        let events = self.node.auditor.subscribe();
        let auditor = self.node.auditor.clone();
        let (caller, role, request) = (call.caller.clone(), call.role, call.request.clone());
        tokio::spawn(async move {
            let why = watch::forward(events, filter, tx, buffer).await;
            // A client cut off for not reading is on the record.
            if why.contains("not reading") || why.contains("behind") {
                let ev = v1::ControlCall {
                    caller,
                    role: role.as_str().to_string(),
                    method: "Watch".to_string(),
                    request,
                    allowed: true,
                    outcome: format!("disconnected: {why}"),
                };
                let _ = auditor.record(Body::ControlCall(ev));
                tracing::warn!(event = "watch_disconnected", reason = %why, "watch client disconnected");
            }
        });
        let stream: WatchStream = Box::pin(ReceiverStream::new(rx));
        self.end(call, Ok(stream))
    }
}

fn service_spec(a: &v1::ServiceSpec) -> ServiceSpec {
    ServiceSpec {
        name: a.name.clone(),
        protocol: a.protocol.clone(),
        port: i64::from(a.port),
        address: a.address.clone(),
        action: a.action.clone(),
        mode: a.mode.clone(),
        tenant: a.tenant.clone(),
        version: a.version.clone(),
        sensitivity: a.sensitivity.clone(),
        cost_tier: a.cost_tier.clone(),
        max_sources_per_identity: (a.max_sources_per_identity != 0)
            .then_some(i64::from(a.max_sources_per_identity)),
        price: a
            .price
            .iter()
            .map(|(k, v)| (k.clone(), i64::try_from(*v).unwrap_or(i64::MAX)))
            .collect(),
    }
}
