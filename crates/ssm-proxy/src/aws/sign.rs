//! The signed data-channel open: the websocket upgrade to the StreamUrl
//! carries SigV4 headers for the service `ssmmessages`, made with the
//! caller's credentials, as session-manager-plugin does since 1.2.764.0
//! (`src/communicator/websocketchannel.go`: `getV4SignatureHeader` signs a
//! GET of the URL with no body; `Open` skips it for a presigned URL;
//! `src/sessionmanagerplugin/session/sessionhandler.go` makes the signer from
//! the session's credentials, again before each resume).
//!
//! The headers are `X-Amz-Date`, `Authorization` and, with temporary
//! credentials, `X-Amz-Security-Token`; the signed headers are `host`,
//! `x-amz-date` (and the token). No payload-hash header: the plugin's signer
//! adds one only for S3 and Glacier.

use std::time::SystemTime;

use aws_credential_types::Credentials;
use aws_sigv4::http_request::{sign, SignableBody, SignableRequest, SigningSettings};
use aws_sigv4::sign::v4;

/// The service name in the signature's scope.
pub const SERVICE: &str = "ssmmessages";

/// The query parameters of a presigned URL: such a URL is dialled unsigned.
const PRESIGNED: [&str; 7] = [
    "X-Amz-Algorithm",
    "X-Amz-Credential",
    "X-Amz-Date",
    "X-Amz-Expires",
    "X-Amz-SignedHeaders",
    "X-Amz-Signature",
    "X-Amz-Security-Token",
];

/// Whether `url` already carries a signature in its query.
pub fn is_presigned(url: &str) -> bool {
    let Some((_, query)) = url.split_once('?') else { return false };
    query.split('&').filter_map(|kv| kv.split('=').next()).any(|k| PRESIGNED.contains(&k))
}

/// The headers that sign a GET of `url` at `time` (none for a presigned URL).
pub fn stream_headers(
    url: &str,
    credentials: &Credentials,
    region: &str,
    time: SystemTime,
) -> Result<Vec<(String, String)>, String> {
    if is_presigned(url) {
        return Ok(Vec::new());
    }
    // Sign the https form of the URL: the scheme is not part of the signature,
    // and aws-sigv4 reads host and port from it as the upgrade's Host header has them.
    let http_url = match url.split_once("://") {
        Some(("wss", rest)) => format!("https://{rest}"),
        Some(("ws", rest)) => format!("http://{rest}"),
        _ => url.to_owned(),
    };
    let identity = credentials.clone().into();
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(region)
        .name(SERVICE)
        .time(time)
        .settings(SigningSettings::default())
        .build()
        .map_err(|e| e.to_string())?;
    let request = SignableRequest::new("GET", &http_url, std::iter::empty(), SignableBody::Bytes(&[]))
        .map_err(|e| format!("cannot sign {url}: {e}"))?;
    let (instructions, _signature) = sign(request, &params.into()).map_err(|e| e.to_string())?.into_parts();
    Ok(instructions.headers().map(|(k, v)| (k.to_owned(), v.to_owned())).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};
    use std::time::Duration;

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// HMAC-SHA256 (RFC 2104), written out so the vector does not lean on aws-sigv4.
    fn hmac(key: &[u8], data: &[u8]) -> Vec<u8> {
        let mut k = [0u8; 64];
        if key.len() > 64 {
            k[..32].copy_from_slice(&Sha256::digest(key));
        } else {
            k[..key.len()].copy_from_slice(key);
        }
        let inner: Vec<u8> = k.iter().map(|b| b ^ 0x36).chain(data.iter().copied()).collect();
        let inner = Sha256::digest(&inner);
        let outer: Vec<u8> = k.iter().map(|b| b ^ 0x5c).chain(inner.iter().copied()).collect();
        Sha256::digest(&outer).to_vec()
    }

    fn header<'a>(h: &'a [(String, String)], name: &str) -> Option<&'a str> {
        h.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// 2026-12-03T10:20:30Z.
    fn fixed_time() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_796_293_230)
    }

    /// The signature of a real-shaped StreamUrl at a fixed time, against one
    /// derived by hand from the SigV4 definition: canonical request (GET, the
    /// path, the query sorted and encoded with `+` read as a space, `host` with
    /// its port, `x-amz-date`, the empty body's hash), string to sign, key chain.
    #[test]
    fn a_fixed_clock_vector_matches_the_sigv4_definition() {
        let creds = Credentials::new("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", None, None, "test");
        let url = "wss://ssmmessages.eu-west-1.amazonaws.com:443/v1/data-channel/alice-0a1b2c3d?role=publish_subscribe&cell-number=AAE+x/y=";
        let headers = stream_headers(url, &creds, "eu-west-1", fixed_time()).expect("signed");
        assert_eq!(header(&headers, "x-amz-date"), Some("20261203T102030Z"));
        assert_eq!(header(&headers, "x-amz-security-token"), None);
        assert!(header(&headers, "x-amz-content-sha256").is_none(), "no payload-hash header for ssmmessages");

        let canonical = [
            "GET",
            "/v1/data-channel/alice-0a1b2c3d",
            "cell-number=AAE%20x%2Fy%3D&role=publish_subscribe",
            "host:ssmmessages.eu-west-1.amazonaws.com",
            "x-amz-date:20261203T102030Z",
            "",
            "host;x-amz-date",
            &hex(&Sha256::digest(b"")),
        ]
        .join("\n");
        let scope = "20261203/eu-west-1/ssmmessages/aws4_request";
        let to_sign =
            format!("AWS4-HMAC-SHA256\n20261203T102030Z\n{scope}\n{}", hex(&Sha256::digest(canonical.as_bytes())));
        let mut key = hmac(b"AWS4wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", b"20261203");
        for part in ["eu-west-1", "ssmmessages", "aws4_request"] {
            key = hmac(&key, part.as_bytes());
        }
        let signature = hex(&hmac(&key, to_sign.as_bytes()));
        let want = format!(
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/{scope}, SignedHeaders=host;x-amz-date, Signature={signature}"
        );
        assert_eq!(header(&headers, "authorization"), Some(want.as_str()));
    }

    #[test]
    fn temporary_credentials_add_the_token_and_a_port_stays_in_the_host() {
        let creds = Credentials::new("ASIAEXAMPLE", "secret", Some("the-session-token".into()), None, "test");
        let headers = stream_headers(
            "ws://127.0.0.1:4566/v1/data-channel/s?role=publish_subscribe",
            &creds,
            "us-east-1",
            fixed_time(),
        )
        .expect("signed");
        assert_eq!(header(&headers, "x-amz-security-token"), Some("the-session-token"));
        let auth = header(&headers, "authorization").expect("authorization");
        assert!(auth.contains("SignedHeaders=host;x-amz-date;x-amz-security-token"), "{auth}");
    }

    #[test]
    fn a_presigned_url_is_dialled_as_it_is() {
        let creds = Credentials::new("AKID", "secret", None, None, "test");
        let url = "wss://h/v1/data-channel/s?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Signature=abc";
        assert!(is_presigned(url));
        assert_eq!(stream_headers(url, &creds, "us-east-1", fixed_time()).expect("no error"), Vec::new());
        assert!(!is_presigned("wss://h/v1/data-channel/s?role=publish_subscribe&cell-number=X-Amz-Date"));
    }
}
