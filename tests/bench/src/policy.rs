//! `portcullis-bench policy [--n N]`: the cost of a Cedar admission decision
//! (`portcullis_agent::policy::PolicySet::decide`) for 10, 100 and 1000
//! generated policies, next to the cost of verifying an EdDSA token and of
//! a cached knock admission measured in the same run.
//!
//! The policies are generated per tenant, like a real multi-tenant
//! deployment: for each tenant an app inference permit (roles, tenant,
//! business hours), an analyst read permit, a retrain permit (role, CIDR,
//! issuer), a spend-ceiling forbid and an export forbid, each scoped to the
//! tenant's model (`resource == Portcullis::Model::"tN-llm"`), plus the
//! global tenant-isolation forbid. Two shapes:
//!
//! - scoped: as above; the engine evaluates only the policies whose action
//!   and resource scope can match (its per-(service, action) slice);
//! - unscoped: the same rules with the resource test moved into the `when`
//!   condition, so every policy of the action is evaluated (the worst case
//!   for the engine, as with policies that never name a model).
//!
//! Requests vary tenant, role, action, hour, weekday, source and forecast,
//! so decisions are a mix of allow, forbid and default deny. Each row is N
//! decisions after a warm-up pass (slices cached, as in a running agent), in
//! three modes: a new identity every time (entities built, policies
//! evaluated), known identities with the decision evaluated anyway
//! (`decide_fresh`, the memo bypassed), and repeated inputs (`decide`, the
//! memo answering). Latency is per call; decisions/s is N over the loop's
//! wall time.
//!
//! Token verification: a token minted by `devtoken` (Ed25519), verified by
//! `admission::token::Verifier` with `cache_entries: 0` (every call parses
//! and checks the signature), and with the cache (a hit).
//!
//! Cached admission: `KnockService::handle` with one token (verified-token
//! cache hit), fresh nonces and sources: the path the agent runs, with the
//! grant durable in an audit spool and the admission in the real kernel
//! maps of programs loaded but attached nowhere (needs root), with the
//! built-in policy. Its p50 minus the built-in policy's decision (measured alongside)
//! is the admission without a policy; each row's share is decision p50 /
//! (that + decision p50). Without root, the 185 µs p50 of `cargo xtask bench
//! admission` (cached EdDSA knock, on the CI machine kind) stands in, and
//! the output says so. Benchmarks report; they never fail on a missed target.

use std::{
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context, Result, bail};
use portcullis_agent::{
    admission::{
        jwk::JwksFile,
        token::{TokenPolicy, Verifier},
    },
    policy::{Method, PolicySet, PolicyStore, Principal, Request, Resource},
};
use portcullis_e2e::{
    devtoken::{self, MintClaims},
    pipeline::{Parts, Pipeline},
};
use portcullis_knock::{KnockOptions, build_knock};
use portcullis_testkit::TempDir;

pub const USAGE: &str = "usage: portcullis-bench policy [--n N]
  --n N   decisions per row (default 20000; token and knock rows use N/10, at least 1000)";

const ISSUER: &str = "https://idp.bench.test";
const AUDIENCE: &str = "portcullis-bench";
const SERVICE: &str = "llm";
/// Policies per generated tenant.
const PER_TENANT: usize = 5;
/// Distinct requests cycled through.
const REQUESTS: usize = 4096;
/// The cached admission p50 from `cargo xtask bench admission` (EdDSA, the
/// durable record included) on the CI machine kind, used when the kernel
/// maps cannot be loaded.
const REFERENCE_CACHED_ADMISSION: Duration = Duration::from_micros(185);
/// The target docs/benchmarks.md states: the decision is under 20% of a cached admission at
/// 100 policies.
const TARGET_SHARE: f64 = 0.20;
const TARGET_POLICIES: usize = 100;
const SIZES: [usize; 3] = [10, 100, 1000];

/// Runs the benchmark with the arguments after `policy`.
pub fn main(args: impl Iterator<Item = String>) -> Result<()> {
    run(crate::support::parse_n(
        args,
        20_000,
        100..=10_000_000,
        USAGE,
    )?)
}

use crate::support::Row;

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// A small deterministic generator (xorshift64*), so runs are comparable.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Shape {
    Scoped,
    Unscoped,
}

impl Shape {
    fn name(self) -> &'static str {
        match self {
            Shape::Scoped => "scoped to the tenant's model",
            Shape::Unscoped => "unscoped (model test in `when`)",
        }
    }
}

/// The tenants of a set of `n` policies (one global policy, the rest per
/// tenant).
fn tenants(n: usize) -> usize {
    (n - 1).div_ceil(PER_TENANT).max(1)
}

/// The resource scope and the condition prefix that restrict a policy to
/// `model`, in the given shape.
fn resource_test(shape: Shape, model: &str) -> (String, String) {
    match shape {
        Shape::Scoped => (format!("resource == {model}"), String::new()),
        Shape::Unscoped => ("resource".into(), format!("resource == {model} && ")),
    }
}

/// `n` policies in files of at most 50.
fn generate(n: usize, shape: Shape) -> Vec<(String, String)> {
    let mut policies = vec![
        "@id(\"tenant-isolation\")\nforbid (principal, action, resource)\n  when { resource.tenant != \"\" && principal.tenant != resource.tenant };\n"
            .to_string(),
    ];
    let ns = "Portcullis";
    'outer: for t in 0..tenants(n) {
        let (scope, cond) = resource_test(shape, &format!("{ns}::Model::\"t{t}-llm\""));
        let (mscope, mcond) = resource_test(shape, &format!("{ns}::Model::\"t{t}-metrics\""));
        let budget = 50_000_000 + (t as u64 % 7) * 25_000_000;
        let net = t % 250;
        let kinds = [
            format!(
                "@id(\"t{t}-app-invoke\")\n@ttl(\"3600\")\npermit (principal in {ns}::Role::\"app\", action == {ns}::Action::\"invoke\", {scope})\n  when {{ {cond}principal.tenant == \"t{t}\" && context.weekday <= 5 && context.hour >= 7 && context.hour < 20 }};\n"
            ),
            format!(
                "@id(\"t{t}-analyst-read\")\npermit (principal in {ns}::Role::\"analyst\", action == {ns}::Action::\"read\", {mscope})\n  when {{ {mcond}principal.tenant == \"t{t}\" && context.method == \"knock\" }};\n"
            ),
            format!(
                "@id(\"t{t}-retrain\")\npermit (principal in {ns}::Role::\"retrainer\", action == {ns}::Action::\"retrain\", {scope})\n  when {{ {cond}context.source.isInRange(ip(\"10.{net}.0.0/16\")) && principal.issuer == \"{ISSUER}\" }};\n"
            ),
            format!(
                "@id(\"t{t}-spend\")\nforbid (principal, action == {ns}::Action::\"invoke\", {scope})\n  when {{ {cond}context.forecast_month > {budget} }};\n"
            ),
            format!(
                "@id(\"t{t}-no-export\")\nforbid (principal, action == {ns}::Action::\"export_weights\", {scope})\n  unless {{ {cond}principal.scopes.contains(\"model:t{t}-llm:export_weights\") && resource.sensitivity != \"restricted\" }};\n"
            ),
        ];
        for k in kinds {
            if policies.len() == n {
                break 'outer;
            }
            policies.push(k);
        }
    }
    policies
        .chunks(50)
        .enumerate()
        .map(|(i, c)| (format!("gen-{i:03}.cedar"), c.join("\n")))
        .collect()
}

/// Varied requests against the tenants of a set of `n` policies.
fn requests(n: usize, rng: &mut Rng) -> Vec<Request> {
    let base = SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_478_400); // Tue 2026-11-24
    let tenants = tenants(n) as u64;
    (0..REQUESTS)
        .map(|_| {
            let t = rng.below(tenants);
            // Mostly the identity's own tenant; sometimes another's.
            let owner = if rng.below(10) == 0 {
                rng.below(tenants)
            } else {
                t
            };
            let (role, action, model) = match rng.below(4) {
                0 | 1 => ("app", "invoke", "llm"),
                2 => ("analyst", "read", "metrics"),
                _ => ("retrainer", "retrain", "llm"),
            };
            let net = if rng.below(4) == 0 { 99 } else { owner % 250 };
            Request {
                principal: Principal {
                    subject: format!("svc-{}", rng.below(50)),
                    tenant: Some(format!("t{t}")),
                    roles: vec![role.into()],
                    scopes: vec![format!("model:t{owner}-{model}:{action}")],
                    issuer: ISSUER.into(),
                },
                action,
                resource: Resource {
                    service: format!("t{owner}-{model}"),
                    tenant: format!("t{owner}"),
                    version: "3".into(),
                    sensitivity: "internal".into(),
                    cost_tier: "premium".into(),
                },
                now: base + Duration::from_secs(rng.below(7 * 86_400)),
                source: IpAddr::V4(Ipv4Addr::new(10, net as u8, 1, 2)),
                method: Method::Knock,
                token_age: Duration::from_secs(rng.below(3600)),
                spend_month: rng.below(100_000_000),
                forecast_month: rng.below(250_000_000),
                budget_action: "",
                budget_forecast_percent: 0,
            }
        })
        .collect()
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// A new identity every decision: entities built, policies evaluated.
    NewIdentity,
    /// Known identities and models, the decision evaluated (memo bypassed).
    Evaluated,
    /// Repeated inputs: the decision memo answers.
    Memoized,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::NewIdentity => "new identity each time",
            Mode::Evaluated => "evaluated (entities cached)",
            Mode::Memoized => "repeated inputs (memoized)",
        }
    }
}

struct PolicyRow {
    policies: usize,
    shape: Shape,
    mode: Mode,
    load: Duration,
    row: Row,
    allowed: f64,
}

fn time_decisions(
    count: usize,
    reqs: &[Request],
    mut decide: impl FnMut(&Request) -> portcullis_agent::policy::Decision,
) -> Row {
    let mut lat = Vec::with_capacity(count);
    let wall = Instant::now();
    for i in 0..count {
        let r = &reqs[i % reqs.len()];
        let t = Instant::now();
        let d = decide(r);
        lat.push(t.elapsed());
        std::hint::black_box(d);
    }
    Row::new(lat, wall.elapsed())
}

fn bench_policies(n: usize, shape: Shape, count: usize, rng: &mut Rng) -> Result<Vec<PolicyRow>> {
    let files = generate(n, shape);
    let t = Instant::now();
    let set = PolicySet::from_sources(&files, None)
        .with_context(|| format!("the generated set of {n} policies does not load"))?;
    let load = t.elapsed();
    if set.len() != n {
        bail!("generated {} policies, wanted {n}", set.len());
    }
    let reqs = requests(n, rng);
    let mut allowed = 0usize;
    for r in &reqs {
        let d = set.decide(r);
        if !d.errors.is_empty() {
            bail!("evaluation errors in the generated set: {:?}", d.errors);
        }
        if d != set.decide_fresh(r) {
            bail!("memoized and fresh decisions differ");
        }
        allowed += usize::from(d.allow);
    }
    let allowed = allowed as f64 / reqs.len() as f64;
    // New identities: the same requests, each with a subject never seen.
    let fresh: Vec<Request> = (0..count)
        .map(|i| {
            let mut r = reqs[i % reqs.len()].clone();
            r.principal.subject = format!("new-{n}-{i}");
            r
        })
        .collect();
    let rows = [
        (
            Mode::NewIdentity,
            time_decisions(count, &fresh, |r| set.decide_fresh(r)),
        ),
        (
            Mode::Evaluated,
            time_decisions(count, &reqs, |r| set.decide_fresh(r)),
        ),
        (
            Mode::Memoized,
            time_decisions(count, &reqs, |r| set.decide(r)),
        ),
    ];
    Ok(rows
        .into_iter()
        .map(|(mode, row)| PolicyRow {
            policies: n,
            shape,
            mode,
            load,
            row,
            allowed,
        })
        .collect())
}

struct Tokens {
    _dir: TempDir,
    jwks: Arc<JwksFile>,
    token: String,
}

fn mint() -> Result<Tokens> {
    let dir = TempDir::new("benchpol").context("temp dir")?;
    let keys = devtoken::keygen(&dir.path().join("issuer")).context("keygen")?;
    let token = devtoken::mint(
        &keys.key_path,
        MintClaims {
            issuer: ISSUER.into(),
            audience: AUDIENCE.into(),
            subject: "bench".into(),
            tenant: Some("acme".into()),
            client_id: None,
            roles: vec!["app".into()],
            scopes: vec![format!("model:{SERVICE}:invoke")],
            ttl: Duration::from_secs(1800),
            cnf_jkt: None,
        },
    )
    .context("mint")?;
    let jwks = Arc::new(JwksFile::load(&keys.jwks_path, false).context("load the JWKS")?);
    Ok(Tokens {
        _dir: dir,
        jwks,
        token,
    })
}

fn verifier(jwks: &Arc<JwksFile>, cache_entries: usize) -> Verifier {
    let mut policy = TokenPolicy::new(ISSUER, AUDIENCE);
    policy.cache_entries = cache_entries;
    Verifier::new(policy, jwks.clone())
}

fn bench_verify(tokens: &Tokens, cache_entries: usize, count: usize) -> Result<Row> {
    let v = verifier(&tokens.jwks, cache_entries);
    for _ in 0..count.min(200) {
        v.verify(&tokens.token, SystemTime::now())?;
    }
    let mut lat = Vec::with_capacity(count);
    let wall = Instant::now();
    for _ in 0..count {
        let now = SystemTime::now();
        let t = Instant::now();
        let r = v.verify(&tokens.token, now);
        lat.push(t.elapsed());
        r.context("the bench token does not verify")?;
    }
    Ok(Row::new(lat, wall.elapsed()))
}

fn nonce() -> [u8; 16] {
    let mut n = [0u8; 16];
    // SAFETY: writes at most 16 bytes into a 16-byte buffer.
    let got = unsafe { libc::getrandom(n.as_mut_ptr().cast(), n.len(), 0) };
    assert_eq!(got, 16, "getrandom");
    n
}

/// Cached knocks through the knock service the agent runs (its grant
/// durable in a real audit spool, the admission in the real kernel maps).
fn bench_cached_knock(tokens: &Tokens, count: usize) -> Result<Row> {
    let dir = TempDir::new("benchpolk").context("temp dir")?;
    let jwks_path = tokens.jwks.path().context("the JWKS has a path")?;
    let cfg = crate::support::agent_config(dir.path(), jwks_path, ISSUER, AUDIENCE, SERVICE)?;
    // The runtime the agent builds (agent/src/main.rs).
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("tokio runtime")?;
    rt.block_on(async {
        let p = Pipeline::open(
            cfg,
            Parts {
                verifier: Arc::new(verifier(&tokens.jwks, 65_536)),
                // The agent's default: no [policy], the built-in scopes-only set.
                policies: Arc::new(PolicyStore::fixed(PolicySet::default_set())),
                spend: None,
            },
        )?;
        let server: SocketAddr = "10.255.0.1:62201".parse()?;
        let warmup = 200;
        let now = SystemTime::now();
        let datagrams: Vec<Vec<u8>> = (0..count + warmup)
            .map(|_| {
                let opts = KnockOptions::new(server, tokens.token.as_str(), SERVICE);
                build_knock(&opts, nonce(), now).context("build knock")
            })
            .collect::<Result<_>>()?;
        let peer = |i: usize| {
            let i = (i as u32) & 0x00ff_ffff;
            SocketAddr::new(
                IpAddr::V4(Ipv4Addr::from(0x0a00_0000 | i)),
                40_000 + (i % 20_000) as u16,
            )
        };
        let mut lat = Vec::with_capacity(count);
        let mut wall = Instant::now();
        for (i, d) in datagrams.iter().enumerate() {
            if i == warmup {
                lat.clear();
                wall = Instant::now();
            }
            let now = SystemTime::now();
            let t = Instant::now();
            let r = p.service.handle(d, peer(i), now).await;
            lat.push(t.elapsed());
            if let Err(e) = r {
                bail!("knock {i} refused ({}): {e}", e.reason());
            }
        }
        let wall = wall.elapsed();
        p.close().await?;
        Ok(Row::new(lat, wall))
    })
}

/// The bench token's request, as the admitter builds it for a knock.
fn knock_request(source: IpAddr) -> Request {
    Request {
        principal: Principal {
            subject: "bench".into(),
            tenant: Some("acme".into()),
            roles: vec!["app".into()],
            scopes: vec![format!("model:{SERVICE}:invoke")],
            issuer: ISSUER.into(),
        },
        action: "invoke",
        resource: Resource {
            service: SERVICE.into(),
            ..Resource::default()
        },
        now: SystemTime::now(),
        source,
        method: Method::Knock,
        token_age: Duration::from_secs(5),
        spend_month: 0,
        forecast_month: 0,
        budget_action: "",
        budget_forecast_percent: 0,
    }
}

fn run(n: usize) -> Result<()> {
    portcullis_testkit::pin_to_current_cpu().context("pin to one CPU")?;
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let side = (n / 10).max(1000);

    eprintln!("policy decisions: {n} per row ...");
    let mut rows = Vec::new();
    for shape in [Shape::Scoped, Shape::Unscoped] {
        for size in SIZES {
            rows.extend(bench_policies(size, shape, n, &mut rng)?);
        }
    }
    eprintln!("token verification and cached knocks: {side} per row ...");
    let tokens = mint()?;
    let uncached = bench_verify(&tokens, 0, side)?;
    let cached_verify = bench_verify(&tokens, 10_000, side)?;
    // The built-in policy's decision for the bench token, from a new source
    // each time: what the admitter now spends inside a cached knock.
    let default_set = PolicySet::default_set();
    let knock_reqs: Vec<Request> = (0..side)
        .map(|i| knock_request(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 | i as u32))))
        .collect();
    let default_decision = time_decisions(side, &knock_reqs, |r| default_set.decide(r));
    let (knock, base, base_note) = match bench_cached_knock(&tokens, side) {
        Ok(row) => {
            let base = row.pct(0.5).saturating_sub(default_decision.pct(0.5));
            let note = format!(
                "cached knock p50 {:.2} µs measured in this run, minus the built-in policy's decision \
                 inside it ({:.2} µs)",
                us(row.pct(0.5)),
                us(default_decision.pct(0.5))
            );
            (Some(row), base, note)
        }
        Err(e) => (
            None,
            REFERENCE_CACHED_ADMISSION,
            format!(
                "cached knocks not measurable here ({e:#}); the {:.1} µs p50 of \
                 `cargo xtask bench admission` stands in",
                us(REFERENCE_CACHED_ADMISSION)
            ),
        ),
    };
    let share = |d: Duration| d.as_secs_f64() / (base + d).as_secs_f64();

    let mut t = String::new();
    let _ = writeln!(
        t,
        "| policies | shape | decision | load + validate ms | decisions/s | p50 µs | p99 µs | allowed | p50 share of admission |"
    );
    let _ = writeln!(t, "|---:|---|---|---:|---:|---:|---:|---:|---:|");
    for r in &rows {
        let d = r.row.pct(0.5);
        let _ = writeln!(
            t,
            "| {} | {} | {} | {:.1} | {:.0} | {:.2} | {:.2} | {:.0}% | {:.1}% |",
            r.policies,
            r.shape.name(),
            r.mode.name(),
            r.load.as_secs_f64() * 1e3,
            r.row.per_sec(),
            us(d),
            us(r.row.pct(0.99)),
            r.allowed * 100.0,
            share(d) * 100.0
        );
    }
    let mut t2 = String::new();
    let _ = writeln!(t2, "| other path | per s | p50 µs | p99 µs |");
    let _ = writeln!(t2, "|---|---:|---:|---:|");
    for (name, row) in [
        (
            "EdDSA token verify, uncached (`cache_entries: 0`)",
            Some(&uncached),
        ),
        ("EdDSA token verify, cached (hit)", Some(&cached_verify)),
        (
            "built-in policy decision (`scopes-only`), new source each time",
            Some(&default_decision),
        ),
        (
            "cached knock admission (`KnockService::handle`, built-in policy)",
            knock.as_ref(),
        ),
    ] {
        if let Some(r) = row {
            let _ = writeln!(
                t2,
                "| {name} | {:.0} | {:.2} | {:.2} |",
                r.per_sec(),
                us(r.pct(0.5)),
                us(r.pct(0.99))
            );
        }
    }

    println!(
        "policy benchmark: N = {n} decisions per row ({REQUESTS} distinct requests cycled, slices \
         warm), {side} per token/knock row, one CPU"
    );
    println!();
    print!("{t}");
    println!();
    print!("{t2}");
    println!();
    println!(
        "cached admission without a policy decision: {:.2} µs p50 ({base_note}); the share is \
         decision / (that + decision)",
        us(base)
    );
    println!();
    println!(
        "target (reported, not enforced): decision < {:.0}% of a cached admission's total at \
         {TARGET_POLICIES} policies",
        TARGET_SHARE * 100.0
    );
    for r in rows.iter().filter(|r| r.policies == TARGET_POLICIES) {
        let d = r.row.pct(0.5);
        println!(
            "  {}, {}: p50 {:.2} µs = {:.1}% ({}); {:.3}x an uncached EdDSA verify",
            r.shape.name(),
            r.mode.name(),
            us(d),
            share(d) * 100.0,
            if share(d) < TARGET_SHARE {
                "met"
            } else {
                "MISSED"
            },
            d.as_secs_f64() / uncached.pct(0.5).as_secs_f64()
        );
    }
    println!();
    println!("notes:");
    println!(
        "- evaluated: entities come from the per-set cache (same token and model as before), \
         the context and\n  request are built and Cedar runs over the policies whose scope can \
         match (cached per service and action)."
    );
    println!(
        "- memoized: the decision memo answers (same principal, model, action and the context \
         attributes the\n  policies mention); a repeated knock hits it unless a policy mentions \
         `context.token_age`."
    );
    println!(
        "- Cedar evaluates each applicable policy by building its condition anew: unscoped \
         policies cost\n  about 1 µs each per evaluated decision, so scope policies to models \
         (`resource == Portcullis::Model::\"x\"`)."
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_sets_load_and_decide_both_ways() {
        let mut rng = Rng(7);
        for shape in [Shape::Scoped, Shape::Unscoped] {
            for n in [10, 100] {
                let set = PolicySet::from_sources(&generate(n, shape), None)
                    .unwrap_or_else(|e| panic!("{e}"));
                assert_eq!(set.len(), n);
                let reqs = requests(n, &mut rng);
                let allowed = reqs.iter().filter(|r| set.decide(r).allow).count();
                assert!(allowed > reqs.len() / 10, "{allowed}");
                assert!(allowed < reqs.len() * 9 / 10, "{allowed}");
            }
        }
    }

    #[test]
    fn shapes_decide_alike_and_the_memo_is_faithful() {
        let mut rng = Rng(11);
        let a = PolicySet::from_sources(&generate(100, Shape::Scoped), None).unwrap();
        let b = PolicySet::from_sources(&generate(100, Shape::Unscoped), None).unwrap();
        for r in requests(100, &mut rng) {
            let (x, y) = (a.decide(&r), b.decide(&r));
            assert_eq!((x.allow, &x.determining), (y.allow, &y.determining));
            assert_eq!(x, a.decide_fresh(&r));
            assert_eq!(y, b.decide_fresh(&r));
        }
    }
}
