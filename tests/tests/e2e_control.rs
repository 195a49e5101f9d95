//! End to end: the control API (docs/control-api.md). The real agent
//! serves `portcullis.v1.Control` on a Unix socket in the test's directory;
//! callers are the real `portcullis ctl` run as root or as other uids (the
//! socket's peer credentials decide the role), or an in-process client for
//! streams. Traffic goes between the test's network namespaces.
//!
//! The tests of this file run one at a time (`e2e::serial`).

use portcullis_e2e::e2e;

use std::{
    net::IpAddr,
    time::{Duration, Instant},
};

use e2e::{
    EchoLoop, OPEN_PORT, PROTECTED_PORT, SERVICE,
    control::{client, ctl, ctl_json, ctl_refused, open_to_other_users, socket},
    knock::{KnockEnv, KnockSettings, TENANT},
    serial,
};
use portcullis_proto::v1::{self, AdmissionMethod, event::Body};
use prost::Message as _;

const INVOKE: &str = "model:llm:invoke";
/// A policy set's base: everything the token's scope grants.
const PERMIT: &str = "@id(\"permit-all\")\npermit(principal, action, resource);\n";
const TOKEN_TTL: Duration = Duration::from_secs(300);

/// Socket group, and the uids the roles are granted to.
const GROUP: u32 = 4300;
const VIEWER: (u32, u32) = (4201, GROUP);
const NOBODY: (u32, u32) = (4202, GROUP);
const ADMITTER: (u32, u32) = (4203, GROUP);

fn roles_settings(extra: &str) -> KnockSettings {
    KnockSettings {
        control: format!(
            "socket_group = \"{GROUP}\"\nviewers = [\"uid:{}\"]\nadmitters = [\"uid:{}\"]\n{extra}",
            VIEWER.0, ADMITTER.0
        ),
        ..KnockSettings::default()
    }
}

fn control_calls(k: &KnockEnv) -> Vec<v1::ControlCall> {
    k.env
        .spool_events()
        .into_iter()
        .filter_map(|e| match e.body {
            Some(Body::ControlCall(c)) => Some(c),
            _ => None,
        })
        .collect()
}

/// Waits (bounded) until the spool holds a control call `pred` accepts.
fn wait_control_call(k: &KnockEnv, pred: impl Fn(&v1::ControlCall) -> bool) -> v1::ControlCall {
    portcullis_testkit::poll_until(Duration::from_secs(5), || {
        control_calls(k).into_iter().find(|c| pred(c))
    })
    .unwrap_or_else(|| panic!("no such ControlCall in the spool: {:#?}", control_calls(k)))
}

#[test]
fn roles_decide_who_may_call_what_and_every_call_is_audited() {
    let _serial = serial();
    let k = KnockEnv::start("ctlrole", &roles_settings(""));
    open_to_other_users(&k.env);

    let s = ctl_json(&k.env, Some(VIEWER), &["status"]);
    assert_eq!(s["roles"], serde_json::json!(["viewer"]), "{s}");
    assert_eq!(s["caller"], format!("uid:{} gid:{GROUP}", VIEWER.0));
    assert_eq!(s["origin"], "fresh");
    assert!(
        s["node_id"].as_str().unwrap().starts_with("e2e-knock-"),
        "{s}"
    );
    assert!(
        s["tables"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["map"] == "PCL_ADMIT"),
        "{s}"
    );
    let s = ctl_json(&k.env, None, &["status"]);
    assert_eq!(s["roles"], serde_json::json!(["operator"]), "root: {s}");

    // No role at all, and the wrong role for the call.
    let e = ctl_refused(&k.env, Some(NOBODY), &["status"]);
    assert!(
        e.contains("PermissionDenied") && e.contains("has none"),
        "{e}"
    );
    let token = k.mint(&[INVOKE], TOKEN_TTL);
    let token_file = k.token_file(&token);
    make_readable(&token_file);
    let client = k.env.topo.client_addr(false).to_string();
    let admit = [
        "admit",
        "--service",
        SERVICE,
        "--client",
        &client,
        "--token-file",
        token_file.to_str().unwrap(),
    ];
    let e = ctl_refused(&k.env, Some(VIEWER), &admit);
    assert!(
        e.contains("PermissionDenied") && e.contains("admitter"),
        "{e}"
    );
    let e = ctl_refused(&k.env, Some(VIEWER), &["revoke", "--tenant", TENANT]);
    assert!(
        e.contains("PermissionDenied") && e.contains("operator"),
        "{e}"
    );
    let e = ctl_refused(&k.env, Some(ADMITTER), &["admissions"]);
    assert!(e.contains("PermissionDenied"), "{e}");
    assert!(k.admissions().is_empty(), "refused calls change nothing");

    // Outside the socket's group the kernel refuses the connection.
    let e = ctl_refused(&k.env, Some((4204, 4204)), &["status"]);
    assert!(e.contains("cannot reach"), "{e}");

    // The admitter may admit; the viewer sees it.
    let a = ctl_json(&k.env, Some(ADMITTER), &admit);
    assert_eq!(
        (a["identity"].as_str(), a["tenant"].as_str()),
        (Some("alice"), Some(TENANT))
    );
    let rows = ctl_json(&k.env, Some(VIEWER), &["admissions"]);
    assert_eq!(rows.as_array().unwrap().len(), 1, "{rows}");
    assert_eq!(rows[0]["source"], client.as_str());
    assert_eq!(rows[0]["identity"], "acme/alice");

    // Every call is on the record: who, what, whether allowed, the outcome;
    // never the token.
    let denied = wait_control_call(&k, |c| c.method == "Revoke" && !c.allowed);
    assert_eq!(denied.caller, format!("uid:{} gid:{GROUP}", VIEWER.0));
    assert!(denied.outcome.contains("permission denied"), "{denied:?}");
    assert_eq!(denied.request, format!("tenant={TENANT}"));
    let granted = wait_control_call(&k, |c| c.method == "Admit" && c.allowed);
    assert_eq!(
        (granted.role.as_str(), granted.outcome.as_str()),
        ("admitter", "ok")
    );
    assert!(granted.request.contains(&client), "{granted:?}");
    let all = control_calls(&k);
    assert!(
        all.iter()
            .all(|c| !c.request.contains(&token) && !c.outcome.contains(&token)),
        "a token in the trail"
    );
    assert!(
        all.iter()
            .any(|c| c.method == "Status" && !c.allowed && c.caller.contains("4202")),
        "{all:#?}"
    );

    // A stopping agent closes the API and removes its socket.
    let mut k = k;
    k.env
        .agent()
        .terminate(Duration::from_secs(10))
        .expect("graceful stop");
    assert!(!socket(&k.env).exists(), "socket removed on stop");
}

fn make_readable(p: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o644)).unwrap();
    if let Some(d) = p.parent() {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
}

fn granted_events(k: &KnockEnv) -> Vec<v1::AdmissionGranted> {
    k.env
        .spool_events()
        .into_iter()
        .filter_map(|e| match e.body {
            Some(Body::AdmissionGranted(g)) => Some(g),
            _ => None,
        })
        .collect()
}

#[test]
fn admit_is_a_knock_by_rpc_and_revoke_by_tenant_cuts_live_connections_within_the_call() {
    let _serial = serial();
    let k = KnockEnv::start("ctladm", &KnockSettings::default());
    let _server = k.env.echo_server(false, PROTECTED_PORT);
    let token = k.mint(&[INVOKE], TOKEN_TTL);
    let token_file = k.token_file(&token);
    let v4 = k.env.topo.client_addr(false);

    // Admit by RPC for the v4 address, knock with the same token from v6.
    let a = ctl_json(
        &k.env,
        None,
        &[
            "admit",
            "--service",
            SERVICE,
            "--client",
            &v4.to_string(),
            "--token-file",
            token_file.to_str().unwrap(),
        ],
    );
    assert_eq!(a["source"], v4.to_string().as_str());
    k.knock_ok(true, &token, SERVICE, &[]);
    let by_rpc = k
        .admission(v4, SERVICE, 0)
        .expect("admitted by RPC in the kernel");
    let by_knock = k
        .admission(k.env.topo.client_addr(true), SERVICE, 0)
        .expect("admitted by knock in the kernel");
    assert_eq!(by_rpc.identity, by_knock.identity, "one kernel identity");
    let gap = by_rpc.expires_ns.abs_diff(by_knock.expires_ns);
    assert!(gap < 5_000_000_000, "same expiry rule: {gap} ns apart");

    // The same record, but for the method and the source.
    let g = portcullis_testkit::poll_until(Duration::from_secs(5), || {
        let g = granted_events(&k);
        (g.len() == 2).then_some(g)
    })
    .expect("two grants recorded");
    let (rpc, knock) = (&g[0], &g[1]);
    assert_eq!(rpc.method, AdmissionMethod::Control as i32);
    assert_eq!(knock.method, AdmissionMethod::Knock as i32);
    let same = |g: &v1::AdmissionGranted| {
        (
            g.identity.clone(),
            g.tenant.clone(),
            g.service.clone(),
            g.policies.clone(),
            g.policy_version.clone(),
            g.jti_sha256.clone(),
            g.action.clone(),
            g.identity_name.clone(),
        )
    };
    assert_eq!(same(rpc), same(knock));

    // A live connection, seen by ListFlows and Stats.
    let stream = k
        .env
        .connect(false, PROTECTED_PORT, Duration::from_secs(2))
        .expect("admitted client connects");
    let echo = EchoLoop::start(stream, Instant::now() + Duration::from_secs(20));
    assert!(echo.wait_for(10, Duration::from_secs(5)), "echo flows");
    let flows = ctl_json(&k.env, None, &["flows", "--identity", "acme/alice"]);
    assert!(
        flows
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["source"] == v4.to_string().as_str()
                && f["destination_port"] == PROTECTED_PORT
                && f["protocol"] == "tcp"),
        "{flows}"
    );
    let stats = ctl_json(&k.env, None, &["stats", "--identity", "acme/alice"]);
    assert!(
        stats["identities"][0]["connections"].as_u64().unwrap() >= 1,
        "{stats}"
    );
    assert!(stats["drops"]["passed"].as_u64().unwrap() >= 10, "{stats}");

    // Revoke by tenant: cut in the kernel before the call returns.
    eprintln!("before: {}", ctl_json(&k.env, None, &["flows"]));
    let r = ctl_json(
        &k.env,
        None,
        &["revoke", "--tenant", TENANT, "--reason", "offboarded"],
    );
    eprintln!("after: {}", ctl_json(&k.env, None, &["flows"]));
    let returned = Instant::now();
    assert_eq!(r["admissions_removed"], 2, "{r}");
    assert!(r["flows_removed"].as_u64().unwrap() >= 1, "{r}");
    assert_eq!(r["identities"], serde_json::json!(["acme/alice"]));
    let out = echo.join();
    let (failed_at, why) = out.failed_at.expect("the connection is cut");
    assert!(
        failed_at <= returned + Duration::from_millis(50),
        "an echo started {:?} after the call returned still went through ({why})",
        failed_at.saturating_duration_since(returned)
    );
    assert!(k.admissions().is_empty(), "{:?}", k.admissions());
    k.env
        .assert_dropped(false, PROTECTED_PORT, false, "after the revocation");

    // Revoking what is not there changes nothing and says so.
    let revocations = || {
        k.env
            .spool_events()
            .iter()
            .filter(|e| matches!(e.body, Some(Body::Revocation(_))))
            .count()
    };
    let before = revocations();
    assert!(before >= 1);
    let e = ctl_refused(&k.env, None, &["revoke", "--tenant", TENANT]);
    assert!(
        e.contains("NotFound") && e.contains("nothing was revoked"),
        "{e}"
    );
    assert_eq!(revocations(), before);

    // A refused Admit is audited like a refused knock, as the control method.
    let wrong = k.mint(&["model:other:invoke"], TOKEN_TTL);
    let wrong_file = k.token_file(&wrong);
    let e = ctl_refused(
        &k.env,
        None,
        &[
            "admit",
            "--service",
            SERVICE,
            "--client",
            &v4.to_string(),
            "--token-file",
            wrong_file.to_str().unwrap(),
        ],
    );
    assert!(e.contains("PermissionDenied") && e.contains("scope"), "{e}");
    let denied = portcullis_testkit::poll_until(Duration::from_secs(5), || {
        k.env.spool_events().into_iter().find_map(|e| match e.body {
            Some(Body::AdmissionDenied(d)) if d.reason == "scope" => Some(d),
            _ => None,
        })
    })
    .expect("the refusal is recorded");
    assert_eq!(denied.method, AdmissionMethod::Control as i32);
    assert_eq!(denied.source, v4.to_string());
}

#[test]
fn bad_requests_get_clear_statuses_and_pages_cover_every_admission() {
    let _serial = serial();
    let k = KnockEnv::start("ctlbad", &KnockSettings::default());
    let token = k.mint(&[INVOKE], TOKEN_TTL);
    let token_file = k.token_file(&token);
    let tf = token_file.to_str().unwrap();

    for (args, code, words) in [
        (
            &["admissions", "--page-size", "5000"][..],
            "InvalidArgument",
            "max_page_size",
        ),
        (
            &["admissions", "--source", "nonsense"],
            "InvalidArgument",
            "not an IP address",
        ),
        (&["flows", "--service", "nope"], "NotFound", "not protected"),
        (
            &["revoke", "--identity", "acme/nobody"],
            "NotFound",
            "nothing was revoked",
        ),
        (
            &["revoke", "--jti", "never-seen"],
            "NotFound",
            "revocations_file",
        ),
        (
            &["revoke", "--source", "10.9.9.9"],
            "NotFound",
            "nothing was revoked",
        ),
        (
            &["revoke", "--service", "nope"],
            "NotFound",
            "not protected",
        ),
        (
            &[
                "admit",
                "--service",
                SERVICE,
                "--client",
                "not-an-ip",
                "--token-file",
                tf,
            ],
            "InvalidArgument",
            "client_address",
        ),
        (
            &[
                "admit",
                "--service",
                "nope",
                "--client",
                "10.0.0.1",
                "--token-file",
                tf,
            ],
            "NotFound",
            "not protected",
        ),
        (
            &["watch", "--kind", "bogus"],
            "InvalidArgument",
            "not an event kind",
        ),
        (
            &["stats", "--identity", "acme/nobody"],
            "NotFound",
            "not in the kernel",
        ),
    ] {
        let e = ctl_refused(&k.env, None, args);
        assert!(e.contains(code) && e.contains(words), "{args:?}: {e}");
    }
    // A page token this API did not issue.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let e = rt
        .block_on(async {
            client(&k.env)
                .await
                .list_admissions(v1::ListAdmissionsRequest {
                    page_token: "not-hex".into(),
                    ..Default::default()
                })
                .await
        })
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");

    // Five admissions by RPC, listed two per page: each exactly once.
    let sources: Vec<IpAddr> = (1..=5)
        .map(|i| format!("10.77.0.{i}").parse().unwrap())
        .collect();
    for s in &sources {
        ctl_json(
            &k.env,
            None,
            &[
                "admit",
                "--service",
                SERVICE,
                "--client",
                &s.to_string(),
                "--token-file",
                tf,
            ],
        );
    }
    let pages = rt.block_on(async {
        let mut c = client(&k.env).await;
        let mut pages = Vec::new();
        let mut token = String::new();
        for _ in 0..10 {
            let r = c
                .list_admissions(v1::ListAdmissionsRequest {
                    page_size: 2,
                    page_token: token,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            assert_eq!(r.total, 5);
            pages.push(
                r.admissions
                    .iter()
                    .map(|a| a.source.clone())
                    .collect::<Vec<_>>(),
            );
            token = r.next_page_token;
            if token.is_empty() {
                break;
            }
        }
        pages
    });
    assert_eq!(
        pages.iter().map(Vec::len).collect::<Vec<_>>(),
        vec![2, 2, 1]
    );
    let mut seen: Vec<String> = pages.concat();
    seen.sort();
    let mut want: Vec<String> = sources.iter().map(ToString::to_string).collect();
    want.sort();
    assert_eq!(seen, want);
    // `ctl` follows the pages itself.
    let all = ctl_json(&k.env, None, &["admissions", "--page-size", "2"]);
    assert_eq!(all.as_array().unwrap().len(), 5);

    // Policy: the set in force, and candidate files validated against this
    // node (a broken file is reported, not applied).
    let p = ctl_json(&k.env, None, &["policy", "get"]);
    assert_eq!(p["valid"], true);
    let dir = portcullis_testkit::TempDir::new("ctlpol").unwrap();
    std::fs::write(dir.path().join("broken.cedar"), "permit(principal,").unwrap();
    let out = ctl(
        &k.env,
        None,
        &["policy", "validate", dir.path().to_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["valid"], false);
    assert!(v["error"].as_str().unwrap().contains("broken.cedar"), "{v}");
    assert_eq!(
        ctl_json(&k.env, None, &["policy", "get"])["version"],
        p["version"]
    );

    let svc = ctl_json(&k.env, None, &["services"]);
    assert_eq!(svc[0]["name"], SERVICE);
    assert_eq!(svc[0]["port"], PROTECTED_PORT);
    // None of it hurt the agent.
    ctl_json(&k.env, None, &["status"]);
    assert!(k.env.agent.as_ref().is_some_and(|_| true));
}

#[test]
fn watch_streams_sealed_events_and_cuts_off_a_client_that_does_not_read() {
    let _serial = serial();
    let k = KnockEnv::start(
        "ctlwatch",
        &KnockSettings {
            control: "watch_buffer = 8\ncalls_per_sec = 100000\ncalls_burst = 100000\n".into(),
            ..KnockSettings::default()
        },
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        // A reader sees a call's record once it is durable.
        let mut c = client(&k.env).await;
        let mut reader = c
            .watch(v1::WatchRequest {
                kinds: vec!["control_call".into()],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        c.services(v1::ServicesRequest::default()).await.unwrap();
        let seen = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                let ev = reader.message().await.unwrap().expect("stream open");
                let ev = v1::Event::decode(ev.event.as_ref()).unwrap();
                if let Some(Body::ControlCall(cc)) = ev.body
                    && cc.method == "Services"
                {
                    return cc;
                }
            }
        })
        .await
        .expect("the Services call's record arrives");
        assert_eq!(seen.outcome, "ok");
        drop(reader);

        // A client that never reads, on a connection with small windows
        // so that its buffer fills.
        let channel = tonic::transport::Endpoint::from_static("http://portcullis.control")
            .initial_stream_window_size(1024)
            .initial_connection_window_size(1024)
            .connect_with_connector(tower::service_fn({
                let path = socket(&k.env);
                move |_| {
                    let path = path.clone();
                    async move {
                        Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                            tokio::net::UnixStream::connect(path).await?,
                        ))
                    }
                }
            }))
            .await
            .unwrap();
        let mut slow = v1::control_client::ControlClient::new(channel)
            .watch(v1::WatchRequest::default())
            .await
            .unwrap()
            .into_inner();
        // Events until the server gives up on it (bounded).
        let started = Instant::now();
        let mut calls = 0;
        while calls < 20_000 && started.elapsed() < Duration::from_secs(60) {
            c.list_admissions(v1::ListAdmissionsRequest::default())
                .await
                .unwrap();
            calls += 1;
            if calls % 500 == 0
                && control_calls(&k)
                    .iter()
                    .any(|cc| cc.outcome.starts_with("disconnected"))
            {
                break;
            }
        }
        let cut = wait_control_call(&k, |cc| {
            cc.method == "Watch" && cc.outcome.starts_with("disconnected")
        });
        assert!(cut.outcome.contains("not reading"), "{cut:?}");
        // The slow client reads what was queued, then the reason.
        let ended = tokio::time::timeout(Duration::from_secs(10), async {
            let mut n = 0u64;
            loop {
                match slow.message().await {
                    Ok(Some(_)) => n += 1,
                    Ok(None) => return (n, None),
                    Err(s) => return (n, Some(s)),
                }
            }
        })
        .await
        .expect("the slow stream ends");
        let status = ended.1.expect("ended with a status");
        assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
        assert!(status.message().contains("watch_buffer"), "{status:?}");
        eprintln!(
            "slow watcher cut off after {calls} calls; it had {} events queued",
            ended.0
        );
        // The agent goes on.
        c.status(v1::StatusRequest {}).await.unwrap();
    });
    k.knock_ok(false, &k.mint(&[INVOKE], TOKEN_TTL), SERVICE, &[]);
}

#[test]
fn a_flood_of_calls_is_rate_limited_per_caller_and_knocks_still_admit() {
    let _serial = serial();
    let k = KnockEnv::start(
        "ctlflood",
        &KnockSettings {
            control: "calls_per_sec = 5\ncalls_burst = 5\n".into(),
            ..KnockSettings::default()
        },
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (ok, limited, took) = rt.block_on(async {
        let mut c = client(&k.env).await;
        let (mut ok, mut limited) = (0u32, 0u32);
        let started = Instant::now();
        for _ in 0..60 {
            match c.status(v1::StatusRequest {}).await {
                Ok(_) => ok += 1,
                Err(s) if s.code() == tonic::Code::ResourceExhausted => {
                    assert!(s.message().contains("calls_per_sec"), "{s:?}");
                    limited += 1;
                }
                Err(s) => panic!("unexpected status {s:?}"),
            }
        }
        (ok, limited, started.elapsed())
    });
    let allowed = 5 + (took.as_secs_f64() * 5.0).ceil() as u32;
    assert!(
        ok <= allowed,
        "{ok} calls allowed in {took:?} (at most {allowed})"
    );
    assert!(limited >= 60 - allowed, "{limited} refused");
    // Knocks do not share the control API's budget.
    k.knock_ok(false, &k.mint(&[INVOKE], TOKEN_TTL), SERVICE, &[]);
    // The trail holds the 1st, 2nd, 4th, ... refusal, not every one.
    let records = portcullis_testkit::poll_until(Duration::from_secs(5), || {
        let n = control_calls(&k)
            .iter()
            .filter(|c| c.outcome.starts_with("rate limited"))
            .count();
        (n > 0).then_some(n)
    })
    .expect("rate limiting is on the record");
    let bound = (f64::from(limited)).log2().floor() as usize + 1;
    assert!(records <= bound, "{records} records for {limited} refusals");
}

#[test]
fn shadow_mode_passes_unadmitted_traffic_counting_it_then_enforce_drops_it() {
    let _serial = serial();
    let k = KnockEnv::start(
        "ctlshadow",
        &KnockSettings {
            service_extra: "mode = \"shadow\"".into(),
            audit: "report_interval_secs = 1".into(),
            ..KnockSettings::default()
        },
    );
    let _server = k.env.echo_server(false, PROTECTED_PORT);
    let s = ctl_json(&k.env, None, &["status"]);
    assert_eq!(s["shadow_services"], serde_json::json!([SERVICE]), "{s}");

    // Nobody is admitted, yet the connection works: counted, not dropped.
    k.env.assert_echo(false, PROTECTED_PORT, "shadow mode");
    let stats = ctl_json(&k.env, None, &["stats"]);
    assert!(
        stats["shadow_drops"]["no_admission"].as_u64().unwrap() >= 1,
        "{stats}"
    );
    assert_eq!(stats["drops"]["no_admission"], 0, "{stats}");
    // The drop summary says what would have dropped, marked as shadow.
    let summary = portcullis_testkit::poll_until(Duration::from_secs(10), || {
        k.env.spool_events().into_iter().find_map(|e| match e.body {
            Some(Body::DropSummary(d))
                if d.reasons.iter().any(|r| r.reason == "shadow_no_admission") =>
            {
                Some(d)
            }
            _ => None,
        })
    })
    .expect("a drop summary with shadow_no_admission");
    assert!(
        !summary.reasons.iter().any(|r| r.reason == "no_admission"),
        "{summary:?}"
    );

    // A viewer may look but not switch.
    let e = ctl_refused(
        &k.env,
        Some(VIEWER),
        &["services", "set-mode", SERVICE, "enforce"],
    );
    assert!(
        e.contains("PermissionDenied") || e.contains("cannot reach"),
        "{e}"
    );
    let e = ctl_refused(&k.env, None, &["services", "set-mode", SERVICE, "off"]);
    assert!(
        e.contains("InvalidArgument") && e.contains("enforce"),
        "{e}"
    );

    // Enforce: the same traffic is dropped.
    let svc = ctl_json(&k.env, None, &["services", "set-mode", SERVICE, "enforce"]);
    assert_eq!(svc[0]["mode"], "enforce", "{svc}");
    k.env
        .assert_dropped(false, PROTECTED_PORT, false, "enforcing after the switch");
    let stats = ctl_json(&k.env, None, &["stats"]);
    assert!(
        stats["drops"]["no_admission"].as_u64().unwrap() >= 1,
        "{stats}"
    );
    let switch = wait_control_call(&k, |c| c.method == "Services.SetMode" && c.outcome == "ok");
    assert_eq!(switch.request, format!("service={SERVICE} mode=enforce"));
    assert_eq!(switch.role, "operator");

    // And back.
    ctl_json(&k.env, None, &["services", "set-mode", SERVICE, "shadow"]);
    k.env.assert_echo(false, PROTECTED_PORT, "shadow again");
}

#[test]
fn over_tcp_only_with_a_client_certificate_whose_subject_has_a_role() {
    use portcullis_e2e::pki::{Ca, Pki};
    let _serial = serial();
    let pki = Pki::new("ctltls");
    let server_ca = Ca::new("portcullis node ca");
    let clients = Ca::new("portcullis operators ca");
    let stranger = Ca::new("someone else's ca");
    let (cert, key) = server_ca.leaf(&["portcullis-node"], false);
    let files = |name: &str, (c, k): (String, String)| {
        (
            pki.write(&format!("{name}.pem"), &c),
            pki.write(&format!("{name}.key"), &k),
        )
    };
    let (server_cert, server_key) = files("server", (cert, key));
    let server_ca_file = pki.write("server-ca.pem", &server_ca.pem());
    let client_ca_file = pki.write("clients-ca.pem", &clients.pem());
    let ops = files("ops", clients.leaf(&["ops-automation"], true));
    let dash = files("dash", clients.leaf(&["dashboard"], true));
    let nobody = files("nobody", clients.leaf(&["nobody"], true));
    let forged = files("forged", stranger.leaf(&["ops-automation"], true));

    let k = KnockEnv::start(
        "ctltls",
        &KnockSettings {
            control: format!(
                "listen = \"0.0.0.0:7444\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\nclient_ca = \"{}\"\n\
                 operators = [\"cert:CN=ops-automation\"]\nviewers = [\"cert:CN=dashboard\"]\n",
                server_cert.display(),
                server_key.display(),
                client_ca_file.display()
            ),
            ..KnockSettings::default()
        },
    );
    let server = k.env.topo.server_addr(false);
    let endpoint = format!("https://{server}:7444");
    // `portcullis ctl` from the client namespace with a certificate.
    let call = |(cert, key): &(std::path::PathBuf, std::path::PathBuf), args: &[&str]| {
        let mut cmd = k.env.topo.client.exec(e2e::agent_binary());
        cmd.args([
            "ctl",
            "--json",
            "--endpoint",
            &endpoint,
            "--server-name",
            "portcullis-node",
            "--ca",
        ])
        .arg(&server_ca_file)
        .arg("--cert")
        .arg(cert)
        .arg("--key")
        .arg(key)
        .args(args);
        let out = cmd.output().expect("run portcullis ctl");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, stdout, stderr) = call(&ops, &["status"]);
    assert!(ok, "{stderr}");
    let s: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(s["caller"], "cert:CN=ops-automation");
    assert_eq!(s["roles"], serde_json::json!(["operator"]));

    let (ok, stdout, stderr) = call(&dash, &["admissions"]);
    assert!(ok, "viewer lists: {stderr}");
    assert_eq!(stdout.trim(), "[]");
    let (ok, _, stderr) = call(&dash, &["revoke", "--tenant", "acme"]);
    assert!(!ok && stderr.contains("PermissionDenied"), "{stderr}");
    let (ok, _, stderr) = call(&nobody, &["status"]);
    assert!(
        !ok && stderr.contains("PermissionDenied") && stderr.contains("has none"),
        "{stderr}"
    );
    // A certificate the node's client CA did not sign never gets a call in.
    let (ok, _, stderr) = call(&forged, &["status"]);
    assert!(!ok && !stderr.contains("PermissionDenied"), "{stderr}");
    // Nor does a client without one (plain TCP is not served at all).
    let plain = k
        .env
        .topo
        .client
        .run(|| std::net::TcpStream::connect((server, 7444)).map(drop))
        .unwrap();
    assert!(plain.is_ok(), "the port is open to TLS clients");
    let mut cmd = k.env.topo.client.exec(e2e::agent_binary());
    let out = cmd
        .args(["ctl", "--endpoint", &endpoint, "status"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "no client certificate, no call");

    // Every call works over mTLS as over the socket.
    let ok_json = |who, args: &[&str]| -> serde_json::Value {
        let (ok, stdout, stderr) = call(who, args);
        assert!(ok, "{args:?}: {stderr}");
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{args:?}: {e}: {stdout}"))
    };
    let token = k.token_file(&k.mint(&[INVOKE], TOKEN_TTL));
    let client = k.env.topo.client_addr(false).to_string();
    std::thread::scope(|scope| {
        // A watcher over TLS sees the admission below as it is sealed.
        let watcher = scope.spawn(|| {
            ok_json(
                &dash,
                &["watch", "--kind", "admission_granted", "--count", "1"],
            )
        });
        // Wait (bounded) until the watch is registered as a call.
        wait_control_call(&k, |c| {
            c.method == "Watch" && c.caller == "cert:CN=dashboard"
        });
        let admitted = ok_json(
            &ops,
            &[
                "admit",
                "--service",
                SERVICE,
                "--client",
                &client,
                "--token-file",
                token.to_str().unwrap(),
            ],
        );
        assert_eq!(admitted["tenant"], TENANT, "{admitted}");
        let seen = watcher.join().unwrap();
        assert!(seen.to_string().contains(&client), "{seen}");
    });
    assert_eq!(ok_json(&dash, &["admissions"]).as_array().unwrap().len(), 1);
    ok_json(&dash, &["flows"]);
    assert!(ok_json(&dash, &["stats"])["drops"].is_object());
    ok_json(&dash, &["policy", "get"]);
    ok_json(&ops, &["services", "set-mode", SERVICE, "shadow"]);
    ok_json(&ops, &["services", "set-mode", SERVICE, "enforce"]);
    let added = ok_json(
        &ops,
        &["services", "add", "--name", "embed", "--port", "8081"],
    );
    assert_eq!(added["services"].as_array().unwrap().len(), 2);
    ok_json(&ops, &["services", "remove", "embed"]);
    let used = ok_json(
        &ops,
        &[
            "usage",
            "--identity",
            &format!("{TENANT}/alice"),
            "--service",
            SERVICE,
            "--requests",
            "1",
        ],
    );
    assert_eq!(used["duplicate"], false, "{used}");
    let revoked = ok_json(&ops, &["revoke", "--tenant", TENANT]);
    assert_eq!(revoked["admissions_removed"], 1, "{revoked}");

    let audited = wait_control_call(&k, |c| c.caller == "cert:CN=dashboard" && !c.allowed);
    assert_eq!(audited.method, "Revoke");
    assert!(
        !control_calls(&k)
            .iter()
            .any(|c| c.caller.contains("someone")),
        "the forged client never reached the API"
    );
}

#[test]
fn policy_apply_validates_first_then_swaps_through_the_hot_reload() {
    let _serial = serial();
    const FORBID_ACME: &str = "@id(\"no-acme\")\nforbid(principal, action, resource)\nwhen { principal.tenant == \"acme\" };\n";
    let live = portcullis_testkit::TempDir::new("ctlpol-live").unwrap();
    std::fs::write(live.path().join("base.cedar"), PERMIT).unwrap();
    let k = KnockEnv::start(
        "ctlpolapply",
        &KnockSettings {
            policy_dir: Some(live.path().to_path_buf()),
            ..KnockSettings::default()
        },
    );
    let _server = k.env.echo_server(false, PROTECTED_PORT);
    k.knock_ok(false, &k.mint(&[INVOKE], TOKEN_TTL), SERVICE, &[]);
    let stream = k
        .env
        .connect(false, PROTECTED_PORT, Duration::from_secs(2))
        .expect("admitted");
    let echo = EchoLoop::start(stream, Instant::now() + Duration::from_secs(20));
    assert!(echo.wait_for(10, Duration::from_secs(5)));
    let before = ctl_json(&k.env, None, &["policy", "get"])["version"].clone();

    // A broken candidate: refused, nothing written, nothing changes.
    let broken = portcullis_testkit::TempDir::new("ctlpol-broken").unwrap();
    std::fs::write(broken.path().join("base.cedar"), "permit(principal,").unwrap();
    let out = ctl(
        &k.env,
        None,
        &["policy", "apply", broken.path().to_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["valid"], false, "{v}");
    assert_eq!(
        std::fs::read_to_string(live.path().join("base.cedar")).unwrap(),
        PERMIT
    );
    assert_eq!(
        ctl_json(&k.env, None, &["policy", "get"])["version"],
        before
    );
    assert!(echo.wait_for(40, Duration::from_secs(5)), "still admitted");

    // A valid one that forbids the tenant: applied, audited, the live
    // connection cut by the re-decision.
    let next = portcullis_testkit::TempDir::new("ctlpol-next").unwrap();
    std::fs::write(next.path().join("base.cedar"), PERMIT).unwrap();
    std::fs::write(next.path().join("tenant.cedar"), FORBID_ACME).unwrap();
    let applied = ctl_json(
        &k.env,
        None,
        &["policy", "apply", next.path().to_str().unwrap()],
    );
    assert_eq!(applied["valid"], true, "{applied}");
    assert_ne!(applied["version"], before);
    assert_eq!(
        ctl_json(&k.env, None, &["policy", "get"])["version"],
        applied["version"]
    );
    assert!(
        live.path().join("tenant.cedar").exists(),
        "written to policy.dir"
    );
    let out = echo.join();
    assert!(
        out.failed_at.is_some(),
        "the forbidden tenant's connection is cut"
    );
    let change = portcullis_testkit::poll_until(Duration::from_secs(5), || {
        k.env.spool_events().into_iter().find_map(|e| match e.body {
            Some(Body::PolicyChange(p)) if p.accepted => Some(p),
            _ => None,
        })
    })
    .expect("the swap is audited like a hot reload");
    assert_eq!(serde_json::json!(change.new_version), applied["version"]);
    let call = wait_control_call(&k, |c| c.method == "Policy.Apply" && c.outcome == "ok");
    assert_eq!(call.role, "operator");
    assert!(
        !k.env
            .spool_events()
            .iter()
            .any(|e| matches!(&e.body, Some(Body::PolicyChange(p)) if !p.accepted)),
        "the broken candidate never reached the directory"
    );
}

#[test]
fn sighup_applies_services_and_findings_and_reports_what_needs_a_restart() {
    let _serial = serial();
    let mut k = KnockEnv::start("ctlhup", &KnockSettings::default());
    let _open = k.env.echo_server(false, OPEN_PORT);
    k.env
        .connect(false, OPEN_PORT, Duration::from_secs(2))
        .expect("OPEN_PORT is not protected yet");
    k.env.edit_config(|c| {
        format!(
            "{c}\n[findings]\nflood_per_sec = 5\n[metrics]\nlisten = \"127.0.0.1:19191\"\n[[services]]\nname = \"embed\"\nport = {OPEN_PORT}\n"
        )
    });
    let pid = k.env.agent().pid().expect("agent pid") as libc::pid_t;
    // SAFETY: kill(2) on the test's own child.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
    assert!(
        k.wait_log("config sections applied", Duration::from_secs(5)),
        "{}",
        k.log()
    );
    let log = e2e::knock::strip_ansi(&k.log());
    let applied = log
        .lines()
        .find(|l| l.contains("config sections applied"))
        .unwrap();
    assert!(
        applied.contains("services,findings") && applied.contains("embed"),
        "{applied}"
    );
    let restart = log
        .lines()
        .find(|l| l.contains("take effect at the next restart"))
        .expect("the rest is reported");
    assert!(
        restart.contains("metrics") && !restart.contains("services"),
        "{restart}"
    );
    // The file's new service is enforced in the kernel now.
    let services = ctl_json(&k.env, None, &["services"]);
    assert!(
        services
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["name"] == "embed" && s["mode"] == "enforce"),
        "{services}"
    );
    k.env
        .assert_dropped(false, OPEN_PORT, false, "embed is protected after SIGHUP");
    // A file that no longer loads is reported; the agent runs on.
    k.env
        .edit_config(|c| format!("{c}\n[findings]\nbogus = 1\n"));
    assert_eq!(unsafe { libc::kill(pid, libc::SIGHUP) }, 0);
    assert!(
        k.wait_log("the running config stays", Duration::from_secs(5)),
        "{}",
        k.log()
    );
    ctl_json(&k.env, None, &["status"]);
    k.knock_ok(false, &k.mint(&[INVOKE], TOKEN_TTL), SERVICE, &[]);
}

/// A Kubernetes ConfigMap update: the file is replaced under its name (a
/// new file renamed over it), no signal is sent, and the agent applies it
/// within a couple of seconds.
#[test]
fn a_config_file_replaced_in_place_is_applied_without_a_signal() {
    let _serial = serial();
    let mut k = KnockEnv::start("ctlwatch", &KnockSettings::default());
    let _open = k.env.echo_server(false, OPEN_PORT);
    k.env
        .connect(false, OPEN_PORT, Duration::from_secs(2))
        .expect("OPEN_PORT is not protected yet");
    let path = k.env.config.clone();
    let text = std::fs::read_to_string(&path).unwrap();
    let staged = path.with_extension("staged");
    std::fs::write(
        &staged,
        format!("{text}\n[[services]]\nname = \"embed\"\nport = {OPEN_PORT}\n"),
    )
    .unwrap();
    std::fs::rename(&staged, &path).unwrap();
    assert!(
        k.wait_log("config sections applied", Duration::from_secs(5)),
        "{}",
        k.log()
    );
    k.env.assert_dropped(
        false,
        OPEN_PORT,
        false,
        "embed is protected without a SIGHUP",
    );
    assert!(k.env.agent().pid().is_some(), "the agent runs on");
}

#[test]
fn services_are_added_and_removed_at_run_time_cutting_the_removed_ones_admissions() {
    let _serial = serial();
    let k = KnockEnv::start("ctlsvc", &roles_settings(""));
    open_to_other_users(&k.env);
    let _open = k.env.echo_server(false, OPEN_PORT);
    k.env
        .connect(false, OPEN_PORT, Duration::from_secs(2))
        .expect("not protected yet");
    let add = [
        "services",
        "add",
        "--name",
        "embed",
        "--port",
        "8080",
        "--price",
        "per_request_micros=5",
    ];
    assert_eq!(OPEN_PORT, 8080);
    let err = ctl_refused(&k.env, Some(VIEWER), &add);
    assert!(err.contains("PermissionDenied"), "{err}");

    // Bad edits: refused with the field, nothing changes.
    for (args, says) in [
        (
            vec!["services", "add", "--name", "dup", "--port", "8000"],
            "services[1].port",
        ),
        (
            vec!["services", "add", "--name", "llm", "--port", "8081"],
            "services[1].name",
        ),
        (
            vec![
                "services",
                "add",
                "--name",
                "x",
                "--port",
                "62201",
                "--protocol",
                "udp",
            ],
            "knock port",
        ),
        (
            vec![
                "services",
                "add",
                "--name",
                "x",
                "--port",
                "8081",
                "--protocol",
                "sctp",
            ],
            "services[1].protocol",
        ),
        (
            vec![
                "services",
                "add",
                "--name",
                "x",
                "--port",
                "8081",
                "--price",
                "per_gib=1",
            ],
            "services[1].price.per_gib",
        ),
    ] {
        let err = ctl_refused(&k.env, None, &args);
        assert!(
            err.contains("InvalidArgument") && err.contains(says),
            "{args:?}: {err}"
        );
    }
    let err = ctl_refused(&k.env, None, &["services", "remove", "nope"]);
    assert!(err.contains("NotFound"), "{err}");
    let err = ctl_refused(&k.env, None, &["services", "remove", SERVICE]);
    assert!(err.contains("only protected service"), "{err}");
    assert_eq!(
        ctl_json(&k.env, None, &["services"])
            .as_array()
            .unwrap()
            .len(),
        1
    );

    // Added: enforced in the kernel before the call returns.
    let added = ctl_json(&k.env, None, &add);
    assert!(
        added["services"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["name"] == "embed" && s["port"] == 8080 && s["mode"] == "enforce"),
        "{added}"
    );
    k.env
        .assert_dropped(false, OPEN_PORT, false, "embed is protected");
    // Knocks for it are admitted by its scope, like a configured one's.
    k.knock_ok(
        false,
        &k.mint(&["model:embed:invoke"], TOKEN_TTL),
        "embed",
        &[],
    );
    k.env
        .connect(false, OPEN_PORT, Duration::from_secs(2))
        .expect("admitted to embed");

    // Removed: its admissions are cut and recorded, the port is open
    // again, and knocks for it are refused as an unknown service.
    let removed = ctl_json(&k.env, None, &["services", "remove", "embed"]);
    assert_eq!(removed["admissions_removed"], 1, "{removed}");
    assert_eq!(removed["services"].as_array().unwrap().len(), 1);
    let rev = portcullis_testkit::poll_until(Duration::from_secs(5), || {
        k.env.spool_events().into_iter().find_map(|e| match e.body {
            Some(Body::Revocation(r)) if r.target_kind == "service" => Some(r),
            _ => None,
        })
    })
    .expect("the removal's cut is on the record");
    assert_eq!((rev.target.as_str(), rev.admissions_removed), ("embed", 1));
    k.env
        .connect(false, OPEN_PORT, Duration::from_secs(2))
        .expect("not protected any more");
    k.knock_refused(
        false,
        &k.mint(&["model:embed:invoke"], TOKEN_TTL),
        "embed",
        "removed service",
    );
    let calls: Vec<_> = control_calls(&k)
        .into_iter()
        .filter(|c| c.method.starts_with("Services."))
        .collect();
    assert!(
        calls
            .iter()
            .any(|c| c.method == "Services.Add" && c.outcome == "ok")
    );
    assert!(
        calls
            .iter()
            .any(|c| c.method == "Services.Remove" && c.outcome == "ok")
    );
    assert!(calls.iter().any(|c| !c.allowed), "the viewer's refusal too");
}

#[test]
fn report_usage_prices_what_a_model_server_served_and_a_spend_policy_refuses_the_next_knock() {
    let _serial = serial();
    // 1 currency unit this month: what the report below crosses.
    const CEILING: &str = "@id(\"spend-ceiling\")\nforbid(principal, action, resource)\nwhen { context.spend_month > 1000000 };\n";
    let pol = portcullis_testkit::TempDir::new("ctlusage-pol").unwrap();
    std::fs::write(pol.path().join("base.cedar"), PERMIT).unwrap();
    std::fs::write(pol.path().join("spend.cedar"), CEILING).unwrap();
    let k = KnockEnv::start(
        "ctlusage",
        &KnockSettings {
            policy_dir: Some(pol.path().to_path_buf()),
            // 2 per million tokens out, 0.5 per GPU-hour, 0.001 per request.
            service_extra: "price = { per_mtok_out_micros = 2000000, per_gpu_hour_micros = 500000, per_request_micros = 1000 }\n".into(),
            audit: "report_interval_secs = 1\n".into(),
            ..roles_settings("")
        },
    );
    open_to_other_users(&k.env);
    let who = format!("{TENANT}/alice");
    k.knock_ok(false, &k.mint(&[INVOKE], TOKEN_TTL), SERVICE, &[]);

    // Who may report: an admitter (and operators), not a viewer.
    let report = |user, extra: &[&str]| {
        let mut a = vec!["usage", "--identity", who.as_str(), "--service", SERVICE];
        a.extend_from_slice(extra);
        ctl(&k.env, user, &a)
    };
    let denied = report(Some(VIEWER), &["--requests", "1"]);
    assert!(!denied.status.success());
    assert!(String::from_utf8_lossy(&denied.stderr).contains("PermissionDenied"));

    // Bad reports: refused with the field named, nothing charged.
    for (args, code, says) in [
        (
            vec!["--tokens-out", "1000000001"],
            "InvalidArgument",
            "tokens_out",
        ),
        (vec![], "InvalidArgument", "empty"),
        (vec!["--gpu-ms", "10000000001"], "InvalidArgument", "gpu_ms"),
    ] {
        let out = report(Some(ADMITTER), &args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(code) && err.contains(says),
            "{args:?}: {err}"
        );
    }
    let err = ctl_refused(
        &k.env,
        Some(ADMITTER),
        &[
            "usage",
            "--identity",
            "acme/mallory",
            "--service",
            SERVICE,
            "--requests",
            "1",
        ],
    );
    assert!(
        err.contains("NotFound") && err.contains("acme/mallory"),
        "{err}"
    );
    let err = ctl_refused(
        &k.env,
        Some(ADMITTER),
        &[
            "usage",
            "--identity",
            &who,
            "--service",
            "nope",
            "--requests",
            "1",
        ],
    );
    assert!(err.contains("NotFound") && err.contains("nope"), "{err}");
    let before = ctl_json(&k.env, None, &["stats", "--identity", &who]);
    let month_before = before["identities"][0]["month_micros"].as_u64().unwrap();
    assert!(month_before < 1_000_000, "{before}");

    // A real report: 1M tokens out (2,000,000), 1.8 GPU-seconds (250),
    // 3 requests (3,000).
    let args = [
        "--tokens-out",
        "1000000",
        "--gpu-ms",
        "1800",
        "--requests",
        "3",
        "--report-id",
        "req-1",
    ];
    let out = report(Some(ADMITTER), &args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let charged: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(charged["cost_micros"], 2_003_250, "{charged}");
    assert_eq!(charged["duplicate"], false);
    let month = charged["month_micros"].as_u64().unwrap();
    assert!(month >= month_before + 2_003_250, "{charged}");
    assert!(charged["forecast_month_micros"].as_u64().unwrap() >= month);

    // A retry with the same id is acknowledged, not charged again.
    let again: serde_json::Value =
        serde_json::from_slice(&report(Some(ADMITTER), &args).stdout).unwrap();
    assert_eq!(again["duplicate"], true, "{again}");
    assert_eq!(again["cost_micros"], 0);
    assert!(again["month_micros"].as_u64().unwrap() < month + 1_000_000);

    // The policy sees the spend: the next knock is refused by the ceiling.
    k.knock_refused(
        false,
        &k.mint(&[INVOKE], TOKEN_TTL),
        SERVICE,
        "over the spend ceiling",
    );
    let denied = portcullis_testkit::poll_until(Duration::from_secs(5), || {
        k.env.spool_events().into_iter().find_map(|e| match e.body {
            Some(Body::AdmissionDenied(d)) if d.policies.iter().any(|p| p == "spend-ceiling") => {
                Some(d)
            }
            _ => None,
        })
    });
    assert!(denied.is_some(), "the refusal names the spend policy");

    // The cost report in the trail carries the reported usage.
    let line = portcullis_testkit::poll_until(Duration::from_secs(5), || {
        k.env.spool_events().into_iter().find_map(|e| match e.body {
            Some(Body::CostReport(c)) => c.lines.into_iter().find(|l| l.tokens_out > 0),
            _ => None,
        })
    })
    .expect("a cost report with the reported usage");
    assert_eq!(
        (line.tokens_out, line.gpu_ms, line.requests),
        (1_000_000, 1_800, 3)
    );
    assert!(line.cost_micros >= 2_003_250);
    // Every call is on the record, refused ones included.
    let calls: Vec<_> = control_calls(&k)
        .into_iter()
        .filter(|c| c.method == "ReportUsage")
        .collect();
    assert_eq!(calls.len(), 8, "{calls:#?}");
    assert!(calls.iter().any(|c| !c.allowed));
    assert!(
        calls
            .iter()
            .any(|c| c.outcome == "ok" && c.request.contains("report_id=req-1"))
    );
}
