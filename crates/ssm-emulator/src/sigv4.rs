//! Verifies AWS Signature Version 4 on incoming API requests with aws-sigv4,
//! and answers failures with the error codes AWS uses.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use aws_credential_types::Credentials;
use aws_sigv4::http_request::{sign, SignableBody, SignableRequest, SigningSettings};
use aws_sigv4::sign::v4;

/// An error AWS would return: its `__type` code and message (HTTP 400).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthError {
    pub code: &'static str,
    pub message: String,
}

impl AuthError {
    fn new(code: &'static str, message: impl Into<String>) -> Self {
        AuthError { code, message: message.into() }
    }
}

struct ParsedAuth<'a> {
    access_key: &'a str,
    date: &'a str,
    region: &'a str,
    service: &'a str,
    signed_headers: Vec<&'a str>,
    signature: &'a str,
}

fn parse_authorization(value: &str) -> Option<ParsedAuth<'_>> {
    let rest = value.strip_prefix("AWS4-HMAC-SHA256 ")?;
    let mut credential = None;
    let mut signed = None;
    let mut signature = None;
    for part in rest.split(',') {
        let (k, v) = part.trim().split_once('=')?;
        match k {
            "Credential" => credential = Some(v),
            "SignedHeaders" => signed = Some(v),
            "Signature" => signature = Some(v),
            _ => {}
        }
    }
    let mut scope = credential?.split('/');
    let access_key = scope.next()?;
    let date = scope.next()?;
    let region = scope.next()?;
    let service = scope.next()?;
    (scope.next()? == "aws4_request").then_some(())?;
    Some(ParsedAuth {
        access_key,
        date,
        region,
        service,
        signed_headers: signed?.split(';').collect(),
        signature: signature?,
    })
}

fn parse_amz_date(s: &str) -> Option<SystemTime> {
    // 20261122T113000Z
    if s.len() != 16 || &s[8..9] != "T" || !s.ends_with('Z') {
        return None;
    }
    let n = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, mo, d, h, mi, se) = (n(0..4)?, n(4..6)?, n(6..8)?, n(9..11)?, n(11..13)?, n(13..15)?);
    // Days from civil (Howard Hinnant's algorithm).
    let y2 = if mo <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let doy = (153 * (mo + if mo > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146097 + doe - 719468;
    let secs = days * 86400 + h * 3600 + mi * 60 + se;
    u64::try_from(secs).ok().map(|s| SystemTime::UNIX_EPOCH + Duration::from_secs(s))
}

/// Checks the request's signature against `credentials` (access key -> secret).
pub fn verify(
    method: &str,
    uri: &str,
    headers: &[(String, String)],
    body: &[u8],
    credentials: &BTreeMap<String, String>,
) -> Result<(), AuthError> {
    let header = |name: &str| headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str());
    let Some(auth) = header("authorization") else {
        return Err(AuthError::new("MissingAuthenticationTokenException", "Missing Authentication Token"));
    };
    let Some(parsed) = parse_authorization(auth) else {
        return Err(AuthError::new("IncompleteSignatureException", "Authorization header is malformed"));
    };
    let Some(secret) = credentials.get(parsed.access_key) else {
        return Err(AuthError::new(
            "UnrecognizedClientException",
            "The security token included in the request is invalid.",
        ));
    };
    let Some(time) = header("x-amz-date").and_then(parse_amz_date) else {
        return Err(AuthError::new("IncompleteSignatureException", "X-Amz-Date is missing or malformed"));
    };
    if !header("x-amz-date").is_some_and(|d| d.starts_with(parsed.date)) {
        return Err(AuthError::new("InvalidSignatureException", "Credential scope date does not match X-Amz-Date"));
    }
    let skew = SystemTime::now().duration_since(time).unwrap_or_else(|e| e.duration());
    if skew > Duration::from_secs(300) {
        return Err(AuthError::new(
            "InvalidSignatureException",
            "Signature expired: the request time is more than 5 minutes from the server time",
        ));
    }
    let mut creds = Credentials::new(parsed.access_key, secret, None, None, "emulator");
    if let Some(token) = header("x-amz-security-token") {
        creds = Credentials::new(parsed.access_key, secret, Some(token.to_owned()), None, "emulator");
    }
    let identity = creds.into();
    let signed: Vec<(&str, &str)> = headers
        .iter()
        .filter(|(k, _)| parsed.signed_headers.iter().any(|s| s.eq_ignore_ascii_case(k)))
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let mut settings = SigningSettings::default();
    settings.excluded_headers = Some(vec!["authorization".into()]);
    let params = v4::SigningParams::builder()
        .identity(&identity)
        .region(parsed.region)
        .name(parsed.service)
        .time(time)
        .settings(settings)
        .build()
        .map_err(|e| AuthError::new("IncompleteSignatureException", e.to_string()))?;
    let request = SignableRequest::new(method, uri, signed.into_iter(), SignableBody::Bytes(body))
        .map_err(|e| AuthError::new("IncompleteSignatureException", e.to_string()))?;
    let out =
        sign(request, &params.into()).map_err(|e| AuthError::new("IncompleteSignatureException", e.to_string()))?;
    if out.signature() != parsed.signature {
        return Err(AuthError::new(
            "InvalidSignatureException",
            "The request signature we calculated does not match the signature you provided. Check your AWS Secret Access Key and signing method. Consult the service documentation for details.",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signed_request(secret: &str) -> Vec<(String, String)> {
        let creds = Credentials::new("AKIDTEST", secret, None, None, "test");
        let identity = creds.into();
        let params = v4::SigningParams::builder()
            .identity(&identity)
            .region("us-east-1")
            .name("ssm")
            .time(SystemTime::now())
            .settings(SigningSettings::default())
            .build()
            .expect("params");
        let headers = [
            ("host", "127.0.0.1:1234"),
            ("content-type", "application/x-amz-json-1.1"),
            ("x-amz-target", "AmazonSSM.StartSession"),
        ];
        let req = SignableRequest::new("POST", "/", headers.iter().copied(), SignableBody::Bytes(b"{}")).expect("req");
        let (instructions, _) = sign(req, &params.into()).expect("signs").into_parts();
        let mut out: Vec<(String, String)> = headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        out.extend(instructions.headers().map(|(k, v)| (k.to_string(), v.to_string())));
        out
    }

    #[test]
    fn accepts_good_and_refuses_bad_signatures() {
        let creds = BTreeMap::from([("AKIDTEST".to_owned(), "secret".to_owned())]);
        let good = signed_request("secret");
        assert_eq!(verify("POST", "/", &good, b"{}", &creds), Ok(()));
        assert_eq!(verify("POST", "/", &good, b"{ }", &creds).map_err(|e| e.code), Err("InvalidSignatureException"));
        let bad = signed_request("wrong");
        assert_eq!(verify("POST", "/", &bad, b"{}", &creds).map_err(|e| e.code), Err("InvalidSignatureException"));
        let none: Vec<(String, String)> = vec![];
        assert_eq!(
            verify("POST", "/", &none, b"{}", &creds).map_err(|e| e.code),
            Err("MissingAuthenticationTokenException")
        );
        let other = BTreeMap::from([("AKIDOTHER".to_owned(), "secret".to_owned())]);
        assert_eq!(verify("POST", "/", &good, b"{}", &other).map_err(|e| e.code), Err("UnrecognizedClientException"));
    }

    #[test]
    fn parses_amz_dates() {
        assert_eq!(parse_amz_date("19700101T000000Z"), Some(SystemTime::UNIX_EPOCH));
        assert_eq!(parse_amz_date("20240229T120000Z"), Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1709208000)));
        assert_eq!(parse_amz_date("2024-02-29"), None);
    }
}
