//! Which request and response headers cross the gateway.

use gateway_filter::http::{header, HeaderMap, HeaderName};
use pingora_core::Result;
use pingora_http::{RequestHeader, ResponseHeader};

/// Connection-level headers (RFC 9110 §7.6.1) never forwarded.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    name == header::CONNECTION
        || name == header::TE
        || name == header::TRAILER
        || name == header::UPGRADE
        || name == header::PROXY_AUTHORIZATION
        || name.as_str() == "keep-alive"
        || name.as_str() == "proxy-connection"
}

/// Copies the client's headers (as the chain left them) into the upstream request.
/// `keep_framing`: keep Content-Length/Transfer-Encoding (body streamed by Pingora); otherwise
/// the caller sets Content-Length for the held body.
pub fn copy_request_headers(
    src: &HeaderMap,
    dst: &mut RequestHeader,
    keep_framing: bool,
) -> Result<()> {
    for (name, value) in src {
        if is_hop_by_hop(name)
            || name == header::HOST
            || name == header::ACCEPT_ENCODING
            || name == header::EXPECT
            || name.as_str() == "x-request-id"
            || (!keep_framing
                && (name == header::CONTENT_LENGTH || name == header::TRANSFER_ENCODING))
        {
            continue;
        }
        dst.append_header(name.clone(), value.clone())?;
    }
    Ok(())
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

/// Copies an upstream response header for the client, minus connection-level headers.
pub fn copy_response_headers(src: &ResponseHeader, dst: &mut ResponseHeader) -> Result<()> {
    for (name, value) in src.headers.iter() {
        if is_hop_by_hop(name) {
            continue;
        }
        dst.append_header(name.clone(), value.clone())?;
    }
    Ok(())
}
