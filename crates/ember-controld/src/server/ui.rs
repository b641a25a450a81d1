//! The dashboard at `/ui`: three static files embedded in the binary
//! (`ui/index.html`, `ui/app.js`, `ui/style.css`; no build step), and
//! `GET /v1/overview`, the one JSON view the dashboard needs that the
//! rest of the API does not give: each deployment's warm target beside
//! the idle runners nodes report for its warm key, and the cache's hit
//! ratio when one is configured ([`ServerConfig::cache_url`](super::ServerConfig::cache_url)).
//!
//! The page is plain JavaScript that polls the client API (`/v1/runs`,
//! `/v1/nodes`, `/v1/overview`, `/metrics` for the start-time histograms,
//! `/v1/runs/{id}/logs`) every second, so it updates without a reload.
//! Auth: the static files carry no data and are served to anyone; every
//! request the page makes for data sends the client token as a bearer
//! header. The page asks for the token once (or takes it from the URL's
//! `#token=` fragment, which never reaches a server) and keeps it in
//! `sessionStorage`, so it is gone when the tab closes.

use std::collections::HashMap;
use std::time::Duration;

use axum::extract::State;
use axum::http::{StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use ember_control::model::{Millis, RunId, RunState};
use ember_control::phase::PHASES;
use ember_control::store::RunFilter;

use super::error::json_response;
use super::routes::query_pairs;
use super::{ApiError, Shared};

const INDEX: &str = include_str!("ui/index.html");
const APP: &str = include_str!("ui/app.js");
const STYLE: &str = include_str!("ui/style.css");

fn file(content_type: &'static str, body: &'static str) -> Response {
    (
        StatusCode::OK,
        [
            (header::CONTENT_TYPE, content_type),
            // The files change with the binary, not between requests.
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// `GET /ui`.
pub(super) async fn index() -> Response {
    file("text/html; charset=utf-8", INDEX)
}

/// `GET /ui/app.js`.
pub(super) async fn app() -> Response {
    file("text/javascript; charset=utf-8", APP)
}

/// `GET /ui/style.css`.
pub(super) async fn style() -> Response {
    file("text/css; charset=utf-8", STYLE)
}

/// One deployment in [`Overview`].
#[derive(Debug, serde::Serialize)]
struct DeploymentWarmth {
    name: String,
    /// Idle runners it asks nodes to keep (`warm_runners`).
    warm_runners: u32,
    /// Idle runners of its warm key the nodes last reported, all nodes.
    idle_runners: u32,
    /// Its runs waiting in the queue.
    queued: u64,
}

/// The cache's figures in [`Overview`], from its `/metrics`.
#[derive(Debug, Default, serde::Serialize)]
struct CacheFigures {
    url: String,
    /// Requests answered from the cache (blobs and manifests).
    hits: f64,
    /// Requests that needed the upstream.
    misses: f64,
    /// `hits / (hits + misses)`; `None` before any request.
    hit_ratio: Option<f64>,
    /// Bytes received from upstreams.
    upstream_bytes: f64,
    /// Bytes sent to clients.
    served_bytes: f64,
    /// Why the figures are missing, if the cache could not be read.
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// One run in [`Overview`], with its start time by phase.
#[derive(Debug, serde::Serialize)]
struct RunPhases {
    id: RunId,
    state: RunState,
    deployment: Option<String>,
    node: Option<String>,
    submitted_at: Millis,
    exit_code: Option<i32>,
    error: Option<String>,
    /// `[name, ms]` per phase of [`ember_control::phase::PHASES`], in
    /// order (the last is the total); `ms` is `null` until known.
    phases: Vec<(&'static str, Option<Millis>)>,
}

/// `GET /v1/overview`.
#[derive(Debug, serde::Serialize)]
struct Overview {
    /// The newest runs that match the query (at most [`OVERVIEW_RUNS`]).
    runs: Vec<RunPhases>,
    deployments: Vec<DeploymentWarmth>,
    /// `null` when no cache is configured.
    cache: Option<CacheFigures>,
}

/// Runs in one [`Overview`].
const OVERVIEW_RUNS: usize = 200;

/// `GET /v1/overview?state=S[,S]&deployment=D`: see the module docs. The
/// phases are computed here, from the one definition in
/// [`ember_control::phase`], so the page never re-defines them.
pub(super) async fn overview(State(s): State<Shared>, uri: Uri) -> Result<Response, ApiError> {
    let mut wanted = RunFilter {
        limit: Some(OVERVIEW_RUNS),
        ..RunFilter::default()
    };
    for (k, v) in query_pairs(&uri) {
        match k.as_str() {
            "state" => {
                for st in v.split(',') {
                    wanted.states.push(RunState::parse(st).ok_or_else(|| {
                        ApiError::BadRequest(format!("unknown run state {st:?}"))
                    })?);
                }
            }
            "deployment" => wanted.deployment = Some(v),
            _ => {}
        }
    }
    let filter = RunFilter {
        states: vec![RunState::Queued],
        ..RunFilter::default()
    };
    let (runs, deployments, nodes, queued) = s
        .db(move |st| {
            Ok((
                st.list_runs(&wanted)?,
                st.list_deployments()?,
                st.list_nodes()?,
                st.list_runs(&filter)?,
            ))
        })
        .await?;
    let runs = runs
        .into_iter()
        .map(|r| RunPhases {
            phases: PHASES.iter().map(|p| (p.name, (p.of)(&r.times))).collect(),
            id: r.id,
            state: r.state,
            deployment: r.deployment,
            node: r.node,
            submitted_at: r.submitted_at,
            exit_code: r.exit_code,
            error: r.error,
        })
        .collect();
    let mut idle: HashMap<&str, u32> = HashMap::new();
    for n in &nodes {
        for (k, c) in &n.spec.inventory.idle_runners {
            *idle.entry(k.as_str()).or_default() += c;
        }
    }
    let mut waiting: HashMap<&str, u64> = HashMap::new();
    for r in &queued {
        if let Some(d) = &r.deployment {
            *waiting.entry(d.as_str()).or_default() += 1;
        }
    }
    let deployments = deployments
        .iter()
        .map(|d| DeploymentWarmth {
            name: d.spec.name.clone(),
            warm_runners: d.spec.warm_runners,
            idle_runners: idle.get(d.spec.warm_key().as_str()).copied().unwrap_or(0),
            queued: waiting.get(d.spec.name.as_str()).copied().unwrap_or(0),
        })
        .collect();
    let cache = match &s.config.cache_url {
        Some(url) => Some(cache_figures(url).await),
        None => None,
    };
    Ok(json_response(
        StatusCode::OK,
        &Overview {
            runs,
            deployments,
            cache,
        },
    ))
}

/// Reads the cache's `/metrics`; a failure is reported in the figures,
/// not as an error of the whole overview.
async fn cache_figures(url: &str) -> CacheFigures {
    let mut f = CacheFigures {
        url: url.to_owned(),
        ..CacheFigures::default()
    };
    let text = async {
        let http = ember_http::client::builder(&[url])
            .timeout(Duration::from_secs(2))
            .build()?;
        http.get(format!("{}/metrics", url.trim_end_matches('/')))
            .send()
            .await?
            .error_for_status()?
            .text()
            .await
    }
    .await;
    let text = match text {
        Ok(t) => t,
        Err(e) => {
            f.error = Some(format!(
                "reading the cache's metrics: {}",
                ember_error::chain(&e)
            ));
            return f;
        }
    };
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((name, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(v) = value.parse::<f64>() else {
            continue;
        };
        let metric = name.split('{').next().unwrap_or(name);
        match metric {
            "ember_cache_hits_total" => f.hits += v,
            "ember_cache_misses_total" => f.misses += v,
            "ember_cache_upstream_bytes_total" => f.upstream_bytes += v,
            "ember_cache_served_bytes_total" => f.served_bytes += v,
            _ => {}
        }
    }
    let all = f.hits + f.misses;
    f.hit_ratio = (all > 0.0).then(|| f.hits / all);
    f
}
