//! The sandbox's SOAP front door, spoken to by hand (not through the client): SOAP 1.1
//! and 1.2, content types, `SOAPAction`, malformed requests, the admin endpoints.

use contactsync_sandbox_businesscatalyst::{Sandbox, SandboxConfig, SandboxContact};

const NS: &str = "http://tempuri.org/CatalystDeveloperService/CatalystCRMWebservice";
const PATH: &str = "/CatalystWebService/CatalystCRMWebService.asmx";

fn retrieve_body(envelope_ns: &str) -> String {
    format!(
        "<?xml version=\"1.0\" encoding=\"utf-8\"?><s:Envelope xmlns:s=\"{envelope_ns}\"><s:Body>\
         <ContactList_Retrieve xmlns=\"{NS}\"><username>sandbox</username><password>sandbox</password>\
         <siteId>1</siteId><lastUpdateDate>0001-01-01T00:00:00</lastUpdateDate><recordStart>0</recordStart>\
         <moreRecords>true</moreRecords></ContactList_Retrieve></s:Body></s:Envelope>"
    )
}

const SOAP11: &str = "http://schemas.xmlsoap.org/soap/envelope/";
const SOAP12: &str = "http://www.w3.org/2003/05/soap-envelope";

async fn start() -> (Sandbox, reqwest::Client, String) {
    let sb = Sandbox::start(SandboxConfig::default()).await.unwrap();
    sb.seed(vec![SandboxContact {
        email_address: Some("a&b@example.com".into()),
        first_name: Some("<Ann>".into()),
        master_opt_in: true,
        ..SandboxContact::default()
    }]);
    let url = format!("{}{PATH}", sb.base_url());
    (sb, reqwest::Client::new(), url)
}

#[tokio::test]
async fn soap_11_with_soapaction() {
    let (_sb, http, url) = start().await;
    let ok = http
        .post(&url)
        .header("Content-Type", "text/xml; charset=utf-8")
        .header("SOAPAction", format!("\"{NS}/ContactList_Retrieve\""))
        .body(retrieve_body(SOAP11))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    assert!(ok.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/xml"));
    let text = ok.text().await.unwrap();
    assert!(text.contains(SOAP11));
    assert!(
        text.contains("<firstName>&lt;Ann&gt;</firstName>"),
        "{text}"
    );
    assert!(text.contains("<moreRecords>false</moreRecords>"));

    for action in [None, Some(format!("\"{NS}/ContactList_UpdateInsert\""))] {
        let mut req = http
            .post(&url)
            .header("Content-Type", "text/xml")
            .body(retrieve_body(SOAP11));
        if let Some(a) = action {
            req = req.header("SOAPAction", a);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), 500);
        let text = resp.text().await.unwrap();
        assert!(
            text.contains("<faultcode>soap:Client</faultcode>"),
            "{text}"
        );
    }
    // A 1.2 envelope sent as 1.1.
    let resp = http
        .post(&url)
        .header("Content-Type", "text/xml")
        .header("SOAPAction", format!("{NS}/ContactList_Retrieve"))
        .body(retrieve_body(SOAP12))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 500);
    assert!(resp.text().await.unwrap().contains("VersionMismatch"));
}

#[tokio::test]
async fn soap_12_action_parameter_and_content_types() {
    let (_sb, http, url) = start().await;
    let ok = http
        .post(&url)
        .header(
            "Content-Type",
            format!("application/soap+xml; charset=utf-8; action=\"{NS}/ContactList_Retrieve\""),
        )
        .body(retrieve_body(SOAP12))
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    let wrong = http
        .post(&url)
        .header(
            "Content-Type",
            format!("application/soap+xml; action=\"{NS}/Other\""),
        )
        .body(retrieve_body(SOAP12))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 500);
    assert!(wrong
        .text()
        .await
        .unwrap()
        .contains("<soap:Value>soap:Sender</soap:Value>"));
    let json = http
        .post(&url)
        .header("Content-Type", "application/json")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(json.status(), 415);
    let elsewhere = http
        .post(format!("{}/other.asmx", _sb.base_url()))
        .header("Content-Type", "application/soap+xml")
        .body(retrieve_body(SOAP12))
        .send()
        .await
        .unwrap();
    assert_eq!(elsewhere.status(), 404);
}

#[tokio::test]
async fn malformed_requests_get_faults_not_panics() {
    let (sb, http, url) = start().await;
    let bodies = [
        String::new(),
        "not xml".to_string(),
        "<a><b></a>".to_string(),
        format!("<s:Envelope xmlns:s=\"{SOAP12}\"><s:Body/></s:Envelope>"),
        format!("<s:Envelope xmlns:s=\"{SOAP12}\"><s:Body><x:Op xmlns:x=\"urn:x\"/></s:Body></s:Envelope>"),
        retrieve_body(SOAP12).replace("<siteId>1</siteId>", "<siteId>one</siteId>"),
        retrieve_body(SOAP12).replace("<recordStart>0</recordStart>", "<recordStart>-5</recordStart>"),
        retrieve_body(SOAP12).replace("0001-01-01T00:00:00", "yesterday"),
        retrieve_body(SOAP12).replace("ContactList_Retrieve", "Contact_DeleteByEntityID"),
        retrieve_body(SOAP12).replace("ContactList_Retrieve", "NoSuchMethod"),
        format!(
            "<s:Envelope xmlns:s=\"{SOAP12}\"><s:Body><ContactList_UpdateInsert xmlns=\"{NS}\"><username>sandbox</username>\
             <password>sandbox</password><siteId>1</siteId><contactsList><ContactRecord><entityId>x</entityId>\
             </ContactRecord></contactsList></ContactList_UpdateInsert></s:Body></s:Envelope>"
        ),
        "\u{feff}\u{0}".to_string(),
    ];
    for body in bodies {
        let resp = http
            .post(&url)
            .header("Content-Type", "application/soap+xml; charset=utf-8")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 500, "{body}");
        let text = resp.text().await.unwrap();
        assert!(text.contains("<soap:Fault>"), "{body} → {text}");
    }
    // Still serving.
    assert_eq!(sb.contacts().len(), 1);
}

#[tokio::test]
async fn admin_endpoints() {
    let (sb, http, url) = start().await;
    let base = sb.base_url().to_string();
    let set = http
        .post(format!("{base}/_sandbox/faults"))
        .header("Content-Type", "application/json")
        .body(serde_json::json!({"fail_every": 1}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(set.status(), 200);
    assert_eq!(sb.wire_faults().fail_every, 1);
    let bad = http
        .post(format!("{base}/_sandbox/faults"))
        .header("Content-Type", "application/json")
        .body(serde_json::json!({"explode": true}).to_string())
        .send()
        .await
        .unwrap();
    assert!(bad.status().is_client_error());
    let resp = http
        .post(&url)
        .header("Content-Type", "application/soap+xml")
        .body(retrieve_body(SOAP12))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 500);
    assert!(!resp.text().await.unwrap().contains("Fault"));
    let log = http
        .get(format!("{base}/_sandbox/requests"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let log: serde_json::Value = serde_json::from_str(&log).unwrap();
    // The kit's log: the injected 500 never reached the SOAP handler, so it carries no
    // SOAP detail.
    assert_eq!(log[0]["method"], "POST");
    assert_eq!(log[0]["injected"], "failed");
    assert_eq!(log[0]["status"], 500);
    let contacts = http
        .get(format!("{base}/_sandbox/contacts"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let contacts: serde_json::Value = serde_json::from_str(&contacts).unwrap();
    assert_eq!(contacts.as_array().unwrap().len(), 1);
    let clock = http
        .post(format!("{base}/_sandbox/clock"))
        .header("Content-Type", "application/json")
        .body(serde_json::json!({"utc": "2026-01-01T00:00:00Z"}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(clock.status(), 204);
}

#[tokio::test]
async fn batch_over_100_faults() {
    let (sb, http, url) = start().await;
    let records: String = (0..101)
        .map(|i| format!("<ContactRecord><entityId>-1</entityId><externalId>O{i}</externalId></ContactRecord>"))
        .collect();
    let body = format!(
        "<s:Envelope xmlns:s=\"{SOAP12}\"><s:Body><ContactList_UpdateInsert xmlns=\"{NS}\"><username>sandbox</username>\
         <password>sandbox</password><siteId>1</siteId><contactsList>{records}</contactsList>\
         </ContactList_UpdateInsert></s:Body></s:Envelope>"
    );
    let resp = http
        .post(&url)
        .header("Content-Type", "application/soap+xml")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 500);
    assert!(resp
        .text()
        .await
        .unwrap()
        .contains("Server was unable to process request. ---&gt; ERROR: A maximum of 100"));
    assert_eq!(sb.contacts().len(), 1);
}

/// A Retrieve of a contact the site does not hold is the service's fault, not an empty
/// answer; one the site holds is answered.
#[tokio::test]
async fn a_retrieve_of_an_unknown_contact_faults_as_the_service_does() {
    let (_sb, http, url) = start().await;
    let retrieve = |email: &str| {
        format!(
            "<?xml version=\"1.0\" encoding=\"utf-8\"?><s:Envelope xmlns:s=\"{SOAP12}\"><s:Body>\
             <Contact_RetrieveByEmailAddress xmlns=\"{NS}\"><username>sandbox</username>\
             <password>sandbox</password><siteId>1</siteId><emailAddress>{email}</emailAddress>\
             </Contact_RetrieveByEmailAddress></s:Body></s:Envelope>"
        )
    };
    let unknown = http
        .post(&url)
        .header("Content-Type", "application/soap+xml; charset=utf-8")
        .body(retrieve("nobody@example.com"))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 500);
    let text = unknown.text().await.unwrap();
    assert!(
        text.contains(
            "Server was unable to process request. ---&gt; ERROR: Contact record could not be retrieved."
        ) || text.contains(
            "Server was unable to process request. ---> ERROR: Contact record could not be retrieved."
        ),
        "{text}"
    );
    let known = http
        .post(&url)
        .header("Content-Type", "application/soap+xml; charset=utf-8")
        .body(retrieve("a&amp;b@example.com"))
        .send()
        .await
        .unwrap();
    assert_eq!(known.status(), 200);
    assert!(known
        .text()
        .await
        .unwrap()
        .contains("Contact_RetrieveByEmailAddressResult"));
}
