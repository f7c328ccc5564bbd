//! The sandbox over HTTP, as the platform's documents describe it.

use contactsync_sandbox___snake__::{__Name__Sandbox, SandboxConfig};
use reqwest::StatusCode;
use serde_json::{json, Value};

#[tokio::test]
async fn people_are_upserted_listed_and_deleted_with_the_api_key() {
    let sb = __Name__Sandbox::start(SandboxConfig::default())
        .await
        .expect("started");
    let http = reqwest::Client::new();
    let url = |path: &str| format!("{}{path}", sb.base_url());
    let anonymous = http.get(url("/people")).send().await.expect("answer");
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);

    let put = |body: Value| {
        http.put(url("/people/external_id:E1"))
            .bearer_auth(sb.api_key())
            .json(&body)
            .send()
    };
    let refused = put(json!({ "first_name": "Ann" })).await.expect("answer");
    assert_eq!(refused.status(), StatusCode::BAD_REQUEST, "no email");
    let created = put(json!({ "email": "ann@example.com" })).await.expect("answer");
    assert_eq!(created.status(), StatusCode::CREATED);
    let replaced = put(json!({ "email": "ann@example.org" })).await.expect("answer");
    assert_eq!(replaced.status(), StatusCode::OK);

    let people: Value = http
        .get(url("/people?page=1&per_page=10"))
        .bearer_auth(sb.api_key())
        .send()
        .await
        .expect("answer")
        .json()
        .await
        .expect("json");
    assert_eq!(people, json!([{ "email": "ann@example.org" }]));

    let delete = || {
        http.delete(url("/people/external_id:E1"))
            .bearer_auth(sb.api_key())
            .send()
    };
    assert_eq!(delete().await.expect("answer").status(), StatusCode::NO_CONTENT);
    assert_eq!(delete().await.expect("answer").status(), StatusCode::NOT_FOUND);
    assert!(sb.people().is_empty());
}
