//! The sandbox over HTTP, as RFC 7644 describes the protocol.

use contactsync_sandbox_scim::{Faults, RunningScim, SandboxConfig, ScimSandbox, USER_SCHEMA};
use reqwest::{Method, StatusCode};
use serde_json::{json, Value};

struct Client {
    sb: RunningScim,
    http: reqwest::Client,
}

impl Client {
    async fn new(config: SandboxConfig) -> Client {
        Client {
            sb: ScimSandbox::start(config).await.expect("started"),
            http: reqwest::Client::new(),
        }
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
        if_match: Option<&str>,
    ) -> (StatusCode, Option<String>, Value) {
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.sb.base_url()))
            .bearer_auth(self.sb.token());
        if let Some(body) = body {
            request = request
                .header("content-type", "application/scim+json")
                .body(body.to_string());
        }
        if let Some(v) = if_match {
            request = request.header("if-match", v);
        }
        let answer = request.send().await.expect("answer");
        let status = answer.status();
        let etag = answer
            .headers()
            .get("etag")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let text = answer.text().await.expect("body");
        (
            status,
            etag,
            serde_json::from_str(&text).unwrap_or(Value::Null),
        )
    }
}

fn user(name: &str) -> Value {
    json!({ "schemas": [USER_SCHEMA], "userName": name, "emails": [{ "value": name, "type": "work", "primary": true }] })
}

#[tokio::test]
async fn users_are_created_found_patched_and_guarded_by_their_version() {
    let c = Client::new(SandboxConfig::default()).await;
    let anonymous = c
        .http
        .get(format!("{}/Users", c.sb.base_url()))
        .send()
        .await
        .expect("answer");
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);
    let (status, _, config) = c
        .call(Method::GET, "/ServiceProviderConfig", None, None)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(config["patch"]["supported"], true);
    assert_eq!(config["bulk"]["maxOperations"], 100);

    let (status, etag, ann) = c
        .call(Method::POST, "/Users", Some(user("ann@example.com")), None)
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let id = ann["id"].as_str().expect("id").to_string();
    let (status, _, dup) = c
        .call(Method::POST, "/Users", Some(user("Ann@Example.com")), None)
        .await;
    assert_eq!(
        (status, dup["scimType"].as_str()),
        (StatusCode::CONFLICT, Some("uniqueness"))
    );
    assert_eq!(dup["status"], "409");

    let (_, _, found) = c
        .call(
            Method::GET,
            "/Users?filter=userName%20eq%20%22ANN@example.com%22",
            None,
            None,
        )
        .await;
    assert_eq!(found["totalResults"], 1);
    assert_eq!(found["Resources"][0]["id"], id.as_str());

    let patch = json!({ "schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"],
        "Operations": [{ "op": "replace", "path": "title", "value": "Boss" }] });
    let (status, etag2, patched) = c
        .call(
            Method::PATCH,
            &format!("/Users/{id}"),
            Some(patch.clone()),
            etag.as_deref(),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(patched["title"], "Boss");
    assert_ne!(etag, etag2);
    let (status, _, _) = c
        .call(
            Method::PATCH,
            &format!("/Users/{id}"),
            Some(patch.clone()),
            etag.as_deref(),
        )
        .await;
    assert_eq!(status, StatusCode::PRECONDITION_FAILED, "a stale version");

    c.sb.set_faults(Faults {
        patch_unsupported: true,
        ..Faults::default()
    });
    let (status, _, _) = c
        .call(Method::PATCH, &format!("/Users/{id}"), Some(patch), None)
        .await;
    assert_eq!(status, StatusCode::NOT_IMPLEMENTED);
    c.sb.deactivate("ann@example.com").expect("deactivated");
    assert_eq!(c.sb.user("ann@example.com").expect("ann")["active"], false);

    let (status, _, _) = c
        .call(Method::DELETE, &format!("/Users/{id}"), None, None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _, _) = c
        .call(Method::DELETE, &format!("/Users/{id}"), None, None)
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn pages_are_one_based_and_bounded_by_max_results() {
    let c = Client::new(SandboxConfig {
        max_results: 2,
        ..SandboxConfig::default()
    })
    .await;
    for i in 0..5 {
        let (status, _, _) = c
            .call(
                Method::POST,
                "/Users",
                Some(user(&format!("p{i}@example.com"))),
                None,
            )
            .await;
        assert_eq!(status, StatusCode::CREATED);
    }
    let (_, _, page) = c
        .call(Method::GET, "/Users?startIndex=5&count=10", None, None)
        .await;
    assert_eq!(page["totalResults"], 5);
    assert_eq!(page["itemsPerPage"], 1);
    assert_eq!(page["Resources"][0]["userName"], "p4@example.com");
    let (_, _, page) = c
        .call(Method::GET, "/Users?startIndex=1&count=10", None, None)
        .await;
    assert_eq!(page["itemsPerPage"], 2, "maxResults");
}

#[tokio::test]
async fn bulk_resolves_bulk_ids_and_answers_each_operation() {
    let c = Client::new(SandboxConfig {
        bulk_max_operations: 3,
        ..SandboxConfig::default()
    })
    .await;
    let group = json!({ "schemas": ["urn:ietf:params:scim:schemas:core:2.0:Group"], "displayName": "Staff" });
    let (_, _, group) = c.call(Method::POST, "/Groups", Some(group), None).await;
    let gid = group["id"].as_str().expect("id");
    let request = json!({
        "schemas": ["urn:ietf:params:scim:api:messages:2.0:BulkRequest"],
        "Operations": [
            { "method": "POST", "bulkId": "a", "path": "/Users", "data": user("bob@example.com") },
            { "method": "POST", "bulkId": "b", "path": "/Users", "data": user("not an email") },
            { "method": "PATCH", "path": format!("/Groups/{gid}"), "data": {
                "Operations": [{ "op": "add", "path": "members", "value": [{ "value": "bulkId:a" }] }] } }
        ]
    });
    let (status, _, answer) = c
        .call(Method::POST, "/Bulk", Some(request.clone()), None)
        .await;
    assert_eq!(status, StatusCode::OK);
    let ops = answer["Operations"].as_array().expect("operations");
    assert_eq!(ops[0]["status"], "201");
    assert_eq!(ops[1]["status"], "400");
    assert_eq!(ops[1]["response"]["scimType"], "invalidValue");
    assert_eq!(ops[2]["status"], "200");
    let bob = c.sb.user("bob@example.com").expect("bob");
    assert_eq!(c.sb.groups()[0]["members"][0]["value"], bob["id"]);

    let mut too_many = request;
    let extra = too_many["Operations"][0].clone();
    too_many["Operations"]
        .as_array_mut()
        .expect("ops")
        .push(extra);
    let (status, _, _) = c.call(Method::POST, "/Bulk", Some(too_many), None).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
}
