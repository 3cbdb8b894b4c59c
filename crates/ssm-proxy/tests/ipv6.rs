//! IPv6 end to end in the namespace lab: the VPC has the ULA /64
//! fd10:10::/64 beside 10.10.0.0/24. A mixed tunnel carries curl -6, ping -6
//! and psql to the v6 address, and split DNS gives both families for a name
//! with both records; a v6-only tunnel then holds exactly one route for its
//! /64 and `stop` restores the table. Root only.

mod labkit;
mod netns;

use labkit::*;

const V6_HOST: &str = "fd10:10::2";

#[test]
fn ipv6_reaches_the_vpc_beside_ipv4_and_alone() {
    if !require_root("ipv6_reaches_the_vpc_beside_ipv4_and_alone") {
        return;
    }
    let lab = Lab::up(&prefix("6"), 4, &[]);
    let before = main_routes(&lab);

    let mut daemon = lab.start_named(
        "lab",
        &["--cidr", "10.10.0.0/16", "--cidr", "fd10:10::/64"],
        &["--dns-domain", "corp.internal"],
    );
    lab.fetch_url(&format!("http://[{V6_HOST}]:8080/blob"), 60, "0");
    lab.fetch_blob(60);
    let ping = ok(lab.laptop_out("ping", &["-6", "-c", "3", "-i", "0.2", "-W", "5", V6_HOST]), "ping -6");
    assert!(ping.contains("3 received"), "{ping}");
    let answer =
        ok(lab.laptop_out("psql", &["-h", V6_HOST, "-U", "postgres", "-tAc", "select inet_client_addr()"]), "psql -6");
    assert_eq!(answer, "fd10:10::1", "psql saw the instance's v6 address");
    let server = tunnel_status(&lab)["dns_server"].as_str().expect("a DNS server").to_string();
    lab.resolve_through(&server);
    let both = ok(lab.laptop_out("getent", &["ahosts", "db6.corp.internal"]), "getent ahosts");
    assert!(both.contains("10.10.0.2") && both.contains(V6_HOST), "both families: {both}");
    let aaaa = ok(
        lab.laptop_out("dig", &["+short", "+time=3", "+tries=1", &format!("@{server}"), "db6.corp.internal", "AAAA"]),
        "dig AAAA",
    );
    assert_eq!(aaaa, V6_HOST);
    lab.stop(&mut daemon, "lab");
    assert_eq!(main_routes(&lab), before, "the mixed tunnel's routes are gone");

    // IPv6 alone.
    let mut daemon = lab.start_named("lab", &["--cidr", "fd10:10::/64"], &[]);
    let routes = main_routes(&lab);
    let ours: Vec<&str> = routes.lines().filter(|l| l.starts_with("fd10:10::/64")).collect();
    assert_eq!(ours.len(), 1, "one route for the /64:\n{routes}");
    assert!(!routes.contains("10.10.0.0/16"), "no IPv4 route asked for:\n{routes}");
    lab.fetch_url(&format!("http://[{V6_HOST}]:8080/blob"), 60, "0");
    lab.stop(&mut daemon, "lab");
    assert_eq!(main_routes(&lab), before, "stop restored the table");
}
