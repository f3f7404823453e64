//! The door of a master: whatever its role, it listens; it serves the API while it leads, and
//! otherwise redirects (307) to the leader, or answers 503 with `Retry-After` while no master
//! leads. `GET /v1/leader`, `GET /v1/health` and `GET /metrics` are answered by every master;
//! health is 200 only while the master serves (leads, or follows a known leader), 503 with the
//! reason while it loads its state or no master leads.
//!
//! A term's routes (`http::router`) are built when the term begins and dropped when it ends, so
//! nothing of a past term can answer for the present one.

use crate::core::{now, Core};
use crate::leader::LeaderInfo;
use crate::metrics::Metrics;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use capstan_api::wire::{rfc3339, ErrorBody, ErrorDetail, LeaderView, LEADER_HEADER};
use capstan_model::Timestamp;
use parking_lot::RwLock;
use std::sync::Arc;
use tower::ServiceExt as _;

/// What this master is doing now.
#[derive(Clone)]
pub enum Role {
    /// Campaigning, or loading the state for a term it won.
    Starting,
    Leading {
        core: Arc<Core>,
        routes: Router,
    },
    Following {
        leader: Option<LeaderInfo>,
    },
}

pub struct Front {
    role: RwLock<(Role, Timestamp)>,
    pub me: String,
    pub store: String,
    pub metrics: Arc<Metrics>,
    /// A follower's standby copy: the log index it is at (0: none).
    pub standby_index: Arc<std::sync::atomic::AtomicU64>,
}

impl Front {
    pub fn new(me: String, store: String, metrics: Arc<Metrics>) -> Front {
        Front { role: RwLock::new((Role::Starting, now())), me, store, metrics, standby_index: Default::default() }
    }

    pub fn set(&self, role: Role) {
        // What `since` dates: the role, and whom a follower follows.
        fn seen(role: &Role) -> (u8, Option<&str>) {
            match role {
                Role::Starting => (0, None),
                Role::Leading { .. } => (1, None),
                Role::Following { leader } => (2, leader.as_ref().map(|l| l.url.as_str())),
            }
        }
        let mut r = self.role.write();
        if seen(&r.0) != seen(&role) {
            r.1 = now();
        }
        self.metrics.leader.set(i64::from(matches!(role, Role::Leading { .. })));
        r.0 = role;
    }

    pub fn role(&self) -> Role {
        self.role.read().0.clone()
    }

    /// The core of the term this master leads, if it leads.
    pub fn core(&self) -> Option<Arc<Core>> {
        match &self.role.read().0 {
            Role::Leading { core, .. } if !core.is_closed() => Some(core.clone()),
            _ => None,
        }
    }

    fn view(&self) -> LeaderView {
        let (role, since) = self.role.read().clone();
        let standby = self.standby_index.load(std::sync::atomic::Ordering::SeqCst);
        let (word, leader, epoch, index) = match &role {
            Role::Starting => ("starting", None, 0, 0),
            Role::Leading { core, .. } if core.is_closed() => ("starting", None, 0, 0),
            Role::Leading { core, .. } => ("leader", Some(self.me.clone()), core.epoch, core.state.read().index),
            Role::Following { leader: Some(l) } => ("follower", Some(l.url.clone()), l.epoch, standby),
            Role::Following { leader: None } => ("follower", None, 0, standby),
        };
        LeaderView {
            role: word.into(),
            me: self.me.clone(),
            leader,
            epoch,
            index,
            store: self.store.clone(),
            since: rfc3339(since),
        }
    }
}

pub fn router(front: Arc<Front>) -> Router {
    Router::new().route("/v1/leader", get(leader)).fallback(dispatch).with_state(front)
}

async fn leader(State(front): State<Arc<Front>>) -> Json<LeaderView> {
    Json(front.view())
}

async fn dispatch(State(front): State<Arc<Front>>, req: Request) -> Response {
    let role = front.role();
    if let Role::Leading { core, routes } = &role {
        if !core.is_closed() {
            return match routes.clone().oneshot(req).await {
                Ok(resp) => resp,
                Err(never) => match never {},
            };
        }
    }
    let path = req.uri().path();
    if req.method() == axum::http::Method::GET && path == "/v1/health" {
        return health(&front, &role);
    }
    if req.method() == axum::http::Method::GET && path == "/metrics" {
        let text = front.metrics.render(&capstan_state::ClusterState::default());
        return ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], text)
            .into_response();
    }
    match role {
        Role::Following { leader: Some(l) } => {
            let target = format!(
                "{}{}",
                l.url.trim_end_matches('/'),
                req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/")
            );
            let mut resp = failure(
                StatusCode::TEMPORARY_REDIRECT,
                "not_leader",
                format!("this master ({}) follows; the leader is {}", front.me, l.url),
            );
            if let Ok(v) = HeaderValue::from_str(&target) {
                resp.headers_mut().insert(header::LOCATION, v);
            }
            if let Ok(v) = HeaderValue::from_str(&l.url) {
                resp.headers_mut().insert(LEADER_HEADER, v);
            }
            resp
        }
        _ => {
            let mut resp = failure(
                StatusCode::SERVICE_UNAVAILABLE,
                "no_leader",
                format!("no master leads yet ({} is {}); retry in a second", front.me, front.view().role),
            );
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            resp.headers_mut().insert(LEADER_HEADER, HeaderValue::from_static("none"));
            resp
        }
    }
}

/// `GET /v1/health` when no term of this master serves: 200 only while it serves (a follower
/// that knows the leader serves by sending clients there); 503 with the reason while it loads its
/// state or no master leads, because then it refuses everything else too.
fn health(front: &Front, role: &Role) -> Response {
    let view = front.view();
    let not_serving = match role {
        Role::Following { leader: Some(_) } => None,
        Role::Following { leader: None } => {
            Some(("no_leader", format!("no master leads yet ({} follows); retry in a second", front.me)))
        }
        Role::Starting | Role::Leading { .. } => Some((
            "starting",
            format!(
                "this master ({}) is loading the cluster state from its store (replaying its log) and serves \
                 nothing else until it is done; retry in a second",
                front.me
            ),
        )),
    };
    match not_serving {
        None => Json(serde_json::json!({"status": "ok", "role": view.role, "leader": view.leader,
            "version": env!("CARGO_PKG_VERSION")}))
        .into_response(),
        Some((code, message)) => {
            let mut resp = failure(StatusCode::SERVICE_UNAVAILABLE, code, message);
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            resp.headers_mut().insert(LEADER_HEADER, HeaderValue::from_static("none"));
            resp
        }
    }
}

fn failure(status: StatusCode, code: &str, message: String) -> Response {
    let body = ErrorBody { error: ErrorDetail { code: code.into(), message, details: vec![] } };
    let mut resp = (status, Json(body)).into_response();
    *resp.status_mut() = status;
    resp
}
