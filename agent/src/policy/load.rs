//! Reading, parsing, validating and hashing a policy set's files.

use std::{
    collections::{HashMap, HashSet},
    fs,
    io::Read,
    path::Path,
    str::FromStr,
    sync::{Arc, RwLock},
    time::Duration,
};

use cedar_policy::{
    Authorizer, Effect, EntityId, EntityTypeName, EntityUid, PolicyId, Schema, ValidationMode,
    Validator, ffi::DetailedError,
};

use super::{
    ACTIONS, CONTEXT_ATTRS, DEFAULT_SCHEMA, FileInfo, MAX_DECISIONS, MAX_ENTITIES, MAX_SOURCES,
    Memo, Meta, Method, NAMESPACE, Names, PolicyError, PolicySet, Principal, Problem, Request,
    Resource,
};

/// Largest policy or schema file read.
const MAX_FILE_BYTES: u64 = 4 * 1024 * 1024;
/// Largest `@ttl` accepted: a day (the token's expiry caps it anyway).
const MAX_TTL_SECS: u64 = 86_400;
/// The name the built-in schema is hashed under (no file can have it).
const BUILTIN_SCHEMA_NAME: &str = "\0built-in.cedarschema";

/// One input file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Source {
    /// The bare file name (policy ids, the version hash).
    pub name: String,
    /// As shown in messages.
    pub display: String,
    pub text: String,
}

/// What a set is built from: policy files sorted by name, and the schema.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Input {
    pub policies: Vec<Source>,
    pub schema: Option<Source>,
}

impl Input {
    /// The set's version: SHA-256 over the sorted file names and contents
    /// (the schema included; the built-in one when there is none), first 16
    /// hex digits.
    pub fn version(&self) -> String {
        let builtin = Source {
            name: BUILTIN_SCHEMA_NAME.into(),
            display: String::new(),
            text: DEFAULT_SCHEMA.into(),
        };
        let mut all: Vec<&Source> = self.policies.iter().collect();
        all.push(self.schema.as_ref().unwrap_or(&builtin));
        all.sort_by(|a, b| a.name.cmp(&b.name));
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        for s in all {
            ctx.update(&(s.name.len() as u64).to_le_bytes());
            ctx.update(s.name.as_bytes());
            ctx.update(&(s.text.len() as u64).to_le_bytes());
            ctx.update(s.text.as_bytes());
        }
        ctx.finish()
            .as_ref()
            .iter()
            .take(8)
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

fn io_error(path: &Path, e: impl std::fmt::Display) -> PolicyError {
    PolicyError::Io {
        path: path.display().to_string(),
        detail: e.to_string(),
    }
}

fn read_text(path: &Path) -> Result<String, PolicyError> {
    let file = fs::File::open(path).map_err(|e| io_error(path, e))?;
    let mut bytes = Vec::new();
    file.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| io_error(path, e))?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(io_error(
            path,
            format!("larger than {MAX_FILE_BYTES} bytes"),
        ));
    }
    String::from_utf8(bytes).map_err(|e| {
        io_error(
            path,
            format!("not UTF-8 (byte {})", e.utf8_error().valid_up_to()),
        )
    })
}

/// Reads `*.cedar` (sorted) and `*.cedarschema` from `dir`. Other files and
/// subdirectories are ignored; hidden files (editor swap files) too.
pub(super) fn read_dir(dir: &Path) -> Result<Input, PolicyError> {
    let entries = fs::read_dir(dir).map_err(|e| io_error(dir, e))?;
    let mut policies = Vec::new();
    let mut schemas = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| io_error(dir, e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.starts_with('.') {
            continue;
        }
        let path = entry.path();
        let is_policy = name.ends_with(".cedar");
        let is_schema = name.ends_with(".cedarschema");
        if !(is_policy || is_schema) {
            continue;
        }
        // Follows symlinks (Kubernetes ConfigMaps are symlinks).
        match fs::metadata(&path) {
            Ok(m) if m.is_file() => {}
            Ok(_) => continue,
            Err(e) => return Err(io_error(&path, e)),
        }
        let source = Source {
            name: name.to_owned(),
            display: path.display().to_string(),
            text: read_text(&path)?,
        };
        if is_policy {
            policies.push(source);
        } else {
            schemas.push(source);
        }
    }
    policies.sort_by(|a, b| a.name.cmp(&b.name));
    schemas.sort_by(|a, b| a.name.cmp(&b.name));
    if schemas.len() > 1 {
        return Err(PolicyError::Schema(
            schemas
                .iter()
                .skip(1)
                .map(|s| Problem {
                    file: s.display.clone(),
                    line: 0,
                    column: 0,
                    message: format!(
                        "a second schema (already have {}); keep one *.cedarschema per directory",
                        schemas[0].name
                    ),
                })
                .collect(),
        ));
    }
    Ok(Input {
        policies,
        schema: schemas.pop(),
    })
}

/// A problem with cedar's help appended.
pub(super) fn with_help(mut p: Problem, help: Option<String>) -> Problem {
    if let Some(h) = help.filter(|h| !h.is_empty()) {
        p.message = format!("{} ({h})", p.message);
    }
    p
}

/// A cedar diagnostic as a problem in `file` (at its first label, else at
/// `fallback`, else the whole file).
fn diag_problem(file: &FileInfo, d: DetailedError, fallback: Option<usize>) -> Problem {
    let p = match d.source_locations.first().map(|l| l.loc.start).or(fallback) {
        Some(offset) => file.problem(offset, d.message),
        None => file.whole(d.message),
    };
    with_help(p, d.help)
}

/// The policy's text offset in `text`, searching from `from`.
fn find_from(text: &str, from: usize, needle: &str) -> Option<usize> {
    text.get(from..)?.find(needle).map(|i| i + from)
}

/// Where `Model::"name"` appears in the policy's text (for check_services).
pub(super) fn find_literal(file: &FileInfo, m: &Meta, name: &str) -> usize {
    let text = m.policy.to_cedar().unwrap_or_default();
    let start = m.offset;
    let quoted = format!("{name:?}");
    let rel = text
        .find(&format!("Model::{quoted}"))
        .map(|i| i + "Model::".len())
        .or_else(|| text.find(&quoted));
    match rel {
        Some(i) if file.text.get(start..start + text.len()) == Some(text.as_str()) => start + i,
        _ => start,
    }
}

/// Parses, checks annotations, validates: a usable set or every problem
/// found.
pub(super) fn build(input: Input, dir: &str) -> Result<PolicySet, PolicyError> {
    if input.policies.is_empty() {
        return Err(PolicyError::Empty {
            dir: dir.to_owned(),
            why: "no *.cedar files".into(),
        });
    }
    let version = input.version();
    let (schema, schema_origin, schema_warnings) = parse_schema(input.schema.as_ref())?;

    let files: Vec<FileInfo> = input
        .policies
        .iter()
        .map(|s| FileInfo::new(s.display.clone(), s.text.clone()))
        .collect();
    let mut syntax = Vec::new();
    let mut invalid = Vec::new();
    let mut metas: Vec<Meta> = Vec::new();
    let mut by_id: HashMap<String, usize> = HashMap::new();
    for (fi, (source, file)) in input.policies.iter().zip(&files).enumerate() {
        let parsed = match cedar_policy::PolicySet::from_str(&source.text) {
            Ok(p) => p,
            Err(errs) => {
                for e in errs.iter() {
                    syntax.push(diag_problem(file, DetailedError::from(e), None));
                }
                continue;
            }
        };
        if parsed.num_of_templates() > 0 {
            for t in parsed.templates() {
                let offset = find_from(&file.text, 0, &t.to_cedar());
                syntax.push(match offset {
                    Some(o) => {
                        file.problem(o, "templates (?principal, ?resource) are not supported")
                    }
                    None => file.whole("templates (?principal, ?resource) are not supported"),
                });
            }
            continue;
        }
        // Cedar names them policy0, policy1, ... in file order.
        let mut ordered: Vec<(usize, &cedar_policy::Policy)> = parsed
            .policies()
            .map(|p| {
                let n = super::id_str(p.id())
                    .strip_prefix("policy")
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(usize::MAX);
                (n, p)
            })
            .collect();
        ordered.sort_by_key(|(n, _)| *n);
        let mut cursor = 0;
        for (index, (_, policy)) in ordered.into_iter().enumerate() {
            let text = policy.to_cedar().unwrap_or_default();
            let offset = find_from(&file.text, cursor, &text).unwrap_or(cursor);
            cursor = offset + text.len();
            let id = match policy.annotation("id") {
                Some(id) if id.trim().is_empty() => {
                    invalid.push(file.problem(offset, "@id is empty"));
                    format!("{}:{index}", source.name)
                }
                Some(id) => id.to_owned(),
                None => format!("{}:{index}", source.name),
            };
            let annotation_at =
                |key: &str| find_from(&text, 0, &format!("@{key}")).map_or(offset, |i| offset + i);
            let ttl = match policy.annotation("ttl") {
                None => None,
                Some(v) => match parse_ttl(v, policy.effect()) {
                    Ok(t) => Some(t),
                    Err(why) => {
                        invalid.push(file.problem(annotation_at("ttl"), why));
                        None
                    }
                },
            };
            if let Some(&other) = by_id.get(&id) {
                let o: &Meta = &metas[other];
                let (line, col) = files[o.file].locate(o.offset);
                invalid.push(file.problem(
                    annotation_at("id"),
                    format!(
                        "policy id `{id}` is already used at {}:{line}:{col}",
                        files[o.file].display
                    ),
                ));
                continue;
            }
            by_id.insert(id.clone(), metas.len());
            metas.push(Meta {
                context_use: context_use(policy),
                policy: policy.new_id(PolicyId::new(&id)),
                id,
                file: fi,
                offset,
                ttl,
            });
        }
    }
    if !syntax.is_empty() {
        return Err(PolicyError::Syntax(syntax));
    }
    if metas.is_empty() {
        return Err(PolicyError::Empty {
            dir: dir.to_owned(),
            why: format!(
                "{} contain{} no policy",
                input
                    .policies
                    .iter()
                    .map(|s| s.display.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                if input.policies.len() == 1 { "s" } else { "" }
            ),
        });
    }
    let cedar = cedar_policy::PolicySet::from_policies(metas.iter().map(|m| m.policy.clone()))
        .map_err(|e| {
            PolicyError::Invalid(vec![Problem {
                file: dir.to_owned(),
                line: 0,
                column: 0,
                message: e.to_string(),
            }])
        })?;

    let validation = Validator::new(schema.clone()).validate(&cedar, ValidationMode::Strict);
    for e in validation.validation_errors() {
        let d = DetailedError::from(e);
        match by_id.get(super::id_str(e.policy_id())) {
            Some(&i) => {
                let m = &metas[i];
                invalid.push(diag_problem(&files[m.file], d, Some(m.offset)));
            }
            None => invalid.push(Problem {
                file: dir.to_owned(),
                line: 0,
                column: 0,
                message: d.message,
            }),
        }
    }
    let mut warnings: Vec<String> = schema_warnings;
    for w in validation.validation_warnings() {
        let d = DetailedError::from(w);
        let p = match by_id.get(super::id_str(w.policy_id())) {
            Some(&i) => {
                let m = &metas[i];
                diag_problem(&files[m.file], d, Some(m.offset))
            }
            None => Problem {
                file: dir.to_owned(),
                line: 0,
                column: 0,
                message: d.message,
            },
        };
        warnings.push(p.to_string());
    }
    if !invalid.is_empty() {
        invalid.sort_by(|a, b| {
            (a.file.as_str(), a.line, a.column).cmp(&(b.file.as_str(), b.line, b.column))
        });
        return Err(PolicyError::Invalid(invalid));
    }

    let action_entities = schema
        .action_entities()
        .map_err(|e| schema_problem(&schema_origin, format!("action entities: {e}")))?;
    let names = names(&schema, &action_entities, &schema_origin)?;
    // Action entities only matter to `action in <group>`.
    let action_entities = if names.action_ancestors.iter().all(HashSet::is_empty) {
        Vec::new()
    } else {
        action_entities.iter().cloned().collect()
    };
    let set = PolicySet {
        cedar: Arc::new(cedar),
        policies: metas,
        by_id,
        files,
        schema_origin: schema_origin.clone(),
        names,
        action_entities,
        authorizer: Authorizer::new(),
        slices: RwLock::new(HashMap::new()),
        decisions: Memo::new(MAX_DECISIONS),
        entities: Memo::new(MAX_ENTITIES),
        sources: Memo::new(MAX_SOURCES),
        version,
        warnings,
    };
    probe(&set, &schema)?;
    Ok(set)
}

fn schema_problem(origin: &str, message: String) -> PolicyError {
    PolicyError::Schema(vec![Problem {
        file: origin.to_owned(),
        line: 0,
        column: 0,
        message,
    }])
}

/// The schema, where it came from, and its warnings.
fn parse_schema(source: Option<&Source>) -> Result<(Schema, String, Vec<String>), PolicyError> {
    let (text, origin) = match source {
        Some(s) => (s.text.as_str(), s.display.clone()),
        None => (DEFAULT_SCHEMA, "built-in".to_owned()),
    };
    let file = FileInfo::new(origin.clone(), text.to_owned());
    match Schema::from_cedarschema_str(text) {
        Ok((schema, warnings)) => {
            let warnings = warnings
                .map(|w| diag_problem(&file, DetailedError::from(&w), None).to_string())
                .collect();
            Ok((schema, origin, warnings))
        }
        Err(e) => {
            let d = DetailedError::from(&e);
            let mut problems = vec![diag_problem(&file, d.clone(), None)];
            problems.extend(d.related.into_iter().map(|r| diag_problem(&file, r, None)));
            problems.dedup();
            Err(PolicyError::Schema(problems))
        }
    }
}

/// The entity types and actions this code fills in, as the schema names
/// them: all must exist.
fn names(
    schema: &Schema,
    action_entities: &cedar_policy::Entities,
    origin: &str,
) -> Result<Names, PolicyError> {
    let ty = |name: &str| -> Result<EntityTypeName, PolicyError> {
        let full = format!("{NAMESPACE}::{name}");
        let t = EntityTypeName::from_str(&full)
            .map_err(|e| schema_problem(origin, format!("{full}: {e}")))?;
        if schema.entity_types().any(|x| x == &t) {
            Ok(t)
        } else {
            Err(schema_problem(
                origin,
                format!("the schema must declare entity type {full}"),
            ))
        }
    };
    let identity = ty("Identity")?;
    let role = ty("Role")?;
    let model = ty("Model")?;
    let action_type = EntityTypeName::from_str(&format!("{NAMESPACE}::Action"))
        .map_err(|e| schema_problem(origin, e.to_string()))?;
    let mut actions = Vec::new();
    let mut action_ancestors = Vec::new();
    for a in ACTIONS {
        let uid = EntityUid::from_type_name_and_id(action_type.clone(), EntityId::new(a));
        if !schema.actions().any(|x| x == &uid) {
            return Err(schema_problem(
                origin,
                format!("the schema must declare action {uid}"),
            ));
        }
        let ancestors: HashSet<EntityUid> = action_entities
            .ancestors(&uid)
            .map(|i| i.cloned().collect())
            .unwrap_or_default();
        actions.push(uid);
        action_ancestors.push(ancestors);
    }
    Ok(Names {
        identity,
        role,
        model,
        actions,
        action_ancestors,
    })
}

/// Builds a request for every action against the schema (entities and
/// context validated): a custom schema must describe what decide() gives.
fn probe(set: &PolicySet, schema: &Schema) -> Result<(), PolicyError> {
    for (i, action) in ACTIONS.iter().enumerate() {
        let req = Request {
            principal: Principal {
                subject: "probe".into(),
                tenant: Some("t".into()),
                roles: vec!["r".into()],
                scopes: vec!["model:m:invoke".into()],
                issuer: "https://issuer.example".into(),
            },
            action,
            resource: Resource {
                service: "m".into(),
                tenant: "t".into(),
                version: "1".into(),
                sensitivity: "internal".into(),
                cost_tier: "standard".into(),
            },
            now: std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000),
            source: std::net::IpAddr::from([10, 0, 0, 1]),
            method: Method::Knock,
            token_age: Duration::from_secs(1),
            spend_month: 0,
            forecast_month: 0,
            budget_action: "",
            budget_forecast_percent: 0,
        };
        set.cedar_request(&req, i, Some(schema)).map_err(|e| {
            schema_problem(
                &set.schema_origin,
                format!(
                    "the schema does not describe what portcullis provides for action \
                     {action:?} ({e}); start from the built-in schema \
                     (examples/policy/portcullis.cedarschema)"
                ),
            )
        })?;
    }
    Ok(())
}

/// Which context attributes a policy mentions, as [`CONTEXT_ATTRS`] bits:
/// any occurrence of the name as a string in the policy's JSON form (an
/// attribute access, a `has`, a record key, or a mere string literal).
/// Over-approximate on purpose; all of them if the JSON is unavailable.
fn context_use(policy: &cedar_policy::Policy) -> u16 {
    let Ok(json) = policy.to_json() else {
        return u16::MAX;
    };
    let text = json.to_string();
    CONTEXT_ATTRS
        .iter()
        .enumerate()
        .filter(|(_, name)| text.contains(&format!("\"{name}\"")))
        .fold(0, |acc, (bit, _)| acc | (1 << bit))
}

fn parse_ttl(v: &str, effect: Effect) -> Result<Duration, String> {
    if effect == Effect::Forbid {
        return Err("@ttl only applies to permit policies".into());
    }
    match v.trim().parse::<u64>() {
        Ok(n) if (1..=MAX_TTL_SECS).contains(&n) => Ok(Duration::from_secs(n)),
        _ => Err(format!(
            "@ttl({v:?}): expected whole seconds from 1 to {MAX_TTL_SECS}, e.g. @ttl(\"300\")"
        )),
    }
}
