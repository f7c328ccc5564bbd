//! The Poppulo sandbox over real HTTP: it must enforce what the API documents, so that
//! a client passing against it has been held to the documented rules.

use std::time::Duration;

use contactsync_sandbox_poppulo::{
    Faults, ImportStatus, PoppuloSandbox, RemovedBy, RunningPoppulo, SandboxConfig, Subscriber,
    SubscriberStatus, WireFaults,
};
use reqwest::StatusCode;

const PING: Duration = Duration::from_millis(300);

fn fast() -> SandboxConfig {
    SandboxConfig {
        ping_interval: PING,
        tick: Duration::from_millis(10),
        records_per_tick: 1000,
        ..SandboxConfig::default()
    }
}

async fn start(config: SandboxConfig) -> RunningPoppulo {
    match PoppuloSandbox::start(config).await {
        Ok(sandbox) => sandbox,
        Err(e) => panic!("sandbox did not start: {e}"),
    }
}

struct Api {
    http: reqwest::Client,
    account_url: String,
    user: String,
    password: String,
}

impl Api {
    fn new(sandbox: &RunningPoppulo) -> Api {
        Api {
            http: reqwest::Client::builder()
                .user_agent("contactsync-sandbox-test")
                .build()
                .expect("client"),
            account_url: sandbox.account_url(),
            user: sandbox.username().to_string(),
            password: sandbox.password().to_string(),
        }
    }

    async fn get(&self, url: &str) -> reqwest::Response {
        self.http
            .get(url)
            .basic_auth(&self.user, Some(&self.password))
            .header("Accept", "application/xml")
            .send()
            .await
            .expect("GET")
    }

    async fn send_xml(
        &self,
        method: reqwest::Method,
        path: &str,
        body: String,
    ) -> reqwest::Response {
        self.http
            .request(method, format!("{}/{path}", self.account_url))
            .basic_auth(&self.user, Some(&self.password))
            .header("Content-Type", "application/xml; charset=UTF-8")
            .body(body)
            .send()
            .await
            .expect("send")
    }

    async fn post_job(&self, body: String) -> reqwest::Response {
        self.send_xml(reqwest::Method::POST, "subscriber_imports", body)
            .await
    }

    /// Posts a job, expects 202, returns the import's href.
    async fn submit(&self, body: String) -> String {
        let response = self.post_job(body).await;
        assert_eq!(response.status(), StatusCode::ACCEPTED);
        let text = response.text().await.expect("body");
        attr(&text, "link", "href")
    }

    /// Polls an import no earlier than its ping_after until it has finished.
    async fn finish(&self, href: &str) -> String {
        for _ in 0..200 {
            let response = self.get(href).await;
            assert_eq!(response.status(), StatusCode::OK, "poll refused");
            let text = response.text().await.expect("body");
            if attr(&text, "subscriber_import", "status") != "IN_PROGRESS" {
                return text;
            }
            tokio::time::sleep(PING + Duration::from_millis(50)).await;
        }
        panic!("import never finished");
    }
}

/// The text of the first `<name>` element.
fn tag(xml: &str, name: &str) -> String {
    let open = format!("<{name}>");
    let start = xml
        .find(&open)
        .unwrap_or_else(|| panic!("no <{name}> in {xml}"))
        + open.len();
    let end = xml[start..]
        .find(&format!("</{name}>"))
        .expect("closing tag")
        + start;
    xml[start..end].to_string()
}

/// An attribute of the first `<element …>`.
fn attr(xml: &str, element: &str, name: &str) -> String {
    let start = xml
        .find(&format!("<{element} "))
        .unwrap_or_else(|| panic!("no <{element}> in {xml}"));
    let rest = &xml[start..];
    let rest = &rest[..rest.find('>').expect("end of tag")];
    let key = format!(" {name}=\"");
    let at = rest
        .find(&key)
        .unwrap_or_else(|| panic!("no {name} in {rest}"))
        + key.len();
    rest[at..at + rest[at..].find('"').expect("quote")].replace("&amp;", "&")
}

fn job(columns: &str, data: &str, options: &str) -> String {
    format!(
        "<subscriber_import_job><accept_terms>true</accept_terms>{options}\
         <subscriber_data><columns>{columns}</columns><skip_first_line>false</skip_first_line>\
         <field_separator>comma</field_separator><data><![CDATA[{data}]]></data></subscriber_data>\
         </subscriber_import_job>"
    )
}

const UPDATE: &str = "<update_existing>true</update_existing>";

#[tokio::test]
async fn every_request_needs_basic_auth_for_the_account() {
    let sandbox = start(fast()).await;
    let api = Api::new(&sandbox);
    let url = format!("{}/subscribers", api.account_url);
    let none = api.http.get(&url).send().await.expect("send");
    assert_eq!(none.status(), StatusCode::UNAUTHORIZED);
    assert!(none.headers().contains_key("www-authenticate"));
    let body = none.text().await.expect("body");
    assert_eq!(tag(&body, "status_code"), "401");
    assert!(tag(&body, "warning").contains("Basic"));
    let wrong = api
        .http
        .get(&url)
        .basic_auth("sandbox", Some("nope"))
        .send()
        .await
        .expect("send");
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
    let other_account = format!("{}/other/subscribers", sandbox.base_url());
    assert_eq!(
        api.get(&other_account).await.status(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(api.get(&url).await.status(), StatusCode::OK);
    assert_eq!(sandbox.stats().unauthorized, 3);
    assert_eq!(sandbox.username(), "sandbox");
    assert_eq!(sandbox.password(), "sandbox");
    assert_eq!(sandbox.account(), "demo");
    assert!(
        sandbox.base_url().starts_with("http://127.0.0.1:") && sandbox.base_url().ends_with("/v2")
    );
}

#[tokio::test]
async fn every_request_needs_a_user_agent() {
    let sandbox = start(fast()).await;
    let http = reqwest::Client::new();
    let response = http
        .get(format!("{}/subscribers", sandbox.account_url()))
        .basic_auth("sandbox", Some("sandbox"))
        .send()
        .await
        .expect("send");
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let body = response.text().await.expect("body");
    assert_eq!(tag(&body, "status_code"), "400");
    assert!(tag(&body, "warning").contains("User-Agent"));
}

#[tokio::test]
async fn invalid_jobs_are_refused_with_409() {
    let sandbox = start(fast().with_custom_fields(["Department"])).await;
    let api = Api::new(&sandbox);
    let no_terms =
        job("email", "a@example.com", "").replace("<accept_terms>true</accept_terms>", "");
    let false_terms = job("email", "a@example.com", "").replace(
        "<accept_terms>true</accept_terms>",
        "<accept_terms>false</accept_terms>",
    );
    let no_columns = job("email", "a@example.com", "").replace("<columns>email</columns>", "");
    let cases = [
        ("accept_terms missing", no_terms),
        ("accept_terms false", false_terms),
        (
            "column twice",
            job("email,company,company", "a@example.com,X,Y", ""),
        ),
        (
            "employee id twice",
            job(
                "email,employeeId,personalDetails.employeeId",
                "a@example.com,1,1",
                "",
            ),
        ),
        (
            "misspelt field",
            job("email,name.firstname", "a@example.com,Ann", ""),
        ),
        ("wrong case", job("Email", "a@example.com", "")),
        (
            "undeclared custom field",
            job("email,Team", "a@example.com,X", ""),
        ),
        ("columns missing", no_columns),
        ("empty data", job("email", "", "")),
        (
            "row too short",
            job(
                "email,name.first name",
                "a@example.com,Ann\nb@example.com",
                "",
            ),
        ),
        ("row too long", job("email", "a@example.com,extra", "")),
        ("no email column", job("name.first name", "Ann", "")),
        (
            "unknown set_field",
            job(
                "email",
                "a@example.com",
                "<set_fields><set_field name=\"Nope\">x</set_field></set_fields>",
            ),
        ),
    ];
    for (case, body) in cases {
        let response = api.post_job(body).await;
        assert_eq!(response.status(), StatusCode::CONFLICT, "{case}");
        let text = response.text().await.expect("body");
        assert_eq!(tag(&text, "status_code"), "409", "{case}");
        assert!(!tag(&text, "warning").is_empty(), "{case}");
    }
    let malformed = api
        .post_job("<subscriber_import_job><accept_terms>".into())
        .await;
    assert_eq!(malformed.status(), StatusCode::BAD_REQUEST);
    let not_xml = api
        .http
        .post(format!("{}/subscriber_imports", api.account_url))
        .basic_auth("sandbox", Some("sandbox"))
        .header("Content-Type", "text/plain")
        .body(job("email", "a@example.com", ""))
        .send()
        .await
        .expect("send");
    assert_eq!(not_xml.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert!(sandbox.imports().is_empty());
    // A declared custom field is fine.
    api.submit(job("email,Department", "a@example.com,Sales", ""))
        .await;
}

#[tokio::test]
async fn an_import_is_polled_no_earlier_than_ping_after_and_completes() {
    let config = SandboxConfig {
        records_per_tick: 2,
        tick: Duration::from_millis(100),
        ..fast()
    }
    .with_custom_fields(["Department", "source"]);
    let sandbox = start(config).await;
    let api = Api::new(&sandbox);
    let data = "ann@example.com,Ann,Lee,Sales,Newsletter,ACTIVE\n\
                bob@example.com,Bob,Ray,IT,Newsletter|Flyer,ACTIVE\n\
                cy@example.com,Cy,Ng,HR,,ACTIVE\n\
                di@example.com,Di,Oh,HR,,INACTIVE\n\
                ed@example.com,Ed,Po,HR,,OPT_OUT";
    let options = format!(
        "{UPDATE}<set_fields><set_field name=\"source\">hr-sync</set_field></set_fields>\
         <add_permissions><permission name=\"Intranet\"/></add_permissions><tags><tag name=\"HR Sync\"/></tags>"
    );
    let response = api
        .post_job(job(
            "email,name.first name,name.surname,Department,permissions,status",
            data,
            &options,
        ))
        .await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let body = response.text().await.expect("body");
    assert_eq!(tag(&body, "status_code"), "202");
    let href = attr(&body, "link", "href");
    assert_eq!(
        attr(&body, "link", "rel"),
        "http://api-info.newsweaver.com/v2/rels/status.created"
    );
    assert_eq!(
        href,
        format!("{}/subscriber_import/1", sandbox.account_url())
    );

    let first = api.get(&href).await;
    assert_eq!(first.status(), StatusCode::OK);
    let first = first.text().await.expect("body");
    assert_eq!(attr(&first, "subscriber_import", "status"), "IN_PROGRESS");
    assert_eq!(attr(&first, "subscriber_import", "uri"), href);
    assert_eq!(tag(&first, "total_records"), "5");
    let processed: usize = tag(&first, "records_processed").parse().expect("number");
    assert!(processed < 5);
    let ping_after = tag(&first, "ping_after");
    assert!(
        chrono::DateTime::parse_from_rfc3339(&ping_after).is_ok() && ping_after.ends_with('Z'),
        "{ping_after}"
    );
    assert!(!first.contains("<results>"));
    assert_eq!(
        tag(&first, "columns"),
        "email,name.first name,name.surname,Department,permissions,status"
    );
    assert!(first.contains("<set_field name=\"source\">hr-sync</set_field>"));
    assert!(
        !first.contains("ann@example.com"),
        "the specification has no data"
    );

    let early = api.get(&href).await;
    assert_eq!(early.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(early.headers().contains_key("retry-after"));
    assert_eq!(sandbox.stats().early_polls, 1);

    tokio::time::sleep(PING + Duration::from_millis(50)).await;
    let done = api.finish(&href).await;
    assert_eq!(attr(&done, "subscriber_import", "status"), "COMPLETED");
    assert!(!done.contains("<progress>"));
    assert_eq!(tag(&done, "total_records"), "5");
    assert_eq!(tag(&done, "new_subscribers"), "5");
    assert_eq!(tag(&done, "updated_subscribers"), "0");
    assert_eq!(tag(&done, "invalid_subscribers"), "0");
    assert_eq!(tag(&done, "duplicate_subscribers"), "0");
    assert_eq!(tag(&done, "previously_opted_out"), "0");
    assert!(done.contains(&format!(
        "<link rel=\"http://api-info.newsweaver.com/v2/rels/subscriber_import.invalid_subscribers\" href=\"{href}/invalid_subscribers\"/>"
    )));
    assert_eq!(sandbox.stats().early_polls, 1);

    let bob = sandbox.subscriber("bob@EXAMPLE.com").expect("bob");
    assert_eq!(bob.field("first_name"), Some("Bob"));
    assert_eq!(
        bob.custom_fields.get("Department").map(String::as_str),
        Some("IT")
    );
    assert_eq!(
        bob.custom_fields.get("source").map(String::as_str),
        Some("hr-sync")
    );
    assert_eq!(
        bob.permissions
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
        ["Flyer", "Intranet", "Newsletter"]
    );
    assert!(bob.tags.contains("HR Sync"));
    let di = sandbox.subscriber("di@example.com").expect("di");
    assert_eq!(
        (di.status, di.removed_by),
        (SubscriberStatus::Inactive, Some(RemovedBy::Api))
    );
    let ed = sandbox.subscriber("ed@example.com").expect("ed");
    assert_eq!(ed.status, SubscriberStatus::OptOut);
    assert!(ed.permissions.is_empty(), "OPT_OUT drops all permissions");
    let imports = sandbox.imports();
    assert_eq!(imports.len(), 1);
    assert_eq!(imports[0].rows.len(), 5);
    assert_eq!(imports[0].rows[1][0], "bob@example.com");
}

#[tokio::test]
async fn rejected_rows_come_back_in_three_csv_sections() {
    let sandbox = start(fast()).await;
    sandbox
        .seed_subscriber(
            Subscriber::self_opted_out("gone@example.com").with_field("first_name", "Gone"),
        )
        .expect("seed");
    let api = Api::new(&sandbox);
    let data = "ok@example.com,Ok,ACTIVE\n\
                not-an-email,Bad,ACTIVE\n\
                \"ok@Example.COM\",\"Again, twice\",ACTIVE\n\
                gone@example.com,Back,ACTIVE\n\
                un@example.com,Un,UNCONFIRMED\n\
                wat@example.com,Wat,active";
    let href = api
        .submit(job("email,name.first name,status", data, UPDATE))
        .await;
    let done = api.finish(&href).await;
    assert_eq!(attr(&done, "subscriber_import", "status"), "COMPLETED");
    assert_eq!(tag(&done, "total_records"), "6");
    assert_eq!(tag(&done, "new_subscribers"), "1");
    assert_eq!(tag(&done, "updated_subscribers"), "0");
    assert_eq!(tag(&done, "invalid_subscribers"), "3");
    assert_eq!(tag(&done, "duplicate_subscribers"), "1");
    assert_eq!(tag(&done, "previously_opted_out"), "1");

    let gone = sandbox.subscriber("gone@example.com").expect("gone");
    assert_eq!(gone.status, SubscriberStatus::OptOut);
    assert_eq!(
        gone.field("first_name"),
        Some("Gone"),
        "an own opt-out is not touched"
    );
    assert!(gone.opted_out_by_subscriber());

    let response = api.get(&format!("{href}/invalid_subscribers")).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert!(response.headers()["content-type"]
        .to_str()
        .expect("ascii")
        .starts_with("text/csv"));
    let csv = response.text().await.expect("body");
    assert_eq!(
        csv,
        "\"Invalid Subscribers\"\r\nemail,name.first name,status\r\n\
         not-an-email,Bad,ACTIVE\r\nun@example.com,Un,UNCONFIRMED\r\nwat@example.com,Wat,active\r\n\
         \"Duplicate Subscribers\"\r\nemail,name.first name,status\r\n\
         ok@Example.COM,\"Again, twice\",ACTIVE\r\n\
         \"Opted-out Subscribers\"\r\nemail,name.first name,status\r\n\
         gone@example.com,Back,ACTIVE\r\n"
    );
    let unknown = api
        .get(&format!(
            "{}/subscriber_import/999/invalid_subscribers",
            api.account_url
        ))
        .await;
    assert_eq!(unknown.status(), StatusCode::NOT_FOUND);
    assert_eq!(
        api.get(&format!("{}/subscriber_import/999", api.account_url))
            .await
            .status(),
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn removed_subscribers_come_back_only_when_asked() {
    let sandbox = start(fast()).await;
    let api = Api::new(&sandbox);
    let href = api
        .submit(job(
            "email,status,permissions",
            "a@example.com,INACTIVE,News\nb@example.com,OPT_OUT,News",
            UPDATE,
        ))
        .await;
    api.finish(&href).await;
    // Without reactivate_api_removed, ACTIVE rows for API-removed people are skipped.
    let href = api
        .submit(job(
            "email,status,name.first name",
            "a@example.com,ACTIVE,A\nb@example.com,ACTIVE,B",
            UPDATE,
        ))
        .await;
    let done = api.finish(&href).await;
    assert_eq!(tag(&done, "updated_subscribers"), "0");
    assert_eq!(tag(&done, "invalid_subscribers"), "0");
    assert_eq!(sandbox.imports()[1].results.skipped, 2);
    assert_eq!(
        sandbox.subscriber("a@example.com").expect("a").status,
        SubscriberStatus::Inactive
    );
    assert_eq!(
        sandbox
            .subscriber("a@example.com")
            .expect("a")
            .field("first_name"),
        None
    );
    let options = format!("{UPDATE}<reactivate_api_removed>true</reactivate_api_removed>");
    let href = api
        .submit(job(
            "email,status,name.first name",
            "a@example.com,ACTIVE,A\nb@example.com,ACTIVE,B",
            &options,
        ))
        .await;
    let done = api.finish(&href).await;
    assert_eq!(tag(&done, "updated_subscribers"), "2");
    let a = sandbox.subscriber("a@example.com").expect("a");
    assert_eq!(
        (a.status, a.removed_by, a.field("first_name")),
        (SubscriberStatus::Active, None, Some("A"))
    );
    assert!(a.permissions.contains("News"), "INACTIVE keeps permissions");
    let b = sandbox.subscriber("b@example.com").expect("b");
    assert_eq!(b.status, SubscriberStatus::Active);
    assert!(b.permissions.is_empty(), "OPT_OUT dropped them");
    // update_existing=false only creates.
    let href = api
        .submit(job(
            "email,name.first name",
            "a@example.com,Changed\nnew@example.com,New",
            "",
        ))
        .await;
    let done = api.finish(&href).await;
    assert_eq!(
        (
            tag(&done, "new_subscribers"),
            tag(&done, "updated_subscribers")
        ),
        ("1".into(), "0".into())
    );
    assert_eq!(
        sandbox
            .subscriber("a@example.com")
            .expect("a")
            .field("first_name"),
        Some("A")
    );
}

#[tokio::test]
async fn separators_header_lines_and_split_cdata() {
    let sandbox = start(fast()).await;
    let api = Api::new(&sandbox);
    let body = "<subscriber_import_job><accept_terms>true</accept_terms><subscriber_data>\
                <columns>email,company</columns><skip_first_line>true</skip_first_line>\
                <field_separator>semicolon</field_separator>\
                <data><![CDATA[Email;Company\nx@example.com;Odd]]]]><![CDATA[>Co\ny@example.com;\"A;B\"]]></data>\
                </subscriber_data></subscriber_import_job>"
        .to_string();
    let href = api.submit(body).await;
    let done = api.finish(&href).await;
    assert_eq!(tag(&done, "new_subscribers"), "2");
    assert_eq!(tag(&done, "field_separator"), "semicolon");
    assert_eq!(
        sandbox
            .subscriber("x@example.com")
            .expect("x")
            .field("company"),
        Some("Odd]]>Co")
    );
    assert_eq!(
        sandbox
            .subscriber("y@example.com")
            .expect("y")
            .field("company"),
        Some("A;B")
    );
}

#[tokio::test]
async fn a_second_import_waits_for_the_first() {
    let config = SandboxConfig {
        records_per_tick: 1,
        tick: Duration::from_millis(100),
        ..fast()
    };
    let sandbox = start(config).await;
    let api = Api::new(&sandbox);
    let href = api
        .submit(job(
            "email",
            "a@example.com\nb@example.com\nc@example.com",
            "",
        ))
        .await;
    let second = api.post_job(job("email", "d@example.com", "")).await;
    assert_eq!(second.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        !second.headers().contains_key("retry-after"),
        "busy is not throttling"
    );
    assert_eq!(
        tag(&second.text().await.expect("body"), "status_code"),
        "503"
    );
    assert_eq!(sandbox.stats().imports_refused_busy, 1);
    api.finish(&href).await;
    api.submit(job("email", "d@example.com", "")).await;
    assert_eq!(sandbox.stats().imports_posted, 2);

    sandbox.set_faults(Faults {
        busy_for_ms: 300,
        ..Faults::default()
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let busy = api.post_job(job("email", "e@example.com", "")).await;
    assert_eq!(busy.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(!busy.headers().contains_key("retry-after"));
}

#[tokio::test]
async fn throttling_answers_503_with_retry_after() {
    let sandbox = start(fast()).await;
    sandbox.set_wire_faults(WireFaults {
        throttle_every: 3,
        retry_after_secs: 7,
        ..WireFaults::default()
    });
    let api = Api::new(&sandbox);
    let url = format!("{}/subscribers", api.account_url);
    let mut codes = Vec::new();
    for _ in 0..6 {
        let response = api.get(&url).await;
        if response.status() == StatusCode::SERVICE_UNAVAILABLE {
            assert_eq!(response.headers()["retry-after"], "7");
        }
        codes.push(response.status().as_u16());
    }
    assert_eq!(codes, [200, 200, 503, 200, 200, 503]);
    let stats = sandbox.stats();
    assert_eq!(stats.throttled, 2);
    assert_eq!(
        stats.requests_by_route.get("GET /v2/{account}/subscribers"),
        Some(&6)
    );
}

#[tokio::test]
async fn injected_error_and_cancellation() {
    let sandbox = start(SandboxConfig {
        records_per_tick: 1,
        ..fast()
    })
    .await;
    let api = Api::new(&sandbox);
    sandbox.set_faults(Faults {
        fail_next_import: true,
        ..Faults::default()
    });
    let href = api
        .submit(job("email", "a@example.com\nb@example.com", ""))
        .await;
    let done = api.finish(&href).await;
    assert_eq!(attr(&done, "subscriber_import", "status"), "ERROR");
    assert_eq!(tag(&done, "total_records"), "2");
    assert_eq!(tag(&done, "new_subscribers"), "0");
    assert!(sandbox.subscribers().is_empty());
    assert!(
        !sandbox.faults().fail_next_import,
        "only the next import fails"
    );

    sandbox.set_faults(Faults {
        cancel_next_import_after: Some(2),
        ..Faults::default()
    });
    let href = api
        .submit(job(
            "email",
            "a@example.com\nb@example.com\nc@example.com\nd@example.com",
            "",
        ))
        .await;
    let done = api.finish(&href).await;
    assert_eq!(attr(&done, "subscriber_import", "status"), "CANCELLED");
    assert_eq!(tag(&done, "total_records"), "4");
    assert_eq!(tag(&done, "new_subscribers"), "2");
    assert_eq!(sandbox.subscribers().len(), 2);
    assert_eq!(sandbox.imports()[1].status, ImportStatus::Cancelled);

    let href = api.submit(job("email", "e@example.com", "")).await;
    let done = api.finish(&href).await;
    assert_eq!(attr(&done, "subscriber_import", "status"), "COMPLETED");
}

#[tokio::test]
async fn subscriber_lists_are_paged_with_next_links() {
    let sandbox = start(SandboxConfig {
        page_size: 2,
        ..fast()
    })
    .await;
    let api = Api::new(&sandbox);
    let data = "a@example.com,E1,ACTIVE\nb@example.com,E2,ACTIVE\nc@example.com,E3,INACTIVE\n\
                d@example.com,E4,ACTIVE\ne@example.com,E1,ACTIVE";
    let href = api.submit(job("email,externalId,status", data, "")).await;
    api.finish(&href).await;

    let mut url = format!("{}/subscribers?status=active", api.account_url);
    let mut emails = Vec::new();
    let mut pages = 0;
    loop {
        let response = api.get(&url).await;
        assert_eq!(response.status(), StatusCode::OK);
        let page = response.text().await.expect("body");
        assert_eq!(attr(&page, "subscribers", "totalResults"), "4");
        assert_eq!(attr(&page, "subscribers", "itemsPerPage"), "2");
        pages += 1;
        let mut rest = page.as_str();
        while let Some(at) = rest.find("<email>") {
            emails.push(tag(&rest[at..], "email"));
            rest = &rest[at + 7..];
        }
        if !page.contains("rel=\"next\"") {
            break;
        }
        url = attr(&page, "link", "href");
        assert!(url.starts_with(&api.account_url), "{url}");
    }
    assert_eq!(pages, 2);
    assert_eq!(
        emails,
        [
            "a@example.com",
            "b@example.com",
            "d@example.com",
            "e@example.com"
        ]
    );

    let by_ext = api
        .get(&format!(
            "{}/subscribers?status=all&ext_id=E1",
            api.account_url
        ))
        .await;
    let by_ext = by_ext.text().await.expect("body");
    assert_eq!(attr(&by_ext, "subscribers", "totalResults"), "2");
    assert!(by_ext.contains("<external_id>E1</external_id>"));
    let all = api
        .get(&format!("{}/subscribers?status=all", api.account_url))
        .await;
    assert_eq!(
        attr(
            &all.text().await.expect("body"),
            "subscribers",
            "totalResults"
        ),
        "5"
    );
    let bad = api
        .get(&format!("{}/subscribers?status=everyone", api.account_url))
        .await;
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn single_subscribers_with_etags() {
    let sandbox = start(fast().with_custom_fields(["Dept"])).await;
    let api = Api::new(&sandbox);
    let body = "<subscriber><email>ann@example.com</email><first_name>Ann</first_name>\
                <personal_details><employee_id>42</employee_id></personal_details>\
                <custom_fields><custom_field name=\"Dept\">Sales</custom_field></custom_fields></subscriber>";
    let created = api
        .send_xml(reqwest::Method::POST, "subscribers", body.into())
        .await;
    assert_eq!(created.status(), StatusCode::CREATED);
    let again = api
        .send_xml(reqwest::Method::POST, "subscribers", body.into())
        .await;
    assert_eq!(again.status(), StatusCode::CONFLICT);

    let got = api
        .get(&format!("{}/subscriber/ann@example.com", api.account_url))
        .await;
    assert_eq!(got.status(), StatusCode::OK);
    let etag = got.headers()["etag"].to_str().expect("ascii").to_string();
    let xml = got.text().await.expect("body");
    assert_eq!(tag(&xml, "employee_id"), "42");
    assert!(xml.contains("<custom_field name=\"Dept\">Sales</custom_field>"));
    let uri = attr(&xml, "subscriber", "uri");
    assert_eq!(api.get(&uri).await.status(), StatusCode::OK);

    let put = |if_match: String| {
        api.http
            .put(format!("{}/subscriber/ann@example.com", api.account_url))
            .basic_auth("sandbox", Some("sandbox"))
            .header("Content-Type", "application/xml")
            .header("If-Match", if_match)
            .body("<subscriber><surname>Lee</surname></subscriber>")
            .send()
    };
    assert_eq!(
        put(etag.clone()).await.expect("put").status(),
        StatusCode::OK
    );
    assert_eq!(
        put(etag).await.expect("put").status(),
        StatusCode::PRECONDITION_FAILED
    );
    assert_eq!(
        sandbox
            .subscriber("ann@example.com")
            .expect("ann")
            .field("surname"),
        Some("Lee")
    );

    sandbox
        .seed_subscriber(Subscriber::self_opted_out("gone@example.com"))
        .expect("seed");
    let reverse = api
        .send_xml(
            reqwest::Method::PUT,
            "subscriber/gone@example.com",
            "<subscriber><status>ACTIVE</status></subscriber>".into(),
        )
        .await;
    assert_eq!(reverse.status(), StatusCode::CONFLICT);
    let missing = api
        .get(&format!(
            "{}/subscriber/nobody@example.com",
            api.account_url
        ))
        .await;
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn dropped_connections_get_no_answer() {
    let sandbox = start(fast()).await;
    let api = Api::new(&sandbox);
    sandbox.set_wire_faults(WireFaults::answer_lost(2));
    let url = format!("{}/subscribers", api.account_url);
    assert_eq!(api.get(&url).await.status(), StatusCode::OK);
    let lost = api
        .http
        .post(format!("{}/subscriber_imports", api.account_url))
        .basic_auth("sandbox", Some("sandbox"))
        .header("Content-Type", "application/xml")
        .body(job("email", "a@example.com", ""))
        .send()
        .await;
    assert!(lost.is_err(), "the answer must be lost: {lost:?}");
    assert_eq!(sandbox.imports().len(), 1, "but the import was taken");
    assert_eq!(api.get(&url).await.status(), StatusCode::OK);
    assert_eq!(sandbox.stats().dropped, 1);
}

#[tokio::test]
async fn data_survives_a_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("poppulo.json");
    let config = SandboxConfig {
        data_file: Some(file.clone()),
        ..fast()
    };
    let sandbox = start(config.clone()).await;
    let api = Api::new(&sandbox);
    let href = api
        .submit(job("email,name.first name", "ann@example.com,Ann", ""))
        .await;
    api.finish(&href).await;
    sandbox
        .seed_subscriber(Subscriber::self_opted_out("gone@example.com"))
        .expect("seed");
    sandbox.shutdown().await.expect("shutdown");
    assert!(file.exists());

    let again = start(config).await;
    let subscribers = again.subscribers();
    assert_eq!(subscribers.len(), 2);
    assert_eq!(subscribers[0].field("first_name"), Some("Ann"));
    assert!(subscribers[1].opted_out_by_subscriber());
    let api = Api::new(&again);
    let old = api
        .get(&format!("{}/subscriber_import/1", api.account_url))
        .await;
    assert_eq!(
        attr(
            &old.text().await.expect("body"),
            "subscriber_import",
            "status"
        ),
        "COMPLETED"
    );
    let href = api.submit(job("email", "bob@example.com", "")).await;
    assert!(href.ends_with("/subscriber_import/2"), "{href}");
}

#[tokio::test]
async fn the_registry_starts_it_with_the_connector_settings() {
    let factory = contactsync_core::registry::sandbox("poppulo").expect("registered");
    let settings = contactsync_core::ConnectorSettings::from_toml(
        "sinks.poppulo",
        "account = \"acme\"\nusername = \"api\"\npassword = \"s3cret\"\nbase_url = \"sandbox\"\n",
    )
    .expect("settings");
    let running = (factory.start)(contactsync_core::registry::SandboxOptions {
        settings: Some(settings),
        ..Default::default()
    })
    .await
    .expect("started");
    assert!(running.base_url.ends_with("/v2"));
    let http = reqwest::Client::builder()
        .user_agent("t")
        .build()
        .expect("client");
    let url = format!("{}/acme/subscribers", running.base_url);
    let ok = http
        .get(&url)
        .basic_auth("api", Some("s3cret"))
        .send()
        .await
        .expect("send");
    assert_eq!(ok.status(), StatusCode::OK);
    let default = http
        .get(&url)
        .basic_auth("sandbox", Some("sandbox"))
        .send()
        .await
        .expect("send");
    assert_eq!(default.status(), StatusCode::UNAUTHORIZED);
    let faults = http
        .post(running.base_url.replace("/v2", "/_sandbox/faults"))
        .body(r#"{ "throttle_every": 1, "retry_after_secs": 2 }"#)
        .header("Content-Type", "application/json")
        .send()
        .await
        .expect("send");
    assert_eq!(faults.status(), StatusCode::OK);
    let throttled = http
        .get(&url)
        .basic_auth("api", Some("s3cret"))
        .send()
        .await
        .expect("send");
    assert_eq!(throttled.status(), StatusCode::SERVICE_UNAVAILABLE);
    let stats = http
        .get(running.base_url.replace("/v2", "/_sandbox/stats"))
        .send()
        .await
        .expect("send")
        .text()
        .await
        .expect("body");
    let stats: serde_json::Value = serde_json::from_str(&stats).expect("json");
    assert_eq!(stats["throttled"], 1);
    assert_eq!(stats["requests"], 3);
    running.shutdown.cancel();
}

#[tokio::test]
async fn delays_and_drops_before_handling() {
    let sandbox = start(fast()).await;
    let api = Api::new(&sandbox);
    sandbox.set_wire_faults(WireFaults {
        delay_ms: 200,
        drop_nth: Some(1),
        ..WireFaults::default()
    });
    let lost = api
        .http
        .post(format!("{}/subscriber_imports", api.account_url))
        .basic_auth("sandbox", Some("sandbox"))
        .header("Content-Type", "application/xml")
        .body(job("email", "a@example.com", ""))
        .send()
        .await;
    assert!(lost.is_err(), "the answer must be lost: {lost:?}");
    assert!(
        sandbox.imports().is_empty(),
        "dropped before handling: nothing was taken"
    );
    let started = std::time::Instant::now();
    assert_eq!(
        api.get(&format!("{}/subscribers", api.account_url))
            .await
            .status(),
        StatusCode::OK
    );
    assert!(started.elapsed() >= Duration::from_millis(200));
}
