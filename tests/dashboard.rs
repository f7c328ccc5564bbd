//! `contactsync serve` end to end: a state filled by real `sync --all` runs (a pipeline
//! that syncs, one with rejects and a hostile name, one that fails, one locked), served
//! by the binary and loaded in headless Chromium (Debian's `chromium`, which `cargo
//! xtask test` installs): the rendered DOM is checked and each page saved as a
//! screenshot under `target/tmp/dashboard-screenshots/`. Then the token, the login
//! cookie, the JSON, `/metrics`, and that no route writes. Against SQLite and against
//! PostgreSQL.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use common::Scenario;
use contactsync_engine::state::roles::*;
use contactsync_engine::state::{LockAttempt, LockHolder, StateLocation};
use scraper::{Html, Selector};

/// A name that would run script if it were markup.
const HOSTILE: &str = "<img src=x onerror=alert(1)>";
/// One that would say so in the page's title if it ran.
const CANARY: &str = "<img src=x onerror=\"document.title='pwned'\">";

fn scenario(state: &str) -> Scenario {
    let s = Scenario::new();
    s.write(
        "people.csv",
        "external_id,email,first_name\nE1,ann@example.com,Ann\nE2,bob@example.com,Bob\n",
    );
    s.write(
        "bad.csv",
        &format!(
            "external_id,email,first_name\nH1,hostile@example.com,{HOSTILE}\nH2,not-an-email,Bob\nH3,canary@example.com,\"{}\"\n",
            CANARY.replace('"', "\"\"")
        ),
    );
    s.config(&format!(
        r#"
state = "{state}"

[sources.people]
type = "csv"
path = "people.csv"

[sources.bad]
type = "csv"
path = "bad.csv"

[sources.missing]
type = "csv"
path = "missing.csv"

[sinks.out]
type = "csv"
path = "out.csv"

[sinks.other]
type = "csv"
path = "other.csv"

[sinks.third]
type = "csv"
path = "third.csv"

[pipelines.fine]
from = "people"
to = "out"

[pipelines.rejects]
from = "bad"
to = "other"

[pipelines.broken]
from = "missing"
to = "third"
"#
    ));
    s
}

/// A running `contactsync serve`, stopped on drop.
struct Served {
    child: Child,
    base: String,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(s: &Scenario, args: &[&str]) -> Served {
    let mut child = s
        .command(&["serve", "--listen", "127.0.0.1:0"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("serve starts");
    let mut line = String::new();
    let stdout = child.stdout.take().expect("stdout");
    BufReader::new(stdout).read_line(&mut line).expect("a line");
    let base = line
        .split("http://")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .map(|host| format!("http://{host}"))
        .unwrap_or_else(|| panic!("serve said: {line:?}"));
    Served { child, base }
}

/// The page at `url` as headless Chromium renders it (its DOM after load), and a
/// screenshot of it saved as `shot`.
fn browse(url: &str, shot: &str) -> Html {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dashboard-screenshots");
    std::fs::create_dir_all(&dir).expect("screenshot dir");
    let profile = tempfile::tempdir().expect("profile");
    let chromium = |extra: &[String]| {
        Command::new(chromium_path())
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--hide-scrollbars",
                "--window-size=1400,900",
                "--virtual-time-budget=3000",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .args(extra)
            .arg(url)
            .output()
            .expect("chromium runs (cargo xtask test installs it)")
    };
    let out = chromium(&[format!("--screenshot={}", dir.join(shot).display())]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = chromium(&["--dump-dom".to_string()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Html::parse_document(&String::from_utf8_lossy(&out.stdout))
}

fn chromium_path() -> &'static str {
    [
        "/usr/bin/chromium",
        "/usr/bin/chromium-browser",
        "/usr/bin/google-chrome",
    ]
    .into_iter()
    .find(|p| Path::new(p).exists())
    .unwrap_or("chromium")
}

fn select<'a>(dom: &'a Html, css: &str) -> Vec<scraper::ElementRef<'a>> {
    let selector = Selector::parse(css).expect("selector");
    dom.select(&selector).collect()
}

fn text(e: &scraper::ElementRef<'_>) -> String {
    e.text().collect::<String>()
}

/// Fills the state with two nights of `sync --all`, then holds the lock of
/// `people->out` as a run would; returns the store that holds it.
fn fill(s: &Scenario, location: &StateLocation) -> Box<dyn StateStore> {
    for _ in 0..2 {
        let run = s.run(&["sync", "--all"]);
        assert_ne!(run.code(), 0, "one pipeline fails: {}", run.stderr());
    }
    let mut store = location.open().expect("state");
    let holder = LockHolder::current("people->out");
    let taken = store
        .lock(&["pipeline:people->out".to_string()], &holder)
        .expect("lock");
    assert!(matches!(taken, LockAttempt::Acquired { .. }));
    store
}

/// Headless Chromium runs as a process of its own: the test waits for it, and the
/// server (another process) answers it meanwhile.
fn pages_in_a_browser(served: &Served, label: &str) {
    let base = &served.base;
    // The overview: every pipeline, its status in the report's words, a chart with
    // one point a run, the lock held, and the pipeline that never synced stale.
    let dom = browse(&format!("{base}/"), &format!("{label}-overview.png"));
    let rows = select(&dom, "tr.pipeline");
    let names: Vec<String> = rows
        .iter()
        .filter_map(|r| r.value().attr("data-pipeline").map(str::to_string))
        .collect();
    assert_eq!(names, ["bad->other", "missing->third", "people->out"]);
    let status_of = |name: &str| {
        let row = rows
            .iter()
            .find(|r| r.value().attr("data-pipeline") == Some(name))
            .expect("row");
        let status = Selector::parse(".status").expect("selector");
        row.select(&status).map(|e| text(&e)).collect::<String>()
    };
    assert_eq!(status_of("people->out"), "synced");
    assert_eq!(status_of("bad->other"), "finished_with_rejects");
    assert_eq!(status_of("missing->third"), "failed");
    for row in &rows {
        let points = Selector::parse("svg.chart circle.point.created").expect("selector");
        assert_eq!(row.select(&points).count(), 2, "one point a run");
    }
    let locked = rows
        .iter()
        .find(|r| r.value().attr("data-pipeline") == Some("people->out"))
        .map(text)
        .unwrap_or_default();
    assert!(
        locked.contains("held by") && locked.contains(&format!("pid {}", std::process::id())),
        "{locked}"
    );
    assert_eq!(
        select(&dom, "tr.pipeline.stale").len(),
        1,
        "the failing one is stale"
    );

    // A pipeline's runs, a run with its rejects.
    let dom = browse(
        &format!("{base}/pipelines/bad-%3Eother"),
        &format!("{label}-pipeline.png"),
    );
    assert_eq!(select(&dom, "tr.run").len(), 2);
    let dom = browse(
        &format!("{base}/pipelines/bad-%3Eother/runs/1"),
        &format!("{label}-run.png"),
    );
    let rejects = select(&dom, "tr.reject");
    assert_eq!(rejects.len(), 1);
    let reject = text(&rejects[0]);
    assert!(
        reject.contains("bad.csv:3") && reject.contains("not-an-email"),
        "{reject}"
    );
    assert_eq!(select(&dom, "a.download").len(), 1);

    // A person: the hostile name is text, and no script ran.
    for (who, name, shot) in [
        ("hostile@example.com", HOSTILE, "person"),
        ("canary@example.com", CANARY, "canary"),
    ] {
        let dom = browse(
            &format!("{base}/people?q={who}"),
            &format!("{label}-{shot}.png"),
        );
        assert_eq!(
            select(&dom, "main img").len(),
            0,
            "no element made of the name"
        );
        let fields = select(&dom, "table.fields td")
            .iter()
            .map(text)
            .collect::<Vec<_>>();
        assert!(fields.iter().any(|f| f == name), "{fields:?}");
        let title = select(&dom, "title").first().map(text).unwrap_or_default();
        assert_eq!(title, "People · contactsync", "no script changed the page");
        assert_eq!(select(&dom, "li.change").len(), 1);
    }
}

async fn http_checks(served: &Served, token: Option<&str>) {
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");
    let base = &served.base;
    let get = |path: &str| client.get(format!("{base}{path}"));
    let authorised = |r: reqwest::RequestBuilder| match token {
        Some(t) => r.bearer_auth(t),
        None => r,
    };
    if let Some(token) = token {
        for path in [
            "/",
            "/api/overview",
            "/metrics",
            "/people?q=ann@example.com",
        ] {
            let r = get(path).send().await.expect("get");
            assert_eq!(r.status(), 401, "{path} without the token");
            let body = r.text().await.expect("body");
            assert!(
                !body.contains("people->out") && !body.contains("ann@"),
                "{body}"
            );
        }
        let wrong = get("/")
            .bearer_auth("not-the-token-at-all")
            .send()
            .await
            .expect("get");
        assert_eq!(wrong.status(), 401);
        let login = client
            .post(format!("{base}/login"))
            .form(&[("token", "wrong-token-wrong-token")])
            .send()
            .await
            .expect("login");
        assert_eq!(login.status(), 401, "a wrong token, no hint");
        let login = client
            .post(format!("{base}/login"))
            .form(&[("token", token)])
            .send()
            .await
            .expect("login");
        assert_eq!(login.status(), 303);
        let cookie = login.headers()["set-cookie"]
            .to_str()
            .expect("cookie")
            .to_string();
        assert!(
            cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
            "{cookie}"
        );
        let pair = cookie.split(';').next().expect("pair");
        let r = get("/").header("cookie", pair).send().await.expect("get");
        assert_eq!(r.status(), 200, "the cookie signs in");
    }
    let r = authorised(get("/")).send().await.expect("get");
    assert_eq!(r.status(), 200);
    let csp = r.headers()["content-security-policy"]
        .to_str()
        .expect("csp");
    assert!(
        csp.contains("default-src 'none'") && !csp.contains("script-src"),
        "{csp}"
    );
    let json = |path: &'static str| {
        let request = authorised(get(path));
        async move {
            let text = request
                .send()
                .await
                .expect("api")
                .text()
                .await
                .expect("body");
            serde_json::from_str::<serde_json::Value>(&text).expect("json")
        }
    };
    let overview = json("/api/overview").await;
    assert_eq!(overview["pipelines"].as_array().map(Vec::len), Some(3));
    let run = json("/api/pipelines/bad-%3Eother/runs/1").await;
    assert_eq!(run["rejects"][0]["origin"], "bad.csv:3");
    assert_eq!(run["report"]["rejected"], 1);
    let csv = authorised(get("/pipelines/bad-%3Eother/runs/1/rejects.csv"))
        .send()
        .await
        .expect("csv");
    assert!(csv.headers()["content-disposition"]
        .to_str()
        .expect("header")
        .starts_with("attachment"));
    let csv = csv.text().await.expect("csv");
    assert!(csv.starts_with("stage,origin,key,email,field,reason\n") && csv.contains("bad.csv:3"));
    let metrics = authorised(get("/metrics"))
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    let lines = metrics.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("the text format");
    assert!(scrape
        .samples
        .iter()
        .any(|s| s.metric == "contactsync_run_status"
            && s.labels.get("pipeline") == Some("missing->third")
            && s.labels.get("status") == Some("failed")));
    // Nothing writes: other methods are refused.
    for (method, path) in [
        (reqwest::Method::POST, "/"),
        (reqwest::Method::PUT, "/api/overview"),
        (reqwest::Method::DELETE, "/pipelines/bad-%3Eother"),
    ] {
        let r = authorised(client.request(method.clone(), format!("{base}{path}")))
            .send()
            .await
            .expect("request");
        assert_eq!(r.status(), 405, "{method} {path}");
    }
    assert_eq!(
        authorised(get("/pipelines/nobody-%3Ex"))
            .send()
            .await
            .expect("get")
            .status(),
        404
    );
}

#[tokio::test]
async fn the_dashboard_serves_a_sqlite_state_in_a_browser() {
    let s = scenario("data/state.db");
    let location = StateLocation::File(s.path("data/state.db"));
    let _lock = fill(&s, &location);
    let served = serve(&s, &[]);
    pages_in_a_browser(&served, "sqlite");
    http_checks(&served, None).await;
}

#[tokio::test]
async fn the_dashboard_serves_a_postgresql_state_behind_a_token() {
    let pg = contactsync_testkit::postgres::Postgres::start().expect("postgres");
    let url = pg.new_database().expect("database");
    let s = scenario(&url);
    let location = StateLocation::parse(&url, Path::new("")).expect("url");
    let _lock = fill(&s, &location);
    let token = "dashboard-token-0123456789";
    s.write("token", token);
    let served = serve(&s, &["--token-file", "token"]);
    http_checks(&served, Some(token)).await;
    // The browser has no token: it is shown the form.
    let dom = browse(&format!("{}/", served.base), "postgres-login.png");
    assert_eq!(select(&dom, "form.login input[name=token]").len(), 1);
    assert_eq!(select(&dom, "tr.pipeline").len(), 0);
    // On loopback without a token, the same pages as on SQLite, from PostgreSQL.
    let open = serve(&s, &[]);
    pages_in_a_browser(&open, "postgres");
}

#[test]
fn any_address_but_loopback_needs_a_token() {
    let s = scenario("data/state.db");
    let run = s.run(&["serve", "--listen", "0.0.0.0:0"]);
    assert_eq!(run.code(), 2);
    assert!(
        run.stderr().contains("needs --token-file"),
        "{}",
        run.stderr()
    );
}
