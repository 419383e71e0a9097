//! Request ids: every request carries one, taken from its `x-request-id`
//! header when that is usable (1 to 128 printable ASCII characters) or
//! generated otherwise. The id is put back on the request (so the request's
//! log span records it), returned in the response's `x-request-id` header,
//! and added to every error body as `error.request_id`, so a client's
//! report of an error can be matched to the server's log lines.

use axum::body::Body;
use axum::http::{HeaderName, HeaderValue, Request};
use axum::middleware::Next;
use axum::response::Response;

pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Longest accepted client-supplied id.
pub const MAX_LEN: usize = 128;

/// Largest error body rewritten to carry the id (ours are far smaller).
const MAX_ERROR_BODY: usize = 64 * 1024;

/// The client's id if usable: 1 to [`MAX_LEN`] printable ASCII characters
/// (space to `~`), so it can go into headers and log lines as it is.
pub fn parse(value: &HeaderValue) -> Option<&str> {
    let bytes = value.as_bytes();
    let printable = bytes.iter().all(|b| (0x20..=0x7e).contains(b));
    if bytes.is_empty() || bytes.len() > MAX_LEN || !printable {
        return None;
    }
    value.to_str().ok()
}

fn generate() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// The middleware (outermost, so that the trace span sees the id).
pub async fn layer(mut req: Request<Body>, next: Next) -> Response {
    let id = req
        .headers()
        .get(REQUEST_ID)
        .and_then(parse)
        .map(str::to_owned)
        .unwrap_or_else(generate);
    let value = HeaderValue::from_str(&id).expect("request ids are printable ASCII");
    req.headers_mut().insert(REQUEST_ID, value.clone());
    let response = next.run(req).await;
    let mut response = if response.status().is_client_error() || response.status().is_server_error()
    {
        with_id_in_body(response, &id).await
    } else {
        response
    };
    response.headers_mut().insert(REQUEST_ID, value);
    response
}

/// Adds `request_id` to a JSON error body (`{"error": {...}}`); any other
/// body is left as it is.
async fn with_id_in_body(response: Response, id: &str) -> Response {
    let is_json = response
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !is_json {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, MAX_ERROR_BODY).await else {
        // (cannot happen for our bodies; the original is gone, say so)
        parts.headers.remove(axum::http::header::CONTENT_LENGTH);
        return Response::from_parts(parts, Body::empty());
    };
    let rewritten = serde_json::from_slice::<serde_json::Value>(&bytes)
        .ok()
        .and_then(|mut v| {
            v.get_mut("error")?
                .as_object_mut()?
                .insert("request_id".into(), id.into());
            serde_json::to_vec(&v).ok()
        });
    let body = match rewritten {
        Some(json) => {
            parts.headers.remove(axum::http::header::CONTENT_LENGTH);
            Body::from(json)
        }
        None => Body::from(bytes),
    };
    Response::from_parts(parts, body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_printable_ids_up_to_128_characters() {
        let ok = |s: &str| parse(&HeaderValue::from_str(s).unwrap()).is_some();
        assert!(ok("abc-123"));
        assert!(ok("req 42/a:b=c~"));
        assert!(ok(&"x".repeat(128)));
        assert!(!ok(&"x".repeat(129)));
        assert!(!ok(""));
        assert!(!ok("tab\there"));
        let non_ascii = HeaderValue::from_bytes("é".as_bytes()).unwrap();
        assert!(parse(&non_ascii).is_none());
    }
}
