//! csv -> scim -> csv through the binary, against the SCIM sandbox and against
//! scim2-server (the python-scim project's reference server): a first sync of 1,000
//! with an existing user adopted, a no-op rerun, a nightly delta (creates, updates of
//! only what changed, removals as deactivation), a user an admin deactivated staying
//! so, group membership following the source, and everyone read back.
//!
//! What an admin does in the app is done here over SCIM with a client of the test's
//! own, so that the same scenario runs against both servers.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::{counts, read_rows, Scenario};
use contactsync_core::ConnectorSettings;
use contactsync_sandbox_scim::{SandboxConfig, ScimSandbox};
use contactsync_scim::client::{ScimClient, Written};
use contactsync_scim::ScimConfig;
use contactsync_testkit::scim2_server::Scim2Server;
use serde_json::{json, Map, Value};

const PEOPLE: usize = 1000;
const GROUP: &str = "All Staff";

/// The app under test: its base URL and token.
struct App {
    base_url: String,
    token: String,
}

impl App {
    fn section(&self) -> String {
        format!(
            "type = \"scim\"\nbase_url = \"{}\"\ntoken_file = \"scim.token\"\nretry_backoff = \"50ms\"\ngroups = {{ newsletter = \"{GROUP}\" }}\npage_size = 200\n",
            self.base_url
        )
    }

    /// A client of the test's own, as an admin of the app.
    fn admin(&self) -> ScimClient {
        let toml = format!(
            "base_url = \"{}\"\ntoken = \"{}\"\nretry_backoff = \"50ms\"\n",
            self.base_url, self.token
        );
        let settings = ConnectorSettings::from_toml("sinks.admin", &toml).expect("settings");
        ScimClient::new(
            &ScimConfig::from_settings(&settings)
                .expect("config")
                .connection,
        )
        .expect("client")
    }

    async fn users(&self) -> BTreeMap<String, Map<String, Value>> {
        let admin = self.admin();
        let mut users = BTreeMap::new();
        let mut start = 1;
        loop {
            let page = admin.page("Users", start, 500, None).await.expect("users");
            if page.resources.is_empty() {
                break;
            }
            start += page.resources.len() as u64;
            for u in page.resources {
                let name = u["userName"].as_str().expect("userName").to_lowercase();
                users.insert(name, u);
            }
            if start > page.total {
                break;
            }
        }
        users
    }

    async fn group_members(&self) -> BTreeSet<String> {
        let group = self
            .admin()
            .find("Groups", "displayName", GROUP)
            .await
            .expect("group")
            .expect("exists");
        group
            .get("members")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|m| m["value"].as_str().map(str::to_string))
            .collect()
    }

    async fn admin_patch(&self, id: &str, op: Value) {
        let done = self
            .admin()
            .patch("Users", id, &[op], None)
            .await
            .expect("admin patch");
        assert!(matches!(done, Written::Done(_)), "{done:?}");
    }
}

fn people_csv(rows: impl Iterator<Item = (usize, String, String, bool)>) -> String {
    let mut s = String::from("external_id,email,first_name,last_name,department,subscriptions\n");
    for (i, last, department, newsletter) in rows {
        let subs = if newsletter { "newsletter" } else { "" };
        s.push_str(&format!(
            "E{i},person{i}@example.com,Ann,{last},{department},{subs}\n"
        ));
    }
    s
}

fn scenario(app: &App) -> Scenario {
    let s = Scenario::new();
    s.write("scim.token", &app.token);
    let section = app.section();
    s.config(&format!(
        r#"
state = "data/state.db"

[sources.hr]
type = "csv"
path = "people.csv"

[sinks.app]
{section}
[sources.app]
{section}
[sinks.out]
type = "csv"
path = "out.csv"

[pipelines.provision]
from = "hr"
to = "app"
max_removal_ratio = 0.5

[pipelines.export]
from = "app"
to = "out"
"#
    ));
    s
}

fn id(user: &Map<String, Value>) -> String {
    user["id"].as_str().expect("id").to_string()
}

fn version(user: &Map<String, Value>) -> Value {
    user["meta"]["version"].clone()
}

async fn provision_and_export(app: App) {
    let admin = app.admin();
    admin
        .create("Groups", &json!({ "schemas": ["urn:ietf:params:scim:schemas:core:2.0:Group"], "displayName": GROUP }))
        .await
        .expect("group");
    // Someone the app had before contactsync: adopted, not duplicated; their own
    // title kept; not put in a group on their behalf.
    let existing = json!({ "schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"],
        "userName": "person8@example.com", "title": "Set by an admin", "name": { "givenName": "A." } });
    assert!(matches!(
        admin.create("Users", &existing).await.expect("seeded"),
        Written::Done(_)
    ));

    let s = scenario(&app);
    let newsletter = |i: usize| i.is_multiple_of(2);
    s.write(
        "people.csv",
        &people_csv((1..=PEOPLE).map(|i| (i, format!("Last{i}"), "Sales".into(), newsletter(i)))),
    );
    // `check` says what the server supports.
    let check = s.run_off_runtime(&["check"]).await;
    check.expect_code(0);
    assert!(
        check
            .stdout()
            .contains("ok    [sinks.app] (scim): PATCH yes, Bulk yes"),
        "{}",
        check.stdout()
    );
    let (run, report) = s.sync_off_runtime("hr", "app", &[]).await;
    run.expect_code(0);
    assert_eq!(counts(&report), [PEOPLE as u64, PEOPLE as u64, 0, 0, 0, 0]);
    let users = app.users().await;
    assert_eq!(users.len(), PEOPLE, "one user a person: person8 adopted");
    let p8 = &users["person8@example.com"];
    assert_eq!(p8["title"], "Set by an admin");
    assert_eq!(p8["name"]["givenName"], "Ann");
    assert_eq!(p8["externalId"], "E8");
    let members = app.group_members().await;
    assert_eq!(
        members.len(),
        PEOPLE / 2 - 1,
        "every subscriber but the adopted one"
    );
    assert!(!members.contains(&id(p8)));
    assert!(members.contains(&id(&users["person2@example.com"])));

    // A rerun with nothing changed writes nothing.
    let (run, report) = s.sync_off_runtime("hr", "app", &[]).await;
    run.expect_code(0);
    assert_eq!(counts(&report), [PEOPLE as u64, 0, 0, 0, PEOPLE as u64, 0]);
    let again = app.users().await;
    assert!(
        users.iter().all(|(k, u)| version(u) == version(&again[k])),
        "no user was written"
    );

    // In the app: an admin deactivates person20, gives person11 a title and renames
    // person12.
    app.admin_patch(
        &id(&users["person20@example.com"]),
        json!({ "op": "replace", "path": "active", "value": false }),
    )
    .await;
    app.admin_patch(
        &id(&users["person11@example.com"]),
        json!({ "op": "replace", "path": "title", "value": "Lead" }),
    )
    .await;
    app.admin_patch(
        &id(&users["person12@example.com"]),
        json!({ "op": "replace", "path": "userName", "value": "p12@corp.example.com" }),
    )
    .await;
    let before = app.users().await;

    // The night's delta: 10 new last names (11..=20), person2 leaves the newsletter,
    // person3 joins it, 996..=1000 leave, 1001..=1005 arrive.
    let rows = (1..=PEOPLE + 5)
        .filter(|i| !(996..=1000).contains(i))
        .map(|i| {
            let last = if (11..=20).contains(&i) {
                format!("New{i}")
            } else {
                format!("Last{i}")
            };
            let sub = match i {
                2 => false,
                3 => true,
                _ => newsletter(i),
            };
            (i, last, "Sales".to_string(), sub)
        });
    s.write("people.csv", &people_csv(rows));
    let (run, report) = s.sync_off_runtime("hr", "app", &[]).await;
    run.expect_code(0);
    assert_eq!(
        counts(&report),
        [PEOPLE as u64, 5, 12, 5, PEOPLE as u64 - 17, 0]
    );
    let after = app.users().await;
    assert_eq!(
        after.len(),
        PEOPLE + 5,
        "removed users are kept, deactivated; nobody created twice"
    );
    for i in 996..=1000 {
        assert_eq!(
            after[&format!("person{i}@example.com")]["active"],
            false,
            "person{i}"
        );
    }
    for i in 1001..=1005 {
        assert_eq!(
            after[&format!("person{i}@example.com")]["active"],
            true,
            "person{i}"
        );
    }
    let p20 = &after["person20@example.com"];
    assert_eq!(p20["name"]["familyName"], "New20");
    assert_eq!(
        p20["active"], false,
        "an admin's deactivation stands through an edit"
    );
    assert_eq!(
        after["person11@example.com"]["title"], "Lead",
        "only the changed attribute was written"
    );
    assert_eq!(after["person11@example.com"]["name"]["familyName"], "New11");
    let p12 = &after["p12@corp.example.com"];
    assert_eq!(
        p12["name"]["familyName"], "New12",
        "a renamed user is still addressed by their id"
    );
    let untouched: Vec<&String> = before
        .keys()
        .filter(|k| {
            // The renamed person12 has no such name, and changed.
            let i: Option<usize> = k
                .trim_start_matches("person")
                .trim_end_matches("@example.com")
                .parse()
                .ok();
            i.is_some_and(|i| {
                !(11..=20).contains(&i) && !(996..=1000).contains(&i) && i != 2 && i != 3
            })
        })
        .collect();
    assert!(
        untouched
            .iter()
            .all(|k| version(&before[*k]) == version(&after[*k])),
        "untouched users stay untouched"
    );
    let members = app.group_members().await;
    assert!(
        !members.contains(&id(&after["person2@example.com"])),
        "person2 left the group"
    );
    assert!(
        members.contains(&id(&after["person3@example.com"])),
        "person3 joined it"
    );
    assert!(
        members.contains(&id(&after["person1002@example.com"])),
        "a new subscriber joined it"
    );

    // Everyone, read back.
    let (run, report) = s.sync_off_runtime("app", "out", &[]).await;
    run.expect_code(0);
    assert_eq!(report["complete_read"], true);
    let rows = read_rows(&s.path("out.csv"));
    assert_eq!(rows.len(), PEOPLE + 5);
    let out: BTreeMap<String, csv::StringRecord> = {
        let mut reader = csv::Reader::from_path(s.path("out.csv")).expect("out.csv");
        let headers = reader.headers().expect("header").clone();
        let email = headers
            .iter()
            .position(|h| h == "email")
            .expect("email column");
        reader
            .records()
            .map(|r| r.expect("row"))
            .map(|r| (r[email].to_string(), r))
            .collect()
    };
    assert_eq!(out.len(), PEOPLE + 5);
    let headers = csv::Reader::from_path(s.path("out.csv"))
        .expect("out.csv")
        .headers()
        .expect("h")
        .clone();
    let col = |name: &str| {
        headers
            .iter()
            .position(|h| h == name)
            .unwrap_or_else(|| panic!("{name} column"))
    };
    assert_eq!(
        &out["person3@example.com"][col("subscriptions")],
        "newsletter"
    );
    assert_eq!(&out["person2@example.com"][col("subscriptions")], "");
    assert_eq!(&out["person20@example.com"][col("status")], "inactive");
    assert_eq!(&out["person15@example.com"][col("last_name")], "New15");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn csv_to_scim_and_back_against_the_sandbox() {
    let sb = ScimSandbox::start(SandboxConfig::default())
        .await
        .expect("sandbox");
    let app = App {
        base_url: sb.base_url().to_string(),
        token: sb.token().to_string(),
    };
    provision_and_export(app).await;
    // The writes went in bulk requests.
    let requests = sb.requests();
    assert!(requests.iter().any(|r| r.path == "/Bulk"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn csv_to_scim_and_back_against_scim2_server() {
    let server = Scim2Server::start().expect("scim2-server");
    let app = App {
        base_url: server.base_url(),
        token: server.token().to_string(),
    };
    provision_and_export(app).await;
}
