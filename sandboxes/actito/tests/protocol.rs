//! The sandbox on its own, over raw HTTP: the documented rules it enforces.

use std::io::Write;
use std::time::Duration;

use contactsync_core::{ConnectorSettings, SandboxOptions};
use contactsync_sandbox_actito::{ActitoSandbox, RunningActito, SandboxConfig};
use serde_json::{json, Value};

async fn start(config: SandboxConfig) -> RunningActito {
    ActitoSandbox::start(config).await.expect("sandbox")
}

async fn token(http: &reqwest::Client, sb: &RunningActito) -> String {
    let answer: Value = http
        .get(format!("{}/auth/token", sb.base_url()))
        .header("Authorization", sb.api_key())
        .header("Accept", "application/json")
        .send()
        .await
        .expect("send")
        .bytes()
        .await
        .map(|b| json_of(&b))
        .expect("body");
    assert_eq!(answer["tokenType"], "bearer");
    assert_eq!(answer["expiresIn"], "900s");
    answer["accessToken"].as_str().expect("token").to_string()
}

fn zip_of(csv: &str) -> Vec<u8> {
    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    zip.start_file("p.csv", zip::write::SimpleFileOptions::default())
        .expect("file");
    zip.write_all(csv.as_bytes()).expect("write");
    zip.finish().expect("finish").into_inner()
}

fn import_form(csv: &str, params: Value) -> reqwest::multipart::Form {
    reqwest::multipart::Form::new()
        .part(
            "inputFile",
            reqwest::multipart::Part::bytes(zip_of(csv)).file_name("p.zip"),
        )
        .text("parameters", params.to_string())
}

#[tokio::test]
async fn auth_addressing_accept_and_validation() {
    let sb = start(SandboxConfig::default()).await;
    let http = reqwest::Client::new();
    let base = sb.base_url().to_string();
    let bad = http
        .get(format!("{base}/auth/token"))
        .header("Authorization", "wrong")
        .send()
        .await
        .expect("send");
    assert_eq!(bad.status(), 401);
    let body: Value = bad.bytes().await.map(|b| json_of(&b)).expect("body");
    assert_eq!(body["status"], 401);

    let t = token(&http, &sb).await;
    let get = |path: &str| http.get(format!("{base}{path}")).bearer_auth(&t);
    assert_eq!(
        get("/v4/entity/demo/table/contacts")
            .send()
            .await
            .expect("s")
            .status(),
        200
    );
    assert_eq!(
        get("/v4/entity/nope/table/contacts")
            .send()
            .await
            .expect("s")
            .status(),
        404
    );
    assert_eq!(
        get("/v4/entity/demo/table/nope")
            .send()
            .await
            .expect("s")
            .status(),
        404
    );
    assert_eq!(
        get("/v4/entity/demo/table/contacts")
            .header("Accept", "text/csv")
            .send()
            .await
            .expect("s")
            .status(),
        406
    );
    assert_eq!(
        http.get(format!("{base}/v4/entity/demo/table/contacts"))
            .send()
            .await
            .expect("s")
            .status(),
        401
    );
    let post = |body: &'static str| {
        http.post(format!(
            "{base}/v4/entity/demo/table/contacts/profile?allowUpdate=true"
        ))
        .bearer_auth(&t)
        .header("Content-Type", "application/json")
        .body(body)
    };
    assert_eq!(post("{not json").send().await.expect("s").status(), 400);
    let unknown = post(r#"{"attributes":[{"name":"emailAddress","value":"a@b.org"},{"name":"shoeSize","value":"42"}]}"#)
        .send()
        .await
        .expect("s");
    assert_eq!(unknown.status(), 400);
    let body: Value = unknown.bytes().await.map(|b| json_of(&b)).expect("body");
    assert!(body["message"]
        .as_str()
        .expect("message")
        .contains("shoeSize"));
    let no_mandatory = post(r#"{"attributes":[{"name":"firstName","value":"Ann"}]}"#)
        .send()
        .await
        .expect("s");
    assert_eq!(no_mandatory.status(), 400);
    let created = post(r#"{"attributes":[{"name":"emailAddress","value":"a@b.org"}],"subscriptions":[{"name":"Newsletter","subscribe":true}]}"#)
        .send()
        .await
        .expect("s");
    assert_eq!(created.status(), 201);
    let again = post(r#"{"attributes":[{"name":"emailAddress","value":"a@b.org"},{"name":"firstName","value":"Ann"}]}"#)
        .send()
        .await
        .expect("s");
    assert_eq!(again.status(), 200);
    let listed: Value =
        get("/v4/entity/demo/table/contacts/profile?search=emailAddress%3Da@b.org&number=10")
            .send()
            .await
            .expect("s")
            .bytes()
            .await
            .map(|b| json_of(&b))
            .expect("body");
    assert_eq!(listed["profiles"].as_array().map(Vec::len), Some(1));
    let unsub = http
        .delete(format!("{base}/v4/entity/demo/table/contacts/profile/emailAddress=a@b.org/subscription/Newsletter"))
        .bearer_auth(&t)
        .send()
        .await
        .expect("s");
    assert_eq!(unsub.status(), 200);
    assert!(!sb.profiles("contacts")[0].subscribed("Newsletter"));
}

#[tokio::test]
async fn imports_are_checked_queued_and_limited_to_12_a_day() {
    let sb = start(SandboxConfig {
        max_zip_bytes: 2_000,
        ..SandboxConfig::default()
    })
    .await;
    let http = reqwest::Client::new();
    let t = token(&http, &sb).await;
    let url = format!("{}/v4/entity/demo/table/contacts/import", sb.base_url());
    let params = json!({"format":"COMMA_SEPARATED_VALUES","charset":"UTF-8","mode":"CREATE_UPDATE","headerKeyColumn":"emailAddress"});
    // Bad parameters, unknown columns, a zip over the limit: 400.
    for (csv, p) in [
        (
            "emailAddress\na@b.org\n",
            json!({"format":"XML","charset":"UTF-8","mode":"CREATE_UPDATE"}),
        ),
        ("emailAddress,shoeSize\na@b.org,4\n", params.clone()),
        ("firstName\nAnn\n", params.clone()),
    ] {
        let r = http
            .post(&url)
            .bearer_auth(&t)
            .multipart(import_form(csv, p))
            .send()
            .await
            .expect("s");
        assert_eq!(r.status(), 400);
    }
    let big: String = (0..400)
        .map(|i| format!("user{i}.{}@example.com\n", rand_text(i)))
        .collect();
    let r = http
        .post(&url)
        .bearer_auth(&t)
        .multipart(import_form(&format!("emailAddress\n{big}"), params.clone()))
        .send()
        .await
        .expect("s");
    assert_eq!(r.status(), 400);
    // Twelve are accepted; they run one after another.
    let mut ids = Vec::new();
    for i in 0..12 {
        let r = http
            .post(&url)
            .bearer_auth(&t)
            .multipart(import_form(
                &format!("emailAddress,firstName\nu{i}@example.com,U{i}\nbad-email,X\n"),
                params.clone(),
            ))
            .send()
            .await
            .expect("s");
        assert_eq!(r.status(), 200);
        let v: Value = r.bytes().await.map(|b| json_of(&b)).expect("body");
        ids.push(v["id"].clone());
    }
    let thirteenth = http
        .post(&url)
        .bearer_auth(&t)
        .multipart(import_form("emailAddress\nz@example.com\n", params.clone()))
        .send()
        .await
        .expect("s");
    assert_eq!(thirteenth.status(), 429);
    assert_eq!(sb.stats().imports_posted, 12);
    let last = &ids[11];
    let status_url = format!("{}/v4/entity/demo/import/{last}", sb.base_url());
    assert!(finished(&http, &t, &status_url).await);
    let result: Value = http
        .get(format!("{status_url}/result"))
        .bearer_auth(&t)
        .send()
        .await
        .expect("s")
        .bytes()
        .await
        .map(|b| json_of(&b))
        .expect("body");
    assert_eq!(result["withErrors"], true);
    assert_eq!(result["rowsInError"], 1);
    let file = http
        .get(format!("{status_url}/result-file"))
        .bearer_auth(&t)
        .header("Accept", "application/zip")
        .send()
        .await
        .expect("s")
        .bytes()
        .await
        .expect("bytes");
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(file.to_vec())).expect("zip");
    let mut text = String::new();
    std::io::Read::read_to_string(&mut archive.by_index(0).expect("entry"), &mut text)
        .expect("read");
    assert!(
        text.starts_with("emailAddress,firstName,errorMessage"),
        "{text}"
    );
    assert!(text.contains("bad-email,X,"), "{text}");
    assert_eq!(sb.profiles("contacts").len(), 12);
}

fn rand_text(i: usize) -> String {
    format!("{:x}", (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

#[tokio::test]
async fn faults_stats_persistence_and_registry() {
    let dir = tempfile::tempdir().expect("dir");
    let data = dir.path().join("actito.json");
    let sb = start(SandboxConfig {
        data_file: Some(data.clone()),
        ..SandboxConfig::default()
    })
    .await;
    let http = reqwest::Client::new();
    let t = token(&http, &sb).await;
    let r = http
        .post(format!("{}/_sandbox/faults", sb.base_url()))
        .body(r#"{"fail_every": 1}"#)
        .send()
        .await
        .expect("s");
    assert_eq!(r.status(), 200);
    let r = http
        .get(format!("{}/v4/entity", sb.base_url()))
        .bearer_auth(&t)
        .send()
        .await
        .expect("s");
    assert_eq!(r.status(), 500);
    let r = http
        .post(format!("{}/_sandbox/faults", sb.base_url()))
        .body(r#"{"expire_tokens_now": true}"#)
        .send()
        .await
        .expect("s");
    assert_eq!(r.status(), 200);
    let r = http
        .get(format!("{}/v4/entity", sb.base_url()))
        .bearer_auth(&t)
        .send()
        .await
        .expect("s");
    assert_eq!(r.status(), 401);
    let stats: Value = http
        .get(format!("{}/_sandbox/stats", sb.base_url()))
        .send()
        .await
        .expect("s")
        .bytes()
        .await
        .map(|b| json_of(&b))
        .expect("body");
    assert_eq!(stats["tokens_issued"], 1);
    assert_eq!(stats["unauthorized"], 1);
    sb.seed_profile(
        "contacts",
        &contactsync_sandbox_actito::ProfileInput {
            attributes: vec![("emailAddress".into(), Some("kept@example.com".into()))],
            ..Default::default()
        },
    )
    .expect("seed");
    sb.shutdown().await.expect("shutdown");
    let again = start(SandboxConfig {
        data_file: Some(data.clone()),
        ..SandboxConfig::default()
    })
    .await;
    assert_eq!(again.profiles("contacts").len(), 1);

    // The registry entry takes the key, entity and table the connector settings name.
    let settings = ConnectorSettings::from_toml(
        "sinks.actito",
        "base_url = \"sandbox\"\nentity = \"acme\"\ntable = \"people\"\napi_key = \"k-123\"\nbulk_threshold = 5",
    )
    .expect("toml");
    let factory = contactsync_core::registry::sandbox("actito").expect("registered");
    let running = (factory.start)(SandboxOptions {
        settings: Some(settings),
        ..SandboxOptions::default()
    })
    .await
    .expect("start");
    let ok = http
        .get(format!("{}/auth/token", running.base_url))
        .header("Authorization", "k-123")
        .send()
        .await
        .expect("s");
    assert_eq!(ok.status(), 200);
    let v: Value = ok.bytes().await.map(|b| json_of(&b)).expect("body");
    let structure = http
        .get(format!("{}/v4/entity/acme/table/people", running.base_url))
        .bearer_auth(v["accessToken"].as_str().expect("token"))
        .send()
        .await
        .expect("s");
    assert_eq!(structure.status(), 200);
    drop(running);
}

fn json_of(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes).expect("json")
}

/// Subscriptions travel in an import file as one column a subscription, named after it,
/// `Y` or `N` (Actito's import documentation); a blank or other value refuses the row.
#[tokio::test]
async fn an_import_sets_subscriptions_from_y_and_n_columns() {
    let sb = start(SandboxConfig::default()).await;
    let http = reqwest::Client::new();
    let t = token(&http, &sb).await;
    let url = format!("{}/v4/entity/demo/table/contacts/import", sb.base_url());
    let params = json!({"format":"COMMA_SEPARATED_VALUES","charset":"UTF-8","mode":"CREATE_UPDATE","headerKeyColumn":"emailAddress"});
    let csv = "emailAddress,Newsletter,Events\n\
               ann@example.com,Y,N\n\
               bob@example.com,N,Y\n\
               cy@example.com,,Y\n\
               di@example.com,maybe,Y\n";
    let r = http
        .post(&url)
        .bearer_auth(&t)
        .multipart(import_form(csv, params))
        .send()
        .await
        .expect("s");
    assert_eq!(r.status(), 200);
    let v: Value = r.bytes().await.map(|b| json_of(&b)).expect("body");
    let status_url = format!("{}/v4/entity/demo/import/{}", sb.base_url(), v["id"]);
    assert!(finished(&http, &t, &status_url).await);
    let ann = sb
        .profile_where("contacts", "emailAddress", "ann@example.com")
        .expect("ann");
    assert_eq!(ann.subscriptions.get("Newsletter"), Some(&true));
    assert_eq!(ann.subscriptions.get("Events"), Some(&false));
    let bob = sb
        .profile_where("contacts", "emailAddress", "bob@example.com")
        .expect("bob");
    assert_eq!(bob.subscriptions.get("Newsletter"), Some(&false));
    assert_eq!(bob.subscriptions.get("Events"), Some(&true));
    for refused in ["cy@example.com", "di@example.com"] {
        assert!(
            sb.profile_where("contacts", "emailAddress", refused)
                .is_none(),
            "{refused}: a blank or unknown Y/N cell refuses the row"
        );
    }
}

/// Polls the import at `status_url` until it is FINISHED (`false` after 10 s).
async fn finished(http: &reqwest::Client, token: &str, status_url: &str) -> bool {
    for _ in 0..200 {
        let v: Value = http
            .get(status_url)
            .bearer_auth(token)
            .send()
            .await
            .expect("s")
            .bytes()
            .await
            .map(|b| json_of(&b))
            .expect("body");
        if v["status"] == "FINISHED" {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}
