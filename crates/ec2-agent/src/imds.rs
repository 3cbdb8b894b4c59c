//! The instance's own VPC id and region from the instance metadata service
//! (IMDSv2: a session token first, then plain GETs), so `ssm-proxy start
//! --dns-auto` can find the Route 53 private zones of the VPC. The agent reads
//! these three values for itself at start; clients never reach the metadata
//! service through the tunnel (the deny-list holds 169.254.0.0/16).

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Where EC2 serves it.
pub const DEFAULT_ADDR: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::new(169, 254, 169, 254)), 80);

/// Each request gets this long (the service answers in milliseconds on EC2;
/// elsewhere nothing answers at all).
const TIMEOUT: Duration = Duration::from_secs(1);

/// (VPC id, region) of the instance's primary network interface.
pub async fn vpc(addr: SocketAddr) -> Result<(String, String), String> {
    let token = request(addr, "PUT", "/latest/api/token", &[("X-aws-ec2-metadata-token-ttl-seconds", "60")]).await?;
    let auth = [("X-aws-ec2-metadata-token", token.trim())];
    let get = |path: String| async move { request(addr, "GET", &path, &auth).await.map(|v| v.trim().to_owned()) };
    let mac = get("/latest/meta-data/mac".into()).await?;
    let vpc = get(format!("/latest/meta-data/network/interfaces/macs/{mac}/vpc-id")).await?;
    let region = get("/latest/meta-data/placement/region".into()).await?;
    let plain = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    if !vpc.starts_with("vpc-") || !plain(&vpc) || !plain(&region) {
        return Err(format!("unexpected answers: vpc-id {vpc:?}, region {region:?}"));
    }
    Ok((vpc, region))
}

/// One HTTP/1.1 request with `Connection: close`; the body of a 200 answer.
async fn request(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)]) -> Result<String, String> {
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n", addr.ip());
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        if method == "PUT" {
            req.push_str("Content-Length: 0\r\n");
        }
        req.push_str("\r\n");
        s.write_all(req.as_bytes()).await?;
        let mut answer = Vec::new();
        s.take(64 << 10).read_to_end(&mut answer).await?;
        Ok::<_, std::io::Error>(answer)
    };
    let answer = match tokio::time::timeout(TIMEOUT, exchange).await {
        Ok(Ok(a)) => a,
        Ok(Err(e)) => return Err(format!("{method} {path}: {e}")),
        Err(_) => return Err(format!("{method} {path}: no answer within {TIMEOUT:?}")),
    };
    let text = String::from_utf8_lossy(&answer);
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(|| format!("{method} {path}: truncated answer"))?;
    let status = head.lines().next().unwrap_or_default();
    if status.split_whitespace().nth(1) != Some("200") {
        return Err(format!("{method} {path}: {status}"));
    }
    if head.lines().any(|l| l.to_ascii_lowercase().starts_with("transfer-encoding:")) {
        return Err(format!("{method} {path}: chunked answers are not expected from IMDS"));
    }
    Ok(body.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stand-in metadata service that demands the token like IMDSv2.
    async fn fake_imds(region: &'static str) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let mut buf = vec![0u8; 4096];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let req = String::from_utf8_lossy(&buf[..n]).to_string();
                let has_token = req.contains("X-aws-ec2-metadata-token: tok\r\n");
                let (status, body) = match req.split_whitespace().take(2).collect::<Vec<_>>()[..] {
                    ["PUT", "/latest/api/token"] => ("200 OK", "tok"),
                    [_, _] if !has_token => ("401 Unauthorized", ""),
                    ["GET", "/latest/meta-data/mac"] => ("200 OK", "0e:11:22:33:44:55"),
                    ["GET", "/latest/meta-data/network/interfaces/macs/0e:11:22:33:44:55/vpc-id"] => {
                        ("200 OK", "vpc-0abc123")
                    }
                    ["GET", "/latest/meta-data/placement/region"] => ("200 OK", region),
                    _ => ("404 Not Found", ""),
                };
                let answer = format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\n\r\n{body}", body.len());
                let _ = s.write_all(answer.as_bytes()).await;
            }
        });
        addr
    }

    #[tokio::test]
    async fn vpc_and_region_come_from_imdsv2() {
        let addr = fake_imds("eu-west-1").await;
        assert_eq!(vpc(addr).await, Ok(("vpc-0abc123".into(), "eu-west-1".into())));
    }

    #[tokio::test]
    async fn odd_answers_and_silence_are_errors() {
        let addr = fake_imds("eu west 1\r\nX: y").await;
        assert!(vpc(addr).await.is_err_and(|e| e.contains("unexpected answers")));
        // Nothing listens: refused at once (or silence: the 1 s timeout).
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind").local_addr().expect("addr");
        assert!(vpc(closed).await.is_err());
    }
}
