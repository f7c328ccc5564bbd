//! The kit's parts against a small platform: the fault layer, the log, the admin
//! endpoints and the running handle, over real HTTP on loopback.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::http::StatusCode;
use axum::middleware::from_fn_with_state;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use contactsync_core::CancellationToken;
use contactsync_sandbox_kit::data::DataFile;
use contactsync_sandbox_kit::{
    admin_routes, inject_faults, log_calls, start, Answers, Injected, LogDetail, Platform, Running,
    SandboxError, Wire, WireFaults,
};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct CounterFaults {
    refuse_all: bool,
}

/// A platform that counts the calls it handled.
struct Counter {
    wire: Arc<Wire>,
    handled: AtomicU64,
    faults: Mutex<CounterFaults>,
    data: DataFile,
}

impl Platform for Counter {
    const NAME: &'static str = "Counter";
    type Faults = CounterFaults;

    fn wire(&self) -> &Wire {
        &self.wire
    }
    fn faults(&self) -> CounterFaults {
        self.faults.lock().expect("lock").clone()
    }
    fn set_faults(&self, faults: CounterFaults) {
        *self.faults.lock().expect("lock") = faults;
    }
    fn reset(&self) {
        self.handled.store(0, Ordering::SeqCst);
    }
    fn save(&self) -> Result<(), SandboxError> {
        let handled = self.handled.load(Ordering::SeqCst);
        self.data.save(|encode| encode(&handled))
    }
}

const ANSWERS: Answers = Answers {
    throttled: || (StatusCode::SERVICE_UNAVAILABLE, "slow down").into_response(),
    failed: || (StatusCode::INTERNAL_SERVER_ERROR, "oops").into_response(),
};

async fn count(axum::extract::State(counter): axum::extract::State<Arc<Counter>>) -> Response {
    if counter.faults().refuse_all {
        return StatusCode::FORBIDDEN.into_response();
    }
    let n = counter.handled.fetch_add(1, Ordering::SeqCst) + 1;
    let mut response = n.to_string().into_response();
    response
        .extensions_mut()
        .insert(LogDetail(json!({ "handled": n })));
    response
}

async fn sandbox(data: Option<std::path::PathBuf>) -> (Running<Counter>, reqwest::Client) {
    let counter = Arc::new(Counter {
        wire: Arc::new(Wire::new(ANSWERS, WireFaults::default())),
        handled: AtomicU64::new(0),
        faults: Mutex::new(CounterFaults::default()),
        data: DataFile::new("Counter", data),
    });
    let router = Router::new()
        .route("/count", post(count))
        .layer(from_fn_with_state(counter.wire.clone(), inject_faults))
        .layer(from_fn_with_state(counter.wire.clone(), log_calls))
        .merge(admin_routes(counter.clone()))
        .with_state(counter.clone());
    let running = start(counter, CancellationToken::new(), 0, "", router)
        .await
        .expect("started");
    (running, reqwest::Client::new())
}

async fn call(http: &reqwest::Client, running: &Running<Counter>) -> Result<StatusCode, String> {
    http.post(format!("{}/count", running.base_url()))
        .send()
        .await
        .map(|r| r.status())
        .map_err(|e| e.to_string())
}

#[tokio::test]
async fn throttles_and_fails_every_nth_call_and_logs_it() {
    let (sb, http) = sandbox(None).await;
    sb.wire().set_faults(WireFaults {
        throttle_every: 2,
        retry_after_secs: 7,
        fail_nth: Some(3),
        ..WireFaults::default()
    });
    let first = call(&http, &sb).await;
    let throttled = http
        .post(format!("{}/count", sb.base_url()))
        .send()
        .await
        .expect("answer");
    assert_eq!(throttled.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(throttled.headers()["retry-after"], "7");
    let third = call(&http, &sb).await;
    assert_eq!(
        (first, third),
        (Ok(StatusCode::OK), Ok(StatusCode::INTERNAL_SERVER_ERROR))
    );
    assert_eq!(
        sb.platform().handled.load(Ordering::SeqCst),
        1,
        "injected answers are not handled"
    );

    let log = sb.wire().requests();
    let seen: Vec<(u16, Option<Injected>)> = log.iter().map(|r| (r.status, r.injected)).collect();
    assert_eq!(
        seen,
        [
            (200, None),
            (503, Some(Injected::Throttled)),
            (500, Some(Injected::Failed))
        ]
    );
    assert_eq!(log[0].detail, Some(json!({ "handled": 1 })));
    assert_eq!(log[0].path, "/count");
    let counts = sb.wire().counts();
    assert_eq!(
        (counts.requests, counts.throttled, counts.failed),
        (3, 1, 1)
    );
    assert_eq!(counts.requests_by_route.get("POST /count"), Some(&3));
}

#[tokio::test]
async fn drops_before_or_after_handling() {
    let (sb, http) = sandbox(None).await;
    sb.wire().set_faults(WireFaults {
        drop_nth: Some(1),
        ..WireFaults::default()
    });
    assert!(call(&http, &sb).await.is_err(), "no answer");
    assert_eq!(
        sb.platform().handled.load(Ordering::SeqCst),
        0,
        "dropped before handling"
    );

    sb.wire().set_faults(WireFaults::answer_lost(1));
    assert!(call(&http, &sb).await.is_err(), "no answer");
    assert_eq!(
        sb.platform().handled.load(Ordering::SeqCst),
        1,
        "handled, then the answer lost"
    );
    assert_eq!(
        call(&http, &sb).await,
        Ok(StatusCode::OK),
        "only the Nth call"
    );
    assert_eq!(sb.wire().counts().dropped, 2);
}

#[tokio::test]
async fn one_faults_object_for_the_wire_and_the_platform() {
    let (sb, http) = sandbox(None).await;
    let url = format!("{}/_sandbox/faults", sb.base_url());
    let set = http
        .post(&url)
        .body(r#"{"delay_ms": 5, "refuse_all": true}"#)
        .send()
        .await
        .expect("answer");
    assert_eq!(set.status(), StatusCode::OK);
    let now: Value = set.json().await.expect("json");
    assert_eq!(
        (now["delay_ms"].clone(), now["refuse_all"].clone()),
        (json!(5), json!(true))
    );
    assert_eq!(sb.wire().faults().delay_ms, 5);
    assert!(sb.platform().faults().refuse_all);
    assert_eq!(call(&http, &sb).await, Ok(StatusCode::FORBIDDEN));

    let bad = http
        .post(&url)
        .body(r#"{"throttle_evrey": 2}"#)
        .send()
        .await
        .expect("answer");
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
    assert!(
        bad.text().await.expect("body").contains("throttle_evrey"),
        "names the key"
    );
    assert!(
        sb.platform().faults().refuse_all,
        "a refused object changes nothing"
    );

    let reset = http
        .post(format!("{}/_sandbox/reset", sb.base_url()))
        .send()
        .await
        .expect("answer");
    assert_eq!(reset.status(), StatusCode::NO_CONTENT);
    assert_eq!(sb.wire().faults(), WireFaults::default());
    assert!(!sb.platform().faults().refuse_all);
    assert!(sb.wire().requests().is_empty());
    let log: Value = http
        .get(format!("{}/_sandbox/requests", sb.base_url()))
        .send()
        .await
        .expect("answer")
        .json()
        .await
        .expect("json");
    assert_eq!(log, json!([]), "admin calls are not logged");
}

#[tokio::test]
async fn shutdown_saves_and_dropping_the_handle_stops_the_server() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("counter.json");
    let (sb, http) = sandbox(Some(path.clone())).await;
    assert_eq!(call(&http, &sb).await, Ok(StatusCode::OK));
    sb.shutdown().await.expect("saved");
    assert_eq!(std::fs::read_to_string(&path).expect("data file"), "1");

    let (sb, http) = sandbox(None).await;
    let url = sb.base_url().to_string();
    drop(sb);
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let after = http.post(format!("{url}/count")).send().await;
    assert!(after.is_err(), "nobody listens after the handle is dropped");
}
