//! Which request and response headers cross the gateway.

use gateway_filter::http::{header, HeaderMap, HeaderName};
use pingora_core::Result;
use pingora_http::{RequestHeader, ResponseHeader};

/// Connection-level headers (RFC 9110 §7.6.1) never forwarded. (A response's
/// Transfer-Encoding is kept: Pingora frames the client's response by it.)
fn is_hop_by_hop(name: &HeaderName) -> bool {
    name == header::CONNECTION
        || name == header::TE
        || name == header::TRAILER
        || name == header::UPGRADE
        || name == header::PROXY_AUTHORIZATION
        || name == header::PROXY_AUTHENTICATE
        || matches!(
            name.as_str(),
            "keep-alive" | "proxy-connection" | "http2-settings"
        )
}

/// Headers in which a client claims where it is or came from, or names the request: the
/// gateway trusts no client for these (its own `x-request-id` is set afterwards).
fn is_client_claim(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "x-request-id"
            | "forwarded"
            | "x-forwarded-for"
            | "x-forwarded-host"
            | "x-forwarded-proto"
            | "x-real-ip"
    )
}

/// Whether `name` is listed in one of the message's `Connection` headers (those are
/// hop-by-hop too, whatever their name).
fn named_by_connection(src: &HeaderMap, name: &HeaderName) -> bool {
    src.get_all(header::CONNECTION).iter().any(|v| {
        v.as_bytes().split(|b| *b == b',').any(|t| {
            t.trim_ascii()
                .eq_ignore_ascii_case(name.as_str().as_bytes())
        })
    })
}

/// Copies the client's headers (as the chain left them) into the upstream request, minus
/// everything about this hop: hop-by-hop headers and those `Connection` names, the client's
/// framing (the caller sets Content-Length for the held body), a client's claims about its
/// address, a browser's cookies for the gateway's site (no model server reads them; they
/// would show its sessions to the backend and its logs), and names with `_` (CGI and WSGI servers read `Transfer_Encoding` as
/// `Transfer-Encoding`).
///
/// Straight into the header map of a header built without Pingora's case-preserving name
/// map (`build_no_case`, taken apart into its `Parts`): Pingora's `append_header` title-cases
/// and parses every name again, which made header copies a fifth of the gateway's
/// instructions per request.
pub fn copy_request_headers(src: &HeaderMap, dst: &mut HeaderMap) {
    for (name, value) in src {
        if is_hop_by_hop(name)
            || name == header::TRANSFER_ENCODING
            || name == header::HOST
            || name == header::ACCEPT_ENCODING
            || name == header::EXPECT
            || name == header::CONTENT_LENGTH
            || name == header::COOKIE
            || is_client_claim(name)
            || name.as_str().contains('_')
            || named_by_connection(src, name)
        {
            continue;
        }
        dst.append(name.clone(), value.clone());
    }
}

/// Adds what every upstream request carries: the backend's Host (Ollama rejects foreign
/// hosts), identity encoding (so usage can be read from the body) and the request id.
pub fn add_upstream_headers(
    dst: &mut RequestHeader,
    authority: &str,
    request_id: &str,
) -> Result<()> {
    dst.insert_header(header::HOST, authority)?;
    dst.insert_header(header::ACCEPT_ENCODING, "identity")?;
    dst.insert_header("x-request-id", request_id)?;
    Ok(())
}

/// Copies an upstream response header for the client, minus connection-level headers
/// (straight into the header map, as above).
pub fn copy_response_headers(src: &ResponseHeader, dst: &mut HeaderMap) {
    for (name, value) in src.headers.iter() {
        if is_hop_by_hop(name) || named_by_connection(&src.headers, name) {
            continue;
        }
        dst.append(name.clone(), value.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gateway_filter::http::{HeaderValue, Method};

    #[test]
    fn only_end_to_end_headers_go_upstream() {
        let mut src = HeaderMap::new();
        for (k, v) in [
            ("content-type", "application/json"),
            ("x-custom", "yes"),
            ("connection", "keep-alive, X-Secret, upgrade"),
            ("x-secret", "hop"),
            ("upgrade", "h2c"),
            ("http2-settings", "AAA"),
            ("transfer-encoding", "chunked"),
            ("transfer_encoding", "chunked"),
            ("content_length", "5"),
            ("content-length", "13"),
            ("te", "trailers"),
            ("keep-alive", "timeout=5"),
            ("proxy-authorization", "Basic x"),
            ("cookie", "session=s3cret"),
            ("x-forwarded-for", "1.2.3.4"),
            ("forwarded", "for=1.2.3.4"),
            ("x-real-ip", "1.2.3.4"),
        ] {
            src.append(k, HeaderValue::from_static(v));
        }
        let mut dst = RequestHeader::build_no_case(Method::POST, b"/api/show", None).unwrap();
        let mut parts = http::request::Parts::from(dst);
        copy_request_headers(&src, &mut parts.headers);
        dst = RequestHeader::from(parts);
        let mut names: Vec<&str> = dst.headers.keys().map(|k| k.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["content-type", "x-custom"]);
    }
}
