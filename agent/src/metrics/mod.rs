//! The Prometheus endpoint: `GET /metrics` on `metrics.listen` (off by
//! default, loopback unless allowed: `agent/src/config/metrics.rs`). Plain
//! HTTP/1; at most a few scrapes at a time, each bounded in time, so the
//! endpoint cannot be used to tie the agent up.

mod budgets;
pub mod families;

use std::{convert::Infallible, sync::Arc, time::Duration};

use anyhow::Context;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::{net::TcpListener, sync::Semaphore, sync::watch};

use crate::{config::MetricsSection, daemon::node::Node};

/// Scrapes served at once; more wait for a slot.
const CONCURRENT: usize = 4;
/// A connection (request and response) must finish within this.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);

/// The OpenMetrics text the encoder writes, for scrapers that ask for it.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The Prometheus text format (0.0.4) everyone else gets (`promtool check
/// metrics`, curl).
const TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

pub struct Listening {
    listener: TcpListener,
}

/// Binds `metrics.listen`, if set.
pub async fn bind(cfg: &MetricsSection) -> anyhow::Result<Option<Listening>> {
    let Some(addr) = cfg.listen else {
        return Ok(None);
    };
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("metrics.listen {addr}: cannot listen there"))?;
    Ok(Some(Listening { listener }))
}

impl Listening {
    pub fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves scrapes until `stop` turns true.
    pub async fn serve(self, node: Arc<Node>, mut stop: watch::Receiver<bool>) {
        let slots = Arc::new(Semaphore::new(CONCURRENT));
        if let Ok(addr) = self.listener.local_addr() {
            tracing::info!(event = "metrics_listening", %addr, "metrics endpoint listening");
        }
        loop {
            let accepted = tokio::select! {
                a = self.listener.accept() => a,
                _ = stop.wait_for(|s| *s) => return,
            };
            let Ok((stream, _)) = accepted else {
                continue;
            };
            let Ok(permit) = slots.clone().acquire_owned().await else {
                return;
            };
            let node = node.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let node = node.clone();
                    async move { Ok::<_, Infallible>(respond(&node, &req)) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc);
                let _ = tokio::time::timeout(CONNECTION_TIMEOUT, conn).await;
                drop(permit);
            });
        }
    }
}

fn respond(node: &Node, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, ctype: &str, body: String| {
        Response::builder()
            .status(status)
            .header("content-type", ctype)
            .body(Full::new(Bytes::from(body)))
            .unwrap_or_default()
    };
    if req.method() != hyper::Method::GET || req.uri().path() != "/metrics" {
        return reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "GET /metrics\n".to_string(),
        );
    }
    let openmetrics = req
        .headers()
        .get_all(hyper::header::ACCEPT)
        .iter()
        .any(|v| {
            v.to_str()
                .is_ok_and(|v| v.contains("application/openmetrics-text"))
        });
    match families::render(node) {
        Ok(text) if openmetrics => reply(StatusCode::OK, OPENMETRICS, text),
        Ok(text) => reply(StatusCode::OK, TEXT, families::to_text_format(&text)),
        Err(e) => {
            tracing::warn!(event = "metrics_failed", error = %e, "scrape failed");
            reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain",
                format!("kernel maps: {e}\n"),
            )
        }
    }
}
