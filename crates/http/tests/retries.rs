//! The retry policy against a tiny scripted server on 127.0.0.1: each request gets the
//! next scripted answer (the last one repeats), and the server counts requests.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, Request, Response};
use contactsync_core::{ConnectorError, JobProgress, ProgressReporter};
use contactsync_http::{
    Answer, Auth, CancellationToken, ClientConfig, Decision, HttpClient, RetryPolicy, SecretString,
};

#[derive(Clone)]
struct Scripted {
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: &'static str,
}

fn answer(status: u16, body: &'static str) -> Scripted {
    Scripted {
        status,
        headers: vec![],
        body,
    }
}

fn with_header(mut s: Scripted, name: &'static str, value: impl Into<String>) -> Scripted {
    s.headers.push((name, value.into()));
    s
}

#[derive(Clone)]
struct Server {
    script: Arc<Mutex<Vec<Scripted>>>,
    count: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<(String, HeaderMap)>>>,
}

async fn handle(State(s): State<Server>, req: Request<Body>) -> Response<Body> {
    let n = s.count.fetch_add(1, Ordering::SeqCst);
    s.seen
        .lock()
        .unwrap()
        .push((req.uri().to_string(), req.headers().clone()));
    let script = s.script.lock().unwrap();
    let item = script[n.min(script.len() - 1)].clone();
    let mut builder = Response::builder().status(item.status);
    for (k, v) in &item.headers {
        builder = builder.header(*k, v.as_str());
    }
    builder.body(Body::from(item.body)).unwrap()
}

async fn serve(script: Vec<Scripted>) -> (String, Server) {
    let server = Server {
        script: Arc::new(Mutex::new(script)),
        count: Arc::new(AtomicUsize::new(0)),
        seen: Arc::new(Mutex::new(Vec::new())),
    };
    let app = axum::Router::new()
        .fallback(handle)
        .with_state(server.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}/v2"), server)
}

fn fast_policy() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 4,
        base_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(40),
        max_elapsed: Duration::from_secs(20),
        retry_transport_errors: true,
    }
}

fn client(base: &str) -> HttpClient {
    let mut settings = ClientConfig::new(base).unwrap();
    settings.retry = fast_policy();
    settings.user_agent_suffix = Some("test".into());
    HttpClient::new(
        settings,
        Auth::basic("api-user", SecretString::from("hunter2")),
    )
    .unwrap()
}

#[tokio::test]
async fn retry_after_is_honoured() {
    let (base, server) = serve(vec![
        with_header(answer(503, "slow down"), "Retry-After", "1"),
        answer(200, "ok"),
    ])
    .await;
    let started = Instant::now();
    let got = client(&base).get("acme/subscribers").send().await.unwrap();
    assert_eq!(got.text(), "ok");
    assert!(
        started.elapsed() >= Duration::from_millis(1000),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(server.count.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn retry_after_as_http_date_is_honoured() {
    let when = chrono::Utc::now() + chrono::Duration::seconds(2);
    let date = when.format("%a, %d %b %Y %H:%M:%S GMT").to_string();
    let (base, server) = serve(vec![
        with_header(answer(429, "too many"), "Retry-After", date),
        answer(200, "ok"),
    ])
    .await;
    let started = Instant::now();
    client(&base).get("x").send().await.unwrap();
    // The date has a one-second resolution: at least one second must have passed.
    assert!(
        started.elapsed() >= Duration::from_millis(1000),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(server.count.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn server_errors_are_retried_then_succeed() {
    let (base, server) = serve(vec![
        answer(500, "oops"),
        answer(502, "gateway"),
        answer(200, "ok"),
    ])
    .await;
    let got = client(&base).get("acme/subscribers").send().await.unwrap();
    assert_eq!(got.status().as_u16(), 200);
    assert_eq!(server.count.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn client_errors_are_not_retried() {
    let (base, server) = serve(vec![
        answer(400, "<error>bad column</error>"),
        answer(200, "ok"),
    ])
    .await;
    let err = client(&base)
        .post("acme/subscriber_imports")
        .query("token", "top-secret")
        .body("application/xml; charset=UTF-8", "<x/>")
        .send()
        .await
        .unwrap_err();
    assert_eq!(server.count.load(Ordering::SeqCst), 1);
    let text = err.to_string();
    assert!(
        matches!(
            err,
            ConnectorError::Call {
                status: Some(400),
                ..
            }
        ),
        "{err:?}"
    );
    assert!(text.contains("POST /v2/acme/subscriber_imports"), "{text}");
    assert!(text.contains("bad column"), "{text}");
    assert!(!text.contains("top-secret"), "{text}");
}

#[tokio::test]
async fn gives_up_after_max_attempts_with_a_clear_error() {
    let (base, server) = serve(vec![answer(500, "still broken")]).await;
    let err = client(&base)
        .get("acme/subscribers")
        .send()
        .await
        .unwrap_err();
    assert_eq!(server.count.load(Ordering::SeqCst), 4);
    let text = err.to_string();
    assert!(text.contains("gave up after 4 attempts"), "{text}");
    assert!(text.contains("HTTP 500"), "{text}");
    assert!(text.contains("still broken"), "{text}");
}

#[tokio::test]
async fn gives_up_at_once_when_retry_after_passes_the_time_bound() {
    let (base, server) = serve(vec![with_header(
        answer(503, "later"),
        "Retry-After",
        "3600",
    )])
    .await;
    let started = Instant::now();
    let err = client(&base).get("x").send().await.unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(server.count.load(Ordering::SeqCst), 1);
    assert!(err.to_string().contains("bound"), "{err}");
}

#[tokio::test]
async fn auth_failures_are_auth_errors_without_the_password() {
    let (base, server) = serve(vec![answer(401, "bad credentials")]).await;
    let err = client(&base)
        .get("acme/subscribers")
        .send()
        .await
        .unwrap_err();
    assert!(matches!(err, ConnectorError::Auth { .. }), "{err:?}");
    assert!(!err.to_string().contains("hunter2"));
    assert_eq!(server.count.load(Ordering::SeqCst), 1);
    let seen = server.seen.lock().unwrap();
    let headers = &seen[0].1;
    assert!(headers["authorization"]
        .to_str()
        .unwrap()
        .starts_with("Basic "));
    let ua = headers["user-agent"].to_str().unwrap();
    assert!(
        ua.starts_with("contactsync/") && ua.ends_with(" test"),
        "{ua}"
    );
}

struct Notes(Mutex<Vec<String>>);

impl ProgressReporter for Notes {
    fn job_progress(&self, _progress: &JobProgress) {}
    fn note(&self, message: &str) {
        self.0.lock().unwrap().push(message.to_string());
    }
}

fn busy_classifier(a: &Answer) -> Decision {
    if a.status().as_u16() == 503 && a.retry_after().is_none() {
        Decision::Wait {
            delay: Duration::from_millis(100),
            bound: Duration::from_millis(450),
            note: "another import is running".into(),
        }
    } else {
        Decision::standard(a)
    }
}

#[tokio::test]
async fn a_wait_decision_waits_beyond_max_attempts_within_its_bound() {
    // Six busy answers: more than max_attempts (4), less than the bound allows.
    let mut script = vec![answer(503, "busy"); 4];
    script.push(answer(202, "accepted"));
    let (base, server) = serve(script).await;
    let notes = Notes(Mutex::new(vec![]));
    let got = client(&base)
        .post("acme/subscriber_imports")
        .classify(&busy_classifier)
        .progress(&notes)
        .send()
        .await
        .unwrap();
    assert_eq!(got.status().as_u16(), 202);
    assert_eq!(server.count.load(Ordering::SeqCst), 5);
    assert_eq!(notes.0.lock().unwrap().len(), 4);
}

#[tokio::test]
async fn a_wait_decision_gives_up_at_its_bound() {
    let (base, server) = serve(vec![answer(503, "concurrent imports are not supported")]).await;
    let started = Instant::now();
    let err = client(&base)
        .post("acme/subscriber_imports")
        .classify(&busy_classifier)
        .send()
        .await
        .unwrap_err();
    let elapsed = started.elapsed();
    assert!(elapsed >= Duration::from_millis(450), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(3), "{elapsed:?}");
    let text = err.to_string();
    assert!(text.contains("another import is running"), "{text}");
    assert!(text.contains("HTTP 503"), "{text}");
    // 100 + 100 + 100 + 100 + 50 ms of waits: six tries.
    assert_eq!(server.count.load(Ordering::SeqCst), 6);
}

#[tokio::test]
async fn cancellation_ends_a_wait_at_once() {
    let (base, _server) = serve(vec![with_header(answer(503, "later"), "Retry-After", "10")]).await;
    let cancel = CancellationToken::new();
    let c2 = cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        c2.cancel();
    });
    let started = Instant::now();
    let err = client(&base)
        .get("x")
        .cancel(cancel)
        .send()
        .await
        .unwrap_err();
    assert!(matches!(err, ConnectorError::Cancelled), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn connection_errors_are_retried_and_reported_without_the_query() {
    // Bind then drop a listener to get a port nobody listens on.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let base = format!("http://127.0.0.1:{port}/v2");
    let err = client(&base)
        .get("acme/subscribers")
        .query("api_key", "top-secret")
        .send()
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(err, ConnectorError::Call { status: None, .. }),
        "{err:?}"
    );
    assert!(text.contains("gave up after 4 attempts"), "{text}");
    assert!(!text.contains("top-secret"), "{text}");
}

#[tokio::test]
async fn links_are_followed_and_credentials_stay_home() {
    let (base, server) = serve(vec![answer(200, "import")]).await;
    let c = client(&base);
    // An absolute link on the same server (localhost stands for 127.0.0.1).
    let href = base.replace("127.0.0.1", "localhost") + "/acme/subscriber_import/7";
    c.request_url(contactsync_http::Method::GET, &href)
        .send()
        .await
        .unwrap();
    // A relative link resolves against the base.
    c.request_url(
        contactsync_http::Method::GET,
        "/v2/acme/subscriber_import/8",
    )
    .send()
    .await
    .unwrap();
    // Segments are encoded.
    c.request_segments(
        contactsync_http::Method::GET,
        &["acme", "subscriber", "a b@x.org"],
    )
    .send()
    .await
    .unwrap();
    let seen: Vec<String> = server
        .seen
        .lock()
        .unwrap()
        .iter()
        .map(|(u, _)| u.clone())
        .collect();
    assert_eq!(
        seen,
        vec![
            "/v2/acme/subscriber_import/7",
            "/v2/acme/subscriber_import/8",
            "/v2/acme/subscriber/a%20b@x.org"
        ]
    );
    // A link to another host is refused rather than handed the password.
    let err = c
        .request_url(
            contactsync_http::Method::GET,
            "https://evil.example.com/steal",
        )
        .send()
        .await
        .unwrap_err();
    assert!(matches!(err, ConnectorError::Protocol { .. }), "{err:?}");
    assert_eq!(server.count.load(Ordering::SeqCst), 3);
}

#[test]
fn debug_output_has_no_password() {
    let c = client("http://127.0.0.1:1/v2");
    let text = format!("{c:?}");
    assert!(!text.contains("hunter2"), "{text}");
    assert!(text.contains("api-user"));
}
