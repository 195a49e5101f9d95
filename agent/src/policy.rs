//! Admission policy: Cedar policies and a Cedar schema, loaded from a
//! directory, validated before use, decided per admission.
//!
//! The model (`examples/policy/README.md` explains it at length):
//!
//! - principal `Portcullis::Identity::"<sub>"` with `subject`, `tenant` (""
//!   when the token has none), `scopes`, `issuer`, and a parent
//!   `Portcullis::Role::"<role>"` per role of the token;
//! - action `Portcullis::Action::"invoke" | "read" | "retrain" |
//!   "export_weights"`: the service's kind;
//! - resource `Portcullis::Model::"<service>"` with `tenant` (owner, ""
//!   when shared), `version`, `sensitivity`, `cost_tier`;
//! - context: `hour`, `weekday` (UTC), `source` (an `ipaddr`), `method`,
//!   `token_age`, `spend_month`, `forecast_month`.
//!
//! Decisions: default deny, a satisfied `forbid` overrides every `permit`,
//! and an evaluation error in any policy that applies denies. A decision
//! names its determining policies and the version of the set that made it.
//! The token's scopes are checked before the policies (by the admitter), so
//! a policy can only narrow what a token grants.
//!
//! Policy ids are the `@id("...")` annotation when present, else
//! `<file>:<index>` (0-based position in the file). `@ttl("SECONDS")` on a
//! permit bounds the admission's lifetime when that permit determines the
//! decision (the minimum over the determining permits).
//!
//! Cost: Cedar rebuilds and evaluates each applicable policy per request
//! (about 1 µs each here), so a set keeps, per (service, action), only the
//! policies whose scope can match; caches the entities per (principal,
//! model); and memoizes decisions on their complete inputs (`cargo xtask
//! bench policy` has the figures).

mod cli;
mod load;
mod memo;
mod store;
#[cfg(test)]
mod tests;

use std::{
    collections::{HashMap, HashSet},
    fmt,
    net::IpAddr,
    path::Path,
    sync::{Arc, PoisonError, RwLock},
    time::{Duration, SystemTime},
};

use cedar_policy::{
    ActionConstraint, Authorizer, Context, Decision as CedarDecision, Entities, Entity, EntityId,
    EntityTypeName, EntityUid, ResourceConstraint, RestrictedExpression, Schema,
};

pub use cli::{scope_grants, test_cli, validate_cli};
use memo::Memo;
pub use store::PolicyStore;

/// The portcullis schema (Cedar schema syntax, namespace `Portcullis`); also
/// shipped as `examples/policy/portcullis.cedarschema`.
pub const DEFAULT_SCHEMA: &str = include_str!("policy/portcullis.cedarschema");

/// The policy in force when the config has no `[policy]`: permit whatever
/// the token's scopes grant (the scope check runs before the policies).
pub const DEFAULT_POLICY: &str = "@id(\"scopes-only\") permit(principal, action, resource);\n";

/// The actions, as `config::Action::as_str` spells them, in the order the
/// engine indexes them.
pub const ACTIONS: [&str; 4] = ["invoke", "read", "retrain", "export_weights"];

/// Cedar namespace of the schema's types.
pub const NAMESPACE: &str = "Portcullis";

/// Distinct (service, action) policy slices kept per set; beyond this a
/// decision evaluates a freshly filtered slice (correct, just slower).
const MAX_SLICES: usize = 4096;

/// How admission was asked for (`context.method`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Method {
    /// A UDP knock (`"knock"`).
    #[default]
    Knock,
    /// The control API's admit call (`"admit_rpc"`).
    AdmitRpc,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Knock => "knock",
            Method::AdmitRpc => "admit_rpc",
        }
    }

    /// Parses `"knock"` or `"admit_rpc"`.
    pub fn parse(s: &str) -> Option<Method> {
        match s {
            "knock" => Some(Method::Knock),
            "admit_rpc" => Some(Method::AdmitRpc),
            _ => None,
        }
    }
}

/// The token's subject as policies see it (`principal`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct Principal {
    /// `sub`: the `Identity` entity id.
    pub subject: String,
    /// The tenant claim; `None` is `""` in policies.
    pub tenant: Option<String>,
    /// `roles`: parents `Role::"..."`.
    pub roles: Vec<String>,
    /// The token's `model:` scopes, as strings (`model:llm:invoke`).
    pub scopes: Vec<String>,
    /// `iss`.
    pub issuer: String,
}

/// The model service as policies see it (`resource`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct Resource {
    /// The service name: the `Model` entity id.
    pub service: String,
    /// Owning tenant, `""` if none.
    pub tenant: String,
    pub version: String,
    pub sensitivity: String,
    pub cost_tier: String,
}

/// One admission to decide.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub principal: Principal,
    /// One of [`ACTIONS`]; anything else is denied with an error.
    pub action: &'static str,
    pub resource: Resource,
    /// The decision time (hour and weekday are taken in UTC).
    pub now: SystemTime,
    /// The client address being admitted.
    pub source: IpAddr,
    pub method: Method,
    /// Time since the token's `iat`.
    pub token_age: Duration,
    /// The identity's spend this month and the month's forecast, in
    /// micro-units (saturated at `i64::MAX` for Cedar).
    pub spend_month: u64,
    pub forecast_month: u64,
    /// The budgets' verdict on this request (`agent/src/budget/verdict.rs`):
    /// the strictest action in force ("" for none, else warn, throttle,
    /// deny) and the deciding budget's forecast in percent of its amount.
    pub budget_action: &'static str,
    pub budget_forecast_percent: u64,
}

/// The outcome of [`PolicySet::decide`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub allow: bool,
    /// The policies that determined the outcome: the satisfied permits of
    /// an allow; the satisfied forbids of a forbid; the erroring policies of
    /// a deny by evaluation error; empty for a default deny.
    pub determining: Vec<String>,
    /// Evaluation errors, `FILE:LINE:COL: message` (any error denies).
    pub errors: Vec<String>,
    /// The smallest `@ttl` of the determining permits (allow only).
    pub ttl: Option<Duration>,
    /// [`PolicySet::version`] of the set that decided.
    pub version: String,
}

/// A problem at a place in a policy or schema file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The file as given (a path for [`PolicySet::from_dir`]).
    pub file: String,
    /// 1-based; 0 when the problem is about the file as a whole.
    pub line: usize,
    /// 1-based, in characters; 0 with `line` 0.
    pub column: usize,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.file, self.message)
        } else {
            write!(
                f,
                "{}:{}:{}: {}",
                self.file, self.line, self.column, self.message
            )
        }
    }
}

struct Problems<'a>(&'a [Problem]);

impl fmt::Display for Problems<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

/// Why a policy set could not be loaded (or checked). `Display` is one
/// `FILE:LINE:COL: reason` line per problem.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// The directory or a file could not be read (or is not UTF-8, or too
    /// large).
    #[error("{path}: {detail}")]
    Io { path: String, detail: String },
    /// Nothing to load: no `*.cedar` files, or they hold no policy.
    #[error("{dir}: no policies: {why}")]
    Empty { dir: String, why: String },
    /// Policy syntax errors (and templates, which are not supported).
    #[error("{}", Problems(.0))]
    Syntax(Vec<Problem>),
    /// The schema does not parse, is not usable, or more than one is given.
    #[error("{}", Problems(.0))]
    Schema(Vec<Problem>),
    /// Policies that violate the schema (unknown entity types, actions or
    /// attributes, type errors), and bad `@id` / `@ttl` annotations.
    #[error("{}", Problems(.0))]
    Invalid(Vec<Problem>),
    /// Policies naming `Model::"x"` for an `x` that is not a configured
    /// service ([`PolicySet::check_services`]).
    #[error("{}", Problems(.0))]
    UnknownService(Vec<Problem>),
}

impl PolicyError {
    /// A stable name for metrics and audit.
    pub fn kind(&self) -> &'static str {
        match self {
            PolicyError::Io { .. } => "io",
            PolicyError::Empty { .. } => "empty",
            PolicyError::Syntax(_) => "syntax",
            PolicyError::Schema(_) => "schema",
            PolicyError::Invalid(_) => "invalid",
            PolicyError::UnknownService(_) => "unknown_service",
        }
    }

    /// The located problems (empty for `Io` and `Empty`).
    pub fn problems(&self) -> &[Problem] {
        match self {
            PolicyError::Syntax(p)
            | PolicyError::Schema(p)
            | PolicyError::Invalid(p)
            | PolicyError::UnknownService(p) => p,
            PolicyError::Io { .. } | PolicyError::Empty { .. } => &[],
        }
    }
}

/// A loaded file: what error locations are computed against.
#[derive(Debug)]
struct FileInfo {
    /// As shown in messages (the path for a directory load).
    display: String,
    text: String,
    /// Byte offset of each line's start.
    line_starts: Vec<usize>,
}

impl FileInfo {
    fn new(display: String, text: String) -> FileInfo {
        let line_starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        FileInfo {
            display,
            text,
            line_starts,
        }
    }

    /// 1-based line and column (in characters) of a byte offset.
    fn locate(&self, offset: usize) -> (usize, usize) {
        let mut offset = offset.min(self.text.len());
        while !self.text.is_char_boundary(offset) {
            offset -= 1;
        }
        let line = self.line_starts.partition_point(|&s| s <= offset);
        let start = self.line_starts[line - 1];
        let column = self.text[start..offset].chars().count() + 1;
        (line, column)
    }

    fn problem(&self, offset: usize, message: impl Into<String>) -> Problem {
        let (line, column) = self.locate(offset);
        Problem {
            file: self.display.clone(),
            line,
            column,
            message: message.into(),
        }
    }

    fn whole(&self, message: impl Into<String>) -> Problem {
        Problem {
            file: self.display.clone(),
            line: 0,
            column: 0,
            message: message.into(),
        }
    }
}

/// One policy of the set.
#[derive(Debug)]
struct Meta {
    id: String,
    /// Index into `PolicySet::files`.
    file: usize,
    /// Byte offset of the policy's first character in its file.
    offset: usize,
    ttl: Option<Duration>,
    /// The context attributes it mentions ([`CONTEXT_ATTRS`] bits).
    context_use: u16,
    policy: cedar_policy::Policy,
}

/// The schema's entity types and actions, resolved once per set.
#[derive(Debug)]
struct Names {
    identity: EntityTypeName,
    role: EntityTypeName,
    model: EntityTypeName,
    /// Per [`ACTIONS`] entry.
    actions: Vec<EntityUid>,
    /// Per [`ACTIONS`] entry: the action groups it is in (schema
    /// `action ... in [...]`).
    action_ancestors: Vec<HashSet<EntityUid>>,
}

/// The policies that can apply to one (service, action).
struct Slice {
    set: Arc<cedar_policy::PolicySet>,
    len: usize,
    /// The context attributes they mention ([`CONTEXT_ATTRS`] bits).
    context_use: u16,
}

type Slices = HashMap<String, [Option<Arc<Slice>>; 4]>;

/// The context attributes, in the order of the `context_use` bits.
const CONTEXT_ATTRS: [&str; 9] = [
    "hour",
    "weekday",
    "source",
    "method",
    "token_age",
    "spend_month",
    "forecast_month",
    "budget_action",
    "budget_forecast_percent",
];

/// Memo tables' sizes (each is emptied when full).
const MAX_DECISIONS: usize = 8_192;
const MAX_ENTITIES: usize = 4_096;
const MAX_SOURCES: usize = 8_192;

/// The context values a decision can depend on (unused ones zeroed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct ContextKey {
    hour: u64,
    weekday: u64,
    source: Option<IpAddr>,
    method: Option<Method>,
    token_age: u64,
    spend_month: u64,
    forecast_month: u64,
    budget_action: &'static str,
    budget_forecast_percent: u64,
}

impl ContextKey {
    fn of(req: &Request, uses: u16) -> Option<ContextKey> {
        let (hour, weekday) = utc_hour_weekday(req.now)?;
        let on = |bit: usize| uses & (1 << bit) != 0;
        let pick = |bit: usize, v: u64| if on(bit) { v } else { 0 };
        Some(ContextKey {
            hour: pick(0, hour),
            weekday: pick(1, weekday),
            source: on(2).then(|| req.source.to_canonical()),
            method: on(3).then_some(req.method),
            token_age: pick(4, req.token_age.as_secs()),
            spend_month: pick(5, req.spend_month),
            forecast_month: pick(6, req.forecast_month),
            budget_action: if on(7) { req.budget_action } else { "" },
            budget_forecast_percent: pick(8, req.budget_forecast_percent),
        })
    }
}

/// A decision's inputs, borrowed (to look up) ...
#[derive(Hash)]
struct InputsRef<'a> {
    principal: &'a Principal,
    resource: &'a Resource,
    action: usize,
    ctx: ContextKey,
}

/// ... and owned (stored).
struct Inputs {
    principal: Principal,
    resource: Resource,
    action: usize,
    ctx: ContextKey,
}

impl InputsRef<'_> {
    fn to_owned(&self) -> Inputs {
        Inputs {
            principal: self.principal.clone(),
            resource: self.resource.clone(),
            action: self.action,
            ctx: self.ctx,
        }
    }
}

impl Inputs {
    fn matches(&self, r: &InputsRef<'_>) -> bool {
        self.action == r.action
            && self.ctx == r.ctx
            && &self.principal == r.principal
            && &self.resource == r.resource
    }
}

/// A validated set of policies: what decides admissions. Share it in an
/// `Arc` ([`PolicyStore::current`]).
pub struct PolicySet {
    cedar: Arc<cedar_policy::PolicySet>,
    policies: Vec<Meta>,
    by_id: HashMap<String, usize>,
    files: Vec<FileInfo>,
    /// Where the schema came from (a file, or "built-in").
    schema_origin: String,
    names: Names,
    /// Action entities (groups) from the schema.
    action_entities: Vec<Entity>,
    authorizer: Authorizer,
    /// Per (service, action): the policies whose scope can match.
    slices: RwLock<Slices>,
    decisions: Memo<Inputs, Decision>,
    entities: Memo<(Principal, Resource), Arc<Entities>>,
    sources: Memo<IpAddr, RestrictedExpression>,
    version: String,
    warnings: Vec<String>,
}

impl fmt::Debug for PolicySet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PolicySet")
            .field("version", &self.version)
            .field("policies", &self.len())
            .field("schema", &self.schema_origin)
            .finish_non_exhaustive()
    }
}

impl PolicySet {
    /// Loads `dir`: every `*.cedar` file (sorted by name) and at most one
    /// `*.cedarschema` (else [`DEFAULT_SCHEMA`]); validates the policies
    /// against the schema. No policies at all is an error.
    pub fn from_dir(dir: &Path) -> Result<PolicySet, PolicyError> {
        let files = load::read_dir(dir)?;
        load::build(files, &dir.display().to_string())
    }

    /// Loads policies from `(name, text)` pairs (sorted by name) with the
    /// given schema text (else [`DEFAULT_SCHEMA`]).
    pub fn from_sources(
        files: &[(String, String)],
        schema: Option<&str>,
    ) -> Result<PolicySet, PolicyError> {
        let mut input = load::Input {
            policies: files
                .iter()
                .map(|(name, text)| load::Source {
                    name: name.clone(),
                    display: name.clone(),
                    text: text.clone(),
                })
                .collect(),
            schema: schema.map(|text| load::Source {
                name: "schema.cedarschema".into(),
                display: "schema.cedarschema".into(),
                text: text.to_owned(),
            }),
        };
        input.policies.sort_by(|a, b| a.name.cmp(&b.name));
        load::build(input, "<sources>")
    }

    /// [`DEFAULT_POLICY`] with [`DEFAULT_SCHEMA`] (both constants; a unit
    /// test loads them, so this cannot fail).
    pub fn default_set() -> PolicySet {
        PolicySet::from_sources(&[("default.cedar".into(), DEFAULT_POLICY.into())], None)
            .expect("the built-in policy loads")
    }

    /// First 16 hex digits of the SHA-256 of the set's files (sorted names
    /// and contents, the schema included).
    pub fn version(&self) -> &str {
        &self.version
    }

    /// Number of policies.
    pub fn len(&self) -> usize {
        self.policies.len()
    }

    /// Never true for a loaded set (empty sets are refused).
    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }

    /// The policy ids, in file order.
    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.policies.iter().map(|m| m.id.as_str())
    }

    /// Validator warnings (e.g. a policy that can never apply), located.
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// Where the schema came from: its file, or `built-in`.
    pub fn schema_origin(&self) -> &str {
        &self.schema_origin
    }

    /// `FILE:LINE:COL` of a policy.
    pub fn location(&self, id: &str) -> Option<String> {
        let m = &self.policies[*self.by_id.get(id)?];
        let f = &self.files[m.file];
        let (line, col) = f.locate(m.offset);
        Some(format!("{}:{line}:{col}", f.display))
    }

    /// Policies naming `Model::"x"` for an `x` not in `known` (the configured
    /// service names): one located problem per such reference.
    pub fn check_services(&self, known: &[&str]) -> Result<(), PolicyError> {
        let mut problems = Vec::new();
        for m in &self.policies {
            let mut seen = HashSet::new();
            for uid in m.policy.entity_literals() {
                if uid.type_name() != &self.names.model {
                    continue;
                }
                let name = uid.id().unescaped();
                if known.contains(&name) || !seen.insert(name.to_owned()) {
                    continue;
                }
                let file = &self.files[m.file];
                let offset = load::find_literal(file, m, name);
                let mut sorted: Vec<&str> = known.to_vec();
                sorted.sort_unstable();
                problems.push(file.problem(
                    offset,
                    format!(
                        "policy `{}` names {uid}, which is not a configured service (services: {})",
                        m.id,
                        if sorted.is_empty() {
                            "none".into()
                        } else {
                            sorted.join(", ")
                        }
                    ),
                ));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(PolicyError::UnknownService(problems))
        }
    }

    /// Decides one admission. Never panics; anything that cannot be
    /// evaluated denies with an error.
    ///
    /// Only the policies whose action and resource scope can match are
    /// evaluated (cached per service and action). Decisions are memoized per
    /// set on their complete inputs: the principal, the resource, the action
    /// and the context attributes that those policies mention (a set that
    /// never mentions `context.token_age` decides a repeated knock once, not
    /// once a second); Cedar is deterministic, so a memoized decision is the
    /// decision.
    pub fn decide(&self, req: &Request) -> Decision {
        let Some(action) = ACTIONS.iter().position(|a| *a == req.action) else {
            return self.unknown_action(req.action);
        };
        let slice = self.slice(action, &req.resource.service);
        if slice.len == 0 {
            return self.deny(Vec::new(), Vec::new());
        }
        let Some(ctx) = ContextKey::of(req, slice.context_use) else {
            return self.deny(Vec::new(), vec!["the clock is before 1970".into()]);
        };
        let probe = InputsRef {
            principal: &req.principal,
            resource: &req.resource,
            action,
            ctx,
        };
        let hash = self.decisions.hash(&probe);
        if let Some(d) = self.decisions.get(hash, |k: &Inputs| k.matches(&probe)) {
            return d;
        }
        let decision = match self.cedar_request(req, action, None) {
            Ok((request, entities)) => self.evaluate(&request, &slice.set, &entities),
            Err(e) => return self.deny(Vec::new(), vec![e]),
        };
        self.decisions
            .insert(hash, probe.to_owned(), decision.clone());
        decision
    }

    /// [`PolicySet::decide`] without the decision memo: always runs the
    /// Cedar authorizer (benchmarks, and tests that the memo is faithful).
    #[doc(hidden)]
    pub fn decide_fresh(&self, req: &Request) -> Decision {
        let Some(action) = ACTIONS.iter().position(|a| *a == req.action) else {
            return self.unknown_action(req.action);
        };
        let slice = self.slice(action, &req.resource.service);
        if slice.len == 0 {
            return self.deny(Vec::new(), Vec::new());
        }
        match self.cedar_request(req, action, None) {
            Ok((request, entities)) => self.evaluate(&request, &slice.set, &entities),
            Err(e) => self.deny(Vec::new(), vec![e]),
        }
    }

    fn unknown_action(&self, action: &str) -> Decision {
        self.deny(
            Vec::new(),
            vec![format!(
                "unknown action {action:?} (expected one of {})",
                ACTIONS.join(", ")
            )],
        )
    }

    fn deny(&self, determining: Vec<String>, errors: Vec<String>) -> Decision {
        Decision {
            allow: false,
            determining,
            errors,
            ttl: None,
            version: self.version.clone(),
        }
    }

    /// Runs the Cedar authorizer and applies portcullis' rules: an
    /// evaluation error denies; the TTL is the smallest `@ttl` of the
    /// determining permits.
    fn evaluate(
        &self,
        request: &cedar_policy::Request,
        policies: &cedar_policy::PolicySet,
        entities: &Entities,
    ) -> Decision {
        let response = self.authorizer.is_authorized(request, policies, entities);
        let diagnostics = response.diagnostics();
        let mut errored: Vec<usize> = Vec::new();
        let mut errors = Vec::new();
        for e in diagnostics.errors() {
            let cedar_policy::AuthorizationError::PolicyEvaluationError(pe) = e;
            let at = self.by_id.get(id_str(pe.policy_id())).copied();
            errors.push(self.describe_eval_error(at, e));
            if let Some(i) = at {
                errored.push(i);
            }
        }
        let mut reasons: Vec<usize> = diagnostics
            .reason()
            .filter_map(|id| self.by_id.get(id_str(id)).copied())
            .collect();
        reasons.sort_unstable();
        let ids = |v: &[usize]| -> Vec<String> {
            v.iter().map(|&i| self.policies[i].id.clone()).collect()
        };
        match response.decision() {
            CedarDecision::Allow if errors.is_empty() => Decision {
                allow: true,
                determining: ids(&reasons),
                errors,
                ttl: reasons.iter().filter_map(|&i| self.policies[i].ttl).min(),
                version: self.version.clone(),
            },
            CedarDecision::Deny if !reasons.is_empty() => self.deny(ids(&reasons), errors),
            _ => {
                errored.sort_unstable();
                errored.dedup();
                self.deny(ids(&errored), errors)
            }
        }
    }

    /// The policies that can apply to `action` on `service` (scope filter),
    /// cached per pair.
    fn slice(&self, action: usize, service: &str) -> Arc<Slice> {
        if let Some(s) = self
            .slices
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(service)
            .and_then(|per| per[action].clone())
        {
            return s;
        }
        let resource =
            EntityUid::from_type_name_and_id(self.names.model.clone(), EntityId::new(service));
        let chosen: Vec<&Meta> = self
            .policies
            .iter()
            .filter(|m| self.may_apply(m, action, &resource))
            .collect();
        let set =
            match cedar_policy::PolicySet::from_policies(chosen.iter().map(|m| m.policy.clone())) {
                Ok(s) => Arc::new(s),
                // Cannot happen (ids are unique); the whole set is always right.
                Err(_) => self.cedar.clone(),
            };
        let slice = Arc::new(Slice {
            len: set.num_of_policies(),
            context_use: chosen.iter().fold(0, |acc, m| acc | m.context_use),
            set,
        });
        let mut slices = self.slices.write().unwrap_or_else(PoisonError::into_inner);
        if slices.len() < MAX_SLICES || slices.contains_key(service) {
            slices.entry(service.to_owned()).or_default()[action] = Some(slice.clone());
        }
        slice
    }

    /// Can the policy's scope match this action and resource? (Conservative:
    /// `true` unless its action or resource scope rules the pair out; the
    /// condition is left to Cedar.) A `Model` has no parents, so `resource
    /// in X` holds exactly when `resource == X`.
    fn may_apply(&self, m: &Meta, action: usize, resource: &EntityUid) -> bool {
        let a = &self.names.actions[action];
        let action_ok = match m.policy.action_constraint() {
            ActionConstraint::Any => true,
            ActionConstraint::Eq(uid) => &uid == a,
            ActionConstraint::In(list) => list
                .iter()
                .any(|u| u == a || self.names.action_ancestors[action].contains(u)),
        };
        action_ok
            && match m.policy.resource_constraint() {
                ResourceConstraint::Any => true,
                ResourceConstraint::Is(t) => t == self.names.model,
                ResourceConstraint::Eq(uid) | ResourceConstraint::In(uid) => &uid == resource,
                ResourceConstraint::IsIn(t, uid) => t == self.names.model && &uid == resource,
            }
    }

    /// The Cedar request and entities for `req`. With a `schema`, both are
    /// validated against it and nothing is cached: the load-time check that
    /// the schema describes what this code provides.
    fn cedar_request(
        &self,
        req: &Request,
        action: usize,
        schema: Option<&Schema>,
    ) -> Result<(cedar_policy::Request, Arc<Entities>), String> {
        let n = &self.names;
        let principal_uid = EntityUid::from_type_name_and_id(
            n.identity.clone(),
            EntityId::new(&req.principal.subject),
        );
        let resource_uid =
            EntityUid::from_type_name_and_id(n.model.clone(), EntityId::new(&req.resource.service));
        let entities = match schema {
            Some(_) => Arc::new(self.entities(req, schema)?),
            None => {
                let key = (&req.principal, &req.resource);
                let hash = self.entities.hash(&key);
                match self.entities.get(hash, |(p, r)| (p, r) == key) {
                    Some(e) => e,
                    None => {
                        let e = Arc::new(self.entities(req, None)?);
                        self.entities.insert(
                            hash,
                            (req.principal.clone(), req.resource.clone()),
                            e.clone(),
                        );
                        e
                    }
                }
            }
        };
        let source = req.source.to_canonical();
        let source_expr = match schema {
            Some(_) => RestrictedExpression::new_ip(source.to_string()),
            None => {
                let hash = self.sources.hash(&source);
                match self.sources.get(hash, |s| *s == source) {
                    Some(e) => e,
                    None => {
                        let e = RestrictedExpression::new_ip(source.to_string());
                        self.sources.insert(hash, source, e.clone());
                        e
                    }
                }
            }
        };
        let s = |v: &str| RestrictedExpression::new_string(v.to_owned());
        let long = |v: u64| RestrictedExpression::new_long(i64::try_from(v).unwrap_or(i64::MAX));
        let (hour, weekday) = utc_hour_weekday(req.now).ok_or("the clock is before 1970")?;
        let context = Context::from_pairs([
            ("hour".to_owned(), long(hour)),
            ("weekday".to_owned(), long(weekday)),
            ("source".to_owned(), source_expr),
            ("method".to_owned(), s(req.method.as_str())),
            ("token_age".to_owned(), long(req.token_age.as_secs())),
            ("spend_month".to_owned(), long(req.spend_month)),
            ("forecast_month".to_owned(), long(req.forecast_month)),
            ("budget_action".to_owned(), s(req.budget_action)),
            (
                "budget_forecast_percent".to_owned(),
                long(req.budget_forecast_percent),
            ),
        ])
        .map_err(|e| format!("context: {e}"))?;
        let request = cedar_policy::Request::new(
            principal_uid,
            n.actions[action].clone(),
            resource_uid,
            context,
            schema,
        )
        .map_err(|e| format!("request: {e}"))?;
        Ok((request, entities))
    }

    /// The identity (with its roles as parents) and the model, plus the
    /// schema's action groups when it has any.
    fn entities(&self, req: &Request, schema: Option<&Schema>) -> Result<Entities, String> {
        let n = &self.names;
        let p = &req.principal;
        let s = |v: &str| RestrictedExpression::new_string(v.to_owned());
        let parents: HashSet<EntityUid> = p
            .roles
            .iter()
            .map(|r| EntityUid::from_type_name_and_id(n.role.clone(), EntityId::new(r)))
            .collect();
        let principal = Entity::new(
            EntityUid::from_type_name_and_id(n.identity.clone(), EntityId::new(&p.subject)),
            HashMap::from([
                ("subject".to_owned(), s(&p.subject)),
                ("tenant".to_owned(), s(p.tenant.as_deref().unwrap_or(""))),
                (
                    "scopes".to_owned(),
                    RestrictedExpression::new_set(p.scopes.iter().map(|v| s(v))),
                ),
                ("issuer".to_owned(), s(&p.issuer)),
            ]),
            parents,
        )
        .map_err(|e| format!("principal: {e}"))?;
        let r = &req.resource;
        let resource = Entity::new(
            EntityUid::from_type_name_and_id(n.model.clone(), EntityId::new(&r.service)),
            HashMap::from([
                ("tenant".to_owned(), s(&r.tenant)),
                ("version".to_owned(), s(&r.version)),
                ("sensitivity".to_owned(), s(&r.sensitivity)),
                ("cost_tier".to_owned(), s(&r.cost_tier)),
            ]),
            HashSet::new(),
        )
        .map_err(|e| format!("resource: {e}"))?;
        Entities::from_entities(
            self.action_entities
                .iter()
                .cloned()
                .chain([principal, resource]),
            schema,
        )
        .map_err(|e| format!("entities: {e}"))
    }

    fn describe_eval_error(
        &self,
        at: Option<usize>,
        e: &cedar_policy::AuthorizationError,
    ) -> String {
        let detail = cedar_policy::ffi::DetailedError::from(e);
        let Some(i) = at else {
            return detail.message;
        };
        let m = &self.policies[i];
        let file = &self.files[m.file];
        let offset = detail
            .source_locations
            .first()
            .map_or(m.offset, |l| l.loc.start);
        load::with_help(file.problem(offset, detail.message), detail.help).to_string()
    }
}

fn id_str(id: &cedar_policy::PolicyId) -> &str {
    AsRef::<str>::as_ref(id)
}

/// UTC hour (0-23) and ISO weekday (1 = Monday ... 7 = Sunday).
fn utc_hour_weekday(t: SystemTime) -> Option<(u64, u64)> {
    let secs = t.duration_since(SystemTime::UNIX_EPOCH).ok()?.as_secs();
    let days = secs / 86_400;
    // 1970-01-01 was a Thursday (ISO 4).
    Some(((secs % 86_400) / 3_600, (days + 3) % 7 + 1))
}
