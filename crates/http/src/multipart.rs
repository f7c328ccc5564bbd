//! `multipart/form-data` bodies, built by reqwest's own form and collected into bytes,
//! since a [`crate::Call`] takes its body as bytes (so that it can be sent again).

use bytes::Bytes;
use contactsync_core::ConnectorError;

/// One part of a form.
#[derive(Debug, Clone)]
pub struct Part {
    /// The form field's name (`inputFile`).
    pub name: String,
    /// The file name, for a file part (`profiles.zip`).
    pub file_name: Option<String>,
    /// Its media type (`application/zip`).
    pub content_type: String,
    /// Its bytes.
    pub body: Bytes,
}

impl Part {
    /// A file part.
    pub fn file(name: &str, file_name: &str, content_type: &str, body: impl Into<Bytes>) -> Self {
        Part {
            name: name.to_string(),
            file_name: Some(file_name.to_string()),
            content_type: content_type.to_string(),
            body: body.into(),
        }
    }

    /// A part that is not a file (a JSON parameter object).
    pub fn text(name: &str, content_type: &str, body: impl Into<String>) -> Self {
        Part {
            name: name.to_string(),
            file_name: None,
            content_type: content_type.to_string(),
            body: Bytes::from(body.into()),
        }
    }
}

/// The form's `Content-Type` (with its boundary) and body, for [`crate::Call::body`].
pub async fn form(parts: Vec<Part>) -> Result<(String, Bytes), ConnectorError> {
    use http_body_util::BodyExt;
    let fail = |e: &dyn std::fmt::Display| {
        ConnectorError::Other(format!("cannot build a multipart body: {e}"))
    };
    let mut form = reqwest::multipart::Form::new();
    for part in parts {
        let mut built = reqwest::multipart::Part::stream(reqwest::Body::from(part.body))
            .mime_str(&part.content_type)
            .map_err(|e| fail(&e))?;
        if let Some(file_name) = part.file_name {
            built = built.file_name(file_name);
        }
        form = form.part(part.name, built);
    }
    // A request that is never sent: only its headers and body are taken.
    let mut request = reqwest::Client::new()
        .post("http://localhost/")
        .multipart(form)
        .build()
        .map_err(|e| fail(&e))?;
    let content_type = request
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .ok_or_else(|| fail(&"no content type"))?;
    let body = request.body_mut().take().ok_or_else(|| fail(&"no body"))?;
    let bytes = body.collect().await.map_err(|e| fail(&e))?.to_bytes();
    Ok((content_type, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn parts_carry_their_names_types_and_bytes() {
        let (content_type, body) = form(vec![
            Part::file("inputFile", "p.zip", "application/zip", vec![1u8, 2, 3]),
            Part::text("parameters", "application/json", "{\"a\":1}"),
        ])
        .await
        .expect("built");
        let boundary = content_type
            .strip_prefix("multipart/form-data; boundary=")
            .expect("a multipart content type");
        let text = String::from_utf8_lossy(&body);
        assert_eq!(text.matches(&format!("--{boundary}")).count(), 3);
        assert!(text.contains("name=\"inputFile\"; filename=\"p.zip\""));
        assert!(text.contains("Content-Type: application/zip"));
        assert!(
            text.contains("name=\"parameters\"\r\nContent-Type: application/json\r\n\r\n{\"a\":1}")
        );
    }
}
