//! The operations layer over HTTP: RabbitMQ's management API (paths, JSON
//! field names, error shapes) and Prometheus metrics.
//!
//! [`router`] returns the axum `Router` (tests drive it with tower's
//! `oneshot`, no socket); [`serve`] binds the two listeners at start. The
//! handlers never hold broker guards across `.await`, and reach queues only
//! through their actors' inboxes, like a channel does.
//!
//! | file | knows |
//! |---|---|
//! | `api.rs` | the HTTP handlers, one per path and verb |
//! | `ops.rs` | broker operations shared by the handlers and definitions import |
//! | `definitions.rs` | RabbitMQ's definitions format: export and import |
//! | `metrics.rs` | the Prometheus text format on its own port |
//! | `json.rs` | AMQP field tables ⇄ JSON |
//! | `stats.rs` | message totals counted on the message path |

pub mod api;
pub mod cluster;
pub mod definitions;
pub mod json;
pub mod metrics;
pub mod ops;
pub mod stats;

use crate::auth::User;
use crate::broker::Broker;
use crate::server::StartError;
use axum::Json;
use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::{StatusCode, header, request::Parts};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// What every handler gets.
#[derive(Clone)]
pub struct AppState {
    /// The broker.
    pub broker: Arc<Broker>,
}

/// The management API's routes.
pub fn router(broker: Arc<Broker>) -> axum::Router {
    api::routes().with_state(AppState { broker })
}

/// An API error: RabbitMQ's `{"error": ..., "reason": ...}` with its status.
#[derive(Debug)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Short kind ("not_found", "bad_request", "not_authorised").
    pub error: &'static str,
    /// Human-readable detail.
    pub reason: String,
}

impl ApiError {
    /// 404 Object Not Found.
    pub fn not_found() -> ApiError {
        ApiError {
            status: StatusCode::NOT_FOUND,
            error: "Object Not Found",
            reason: "Not Found".into(),
        }
    }
    /// 400.
    pub fn bad_request(reason: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            error: "bad_request",
            reason: reason.into(),
        }
    }
    /// 401.
    pub fn unauthorised(reason: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::UNAUTHORIZED,
            error: "not_authorised",
            reason: reason.into(),
        }
    }
    /// 500.
    pub fn internal(reason: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            error: "internal_error",
            reason: reason.into(),
        }
    }
}

impl From<crate::protocol::error::AmqpError> for ApiError {
    fn from(e: crate::protocol::error::AmqpError) -> Self {
        let status = match e.code {
            404 => StatusCode::NOT_FOUND,
            403 => StatusCode::FORBIDDEN,
            541 => StatusCode::INTERNAL_SERVER_ERROR,
            _ => StatusCode::BAD_REQUEST,
        };
        ApiError {
            status,
            error: if status == StatusCode::NOT_FOUND {
                "not_found"
            } else {
                "bad_request"
            },
            reason: e.text,
        }
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        ApiError::internal(format!("definitions store: {e}"))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Json(serde_json::json!({"error": self.error, "reason": self.reason}));
        if self.status == StatusCode::UNAUTHORIZED {
            (
                self.status,
                [(
                    header::WWW_AUTHENTICATE,
                    "Basic realm=\"RabbitMQ Management\"",
                )],
                body,
            )
                .into_response()
        } else {
            (self.status, body).into_response()
        }
    }
}

/// The authenticated caller (HTTP basic auth, same users as AMQP).
#[derive(Debug, Clone)]
pub struct Caller {
    /// The user.
    pub user: User,
}

impl Caller {
    /// Administrator tag: may change anything.
    pub fn is_admin(&self) -> bool {
        self.user.has_tag("administrator")
    }

    /// Sees every vhost (administrator, monitoring).
    pub fn sees_all(&self) -> bool {
        self.is_admin() || self.user.has_tag("monitoring")
    }

    /// Refuses non-administrators, as RabbitMQ does for writes.
    pub fn require_admin(&self) -> Result<(), ApiError> {
        if self.is_admin() {
            Ok(())
        } else {
            Err(ApiError::unauthorised("Not administrator user"))
        }
    }

    /// Administrator or policymaker (policies).
    pub fn require_policymaker(&self) -> Result<(), ApiError> {
        if self.is_admin() || self.user.has_tag("policymaker") {
            Ok(())
        } else {
            Err(ApiError::unauthorised("Not policymaker user"))
        }
    }

    /// May see this vhost's objects.
    pub fn can_see(&self, broker: &Broker, vhost: &str) -> bool {
        self.sees_all() || broker.users.can_access(&self.user.name, vhost)
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let failed = || ApiError::unauthorised("Login failed");
        let auth = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(failed)?;
        let b64 = auth.strip_prefix("Basic ").ok_or_else(failed)?;
        let raw = base64::engine::general_purpose::STANDARD
            .decode(b64.trim())
            .map_err(|_| failed())?;
        let raw = String::from_utf8(raw).map_err(|_| failed())?;
        let (name, pass) = raw.split_once(':').ok_or_else(failed)?;
        // In-process (oneshot) requests carry no peer: treat them as local.
        let loopback = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .is_none_or(|c| c.0.ip().is_loopback());
        let user = state
            .broker
            .users
            .login(name, pass, loopback)
            .map_err(|_| failed())?;
        if !["administrator", "monitoring", "management", "policymaker"]
            .iter()
            .any(|t| user.has_tag(t))
        {
            return Err(ApiError::unauthorised("Not management user"));
        }
        Ok(Caller { user })
    }
}

/// Binds the management and metrics listeners (when enabled) and serves
/// them until shutdown. Returns their addresses.
pub async fn serve(
    broker: &Arc<Broker>,
    shutdown: watch::Receiver<bool>,
) -> Result<(Option<SocketAddr>, Option<SocketAddr>), StartError> {
    let cfg = &broker.config;
    let mut mgmt_addr = None;
    if cfg.mgmt.enabled {
        let (listener, addr) = listen(
            "management API",
            &cfg.mgmt.bind,
            cfg.mgmt.port,
            "--mgmt-port",
        )
        .await?;
        let app = router(broker.clone()).into_make_service_with_connect_info::<SocketAddr>();
        let stop = stopped(shutdown.clone());
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app)
                .with_graceful_shutdown(stop)
                .await
            {
                tracing::error!("management API server failed: {e}");
            }
        });
        tracing::info!(%addr, "management API listening on http://{addr}");
        mgmt_addr = Some(addr);
    }
    let mut metrics_addr = None;
    if cfg.metrics.enabled {
        let (listener, addr) = listen(
            "Prometheus metrics",
            &cfg.metrics.bind,
            cfg.metrics.port,
            "--metrics-port",
        )
        .await?;
        let app = metrics::router(broker.clone());
        let stop = stopped(shutdown);
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app)
                .with_graceful_shutdown(stop)
                .await
            {
                tracing::error!("metrics server failed: {e}");
            }
        });
        tracing::info!(%addr, "Prometheus metrics on http://{addr}/metrics");
        metrics_addr = Some(addr);
    }
    Ok((mgmt_addr, metrics_addr))
}

fn stopped(
    mut shutdown: watch::Receiver<bool>,
) -> impl std::future::Future<Output = ()> + Send + 'static {
    async move {
        let _ = shutdown.wait_for(|s| *s).await;
    }
}

async fn listen(
    what: &'static str,
    bind: &str,
    port: u16,
    flag: &'static str,
) -> Result<(TcpListener, SocketAddr), StartError> {
    let addr = format!("{bind}:{port}");
    let err = |source| StartError::HttpBind {
        what,
        addr: addr.clone(),
        flag,
        source,
    };
    let listener = TcpListener::bind(&addr).await.map_err(err)?;
    let local = listener.local_addr().map_err(err)?;
    Ok((listener, local))
}
