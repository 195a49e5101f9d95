//! The agent's knock path in process, wired as `agent/src/daemon/mod.rs`
//! wires it: the knock service over the real eBPF maps (programs loaded,
//! attached nowhere) and a real audit spool with its group-commit writer.
//! The admission tests (`tests/admission_pipeline.rs`) and the admission
//! and policy benchmarks (`tests/bench/`) run knocks through it, so what
//! they measure is what the listener runs.

use std::sync::Arc;

use anyhow::{Context as _, Result};
use portcullis_agent::{
    accounting::SpendBook,
    admission::{admitter::Admitter, token::Verifier},
    audit::auditor::{Auditor, StartInfo},
    config::Config,
    daemon::knock_service::KnockService,
    enforce::{Enforcer, kernel_options},
    loader::{Origin, Unattached},
    policy::PolicyStore,
};
use portcullis_testkit::TempDir;
use portcullis_trail::node_key::NodeKey;
use tokio::task::JoinHandle;

/// What a pipeline is built from besides the config.
pub struct Parts {
    pub verifier: Arc<Verifier>,
    pub policies: Arc<PolicyStore>,
    /// Spend to date for the policy context.
    pub spend: Option<Arc<SpendBook>>,
}

/// A knock service with everything it runs on. Create it inside a tokio
/// runtime (the audit writer is a task); [`close`](Pipeline::close) ends
/// the trail.
pub struct Pipeline {
    pub service: Arc<KnockService>,
    pub admitter: Arc<Admitter>,
    pub enforcer: Arc<Enforcer>,
    pub auditor: Auditor,
    writer: Option<JoinHandle<()>>,
    /// The spool's directory; the loaded programs live as long as this.
    _ebpf: aya::Ebpf,
    _dir: TempDir,
}

impl Pipeline {
    /// Loads the programs with the config's table sizes, writes the
    /// config into the maps, opens an audit spool in a new temporary
    /// directory (the config's `audit.spool_dir` is not used) and builds
    /// the service. Needs root.
    pub fn open(cfg: Config, parts: Parts) -> Result<Pipeline> {
        let dir = TempDir::new("pipeline").context("temp dir")?;
        let cfg = Arc::new(cfg);
        let Unattached { ebpf, maps } = Unattached::load_sized(&kernel_options(&cfg.kernel))
            .context("load the eBPF object (needs root)")?;
        let enforcer = Arc::new(Enforcer::new(maps, cfg.clone()));
        enforcer
            .configure(Origin::Fresh)
            .context("write the config into the maps")?;
        let node = Arc::new(NodeKey::generate().context("node key")?);
        let mut audit = cfg.audit.clone();
        audit.spool_dir = dir.path().join("spool");
        let (auditor, writer) = Auditor::open(
            &audit,
            &cfg.agent.node_id,
            node.clone(),
            StartInfo {
                agent_version: env!("CARGO_PKG_VERSION").into(),
                policy_version: parts.policies.current().version().to_string(),
                reason: "start".into(),
                ..StartInfo::default()
            },
        )
        .context("open the audit spool")?;
        let writer = tokio::spawn(writer.run());
        let mut admitter = Admitter::new(cfg.clone(), parts.verifier, parts.policies);
        if let Some(book) = parts.spend {
            admitter = admitter.with_spend_book(book);
        }
        let admitter = Arc::new(admitter);
        let service = Arc::new(KnockService::new(
            admitter.clone(),
            enforcer.clone(),
            auditor.clone(),
            node,
            cfg.knock.reply,
        ));
        Ok(Pipeline {
            service,
            admitter,
            enforcer,
            auditor,
            writer: Some(writer),
            _ebpf: ebpf,
            _dir: dir,
        })
    }

    /// Ends the trail (STOPPING and a final checkpoint) and waits for the
    /// writer.
    pub async fn close(mut self) -> Result<()> {
        self.auditor
            .shutdown("test done")
            .await
            .context("audit shutdown")?;
        if let Some(w) = self.writer.take() {
            w.await.context("audit writer")?;
        }
        Ok(())
    }
}
