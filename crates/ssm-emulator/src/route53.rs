//! The one Route 53 call `ssm-proxy start --dns-auto` makes:
//! `GET /2013-04-01/hostedzonesbyvpc?vpcid=&vpcregion=[&maxitems=][&nexttoken=]`
//! (REST-XML, SigV4 for service `route53`), answered from the private hosted
//! zones the emulator was given (`--hosted-zone VPC=ZONE`).

use std::sync::Arc;

use crate::server::Shared;

/// A Route 53 error: HTTP 400 with an `ErrorResponse` body.
#[derive(Debug, PartialEq, Eq)]
pub struct XmlError {
    pub code: &'static str,
    pub message: String,
}

const NS: &str = "https://route53.amazonaws.com/doc/2013-04-01/";

/// Whether this request is one of ours.
pub fn is_route53(path: &str) -> bool {
    path.starts_with("/2013-04-01/")
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

fn query_param<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query.split('&').filter_map(|kv| kv.split_once('=')).find(|(k, _)| *k == name).map(|(_, v)| v)
}

/// The XML answer for `path` and `query` (already authenticated).
pub fn handle(shared: &Arc<Shared>, path: &str, query: &str) -> Result<String, XmlError> {
    if path != "/2013-04-01/hostedzonesbyvpc" {
        return Err(XmlError { code: "InvalidInput", message: format!("{path} is not emulated") });
    }
    let invalid = |m: &str| XmlError { code: "InvalidInput", message: m.to_owned() };
    let vpc = query_param(query, "vpcid").ok_or_else(|| invalid("vpcid is required"))?;
    query_param(query, "vpcregion").filter(|r| !r.is_empty()).ok_or_else(|| invalid("vpcregion is required"))?;
    if !vpc.starts_with("vpc-") {
        return Err(XmlError { code: "InvalidVPCId", message: format!("{vpc} is not a VPC id") });
    }
    let max: usize = match query_param(query, "maxitems") {
        None => 100,
        Some(m) => m.parse().ok().filter(|n| (1..=100).contains(n)).ok_or_else(|| invalid("maxitems must be 1-100"))?,
    };
    let skip: usize = match query_param(query, "nexttoken") {
        None => 0,
        Some(t) => t
            .strip_prefix("emulator-")
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| XmlError { code: "InvalidPaginationToken", message: "bad next token".into() })?,
    };
    let zones: Vec<&String> =
        shared.config.hosted_zones.iter().filter(|(v, _)| v == vpc).map(|(_, zone)| zone).collect();
    let mut out = format!("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<ListHostedZonesByVPCResponse xmlns=\"{NS}\"><HostedZoneSummaries>");
    for (i, zone) in zones.iter().enumerate().skip(skip).take(max) {
        let name = if zone.ends_with('.') { zone.to_string() } else { format!("{zone}.") };
        out.push_str(&format!(
            "<HostedZoneSummary><HostedZoneId>Z{:013}</HostedZoneId><Name>{}</Name><Owner><OwningAccount>123456789012</OwningAccount></Owner></HostedZoneSummary>",
            i + 1,
            escape(&name)
        ));
    }
    out.push_str(&format!("</HostedZoneSummaries><MaxItems>{max}</MaxItems>"));
    if skip + max < zones.len() {
        out.push_str(&format!("<NextToken>emulator-{}</NextToken>", skip + max));
    }
    out.push_str("</ListHostedZonesByVPCResponse>");
    Ok(out)
}

/// The body of an error answer.
pub fn error_body(e: &XmlError) -> String {
    format!(
        "<?xml version=\"1.0\"?>\n<ErrorResponse xmlns=\"{NS}\"><Error><Type>Sender</Type><Code>{}</Code><Message>{}</Message></Error><RequestId>{}</RequestId></ErrorResponse>",
        e.code,
        escape(&e.message),
        uuid::Uuid::new_v4()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn shared(zones: &[(&str, &str)]) -> Arc<Shared> {
        let hosted_zones = zones.iter().map(|(v, z)| (v.to_string(), z.to_string())).collect();
        Arc::new(Shared::new(Config { hosted_zones, ..Config::default() }))
    }

    #[test]
    fn zones_of_the_vpc_come_back_with_their_trailing_dot() {
        let s = shared(&[("vpc-1", "corp.internal"), ("vpc-2", "other.internal"), ("vpc-1", "b.example.")]);
        let xml = handle(&s, "/2013-04-01/hostedzonesbyvpc", "vpcid=vpc-1&vpcregion=us-east-1").expect("ok");
        assert!(xml.contains("<Name>corp.internal.</Name>") && xml.contains("<Name>b.example.</Name>"), "{xml}");
        assert!(!xml.contains("other.internal") && !xml.contains("NextToken"), "{xml}");
    }

    #[test]
    fn pages_and_bad_input() {
        let s = shared(&[("vpc-1", "a.internal"), ("vpc-1", "b.internal"), ("vpc-1", "c.internal")]);
        let first = handle(&s, "/2013-04-01/hostedzonesbyvpc", "vpcid=vpc-1&vpcregion=r&maxitems=2").expect("ok");
        assert!(first.contains("<NextToken>emulator-2</NextToken>"), "{first}");
        let second =
            handle(&s, "/2013-04-01/hostedzonesbyvpc", "vpcid=vpc-1&vpcregion=r&maxitems=2&nexttoken=emulator-2")
                .expect("ok");
        assert!(second.contains("c.internal.") && !second.contains("a.internal"), "{second}");
        let code = |q: &str| handle(&s, "/2013-04-01/hostedzonesbyvpc", q).expect_err(q).code;
        assert_eq!(code("vpcregion=r"), "InvalidInput");
        assert_eq!(code("vpcid=vpc-1"), "InvalidInput");
        assert_eq!(code("vpcid=subnet-1&vpcregion=r"), "InvalidVPCId");
        assert_eq!(code("vpcid=vpc-1&vpcregion=r&nexttoken=x"), "InvalidPaginationToken");
    }
}
