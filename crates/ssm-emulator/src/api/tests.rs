use super::*;
use crate::config::Config;

/// Three instances: two tagged Role=bastion (one of them offline), one Role=db.
fn shared() -> Arc<Shared> {
    let mut config = Config::default()
        .with_instance("i-0000000000000000a", "10.0.0.1")
        .with_instance("i-0000000000000000b", "10.0.0.2")
        .with_instance("i-0000000000000000c", "10.0.0.3");
    let tag = |c: &mut Config, id: &str, k: &str, v: &str| {
        c.instances.get_mut(id).expect("instance").tags.insert(k.into(), v.into());
    };
    tag(&mut config, "i-0000000000000000a", "Role", "bastion");
    tag(&mut config, "i-0000000000000000b", "Role", "bastion");
    tag(&mut config, "i-0000000000000000b", "Team", "net");
    tag(&mut config, "i-0000000000000000c", "Role", "db");
    config.instances.get_mut("i-0000000000000000b").expect("b").ping_status = "ConnectionLost".into();
    Arc::new(Shared::new(config))
}

fn ids(shared: &Arc<Shared>, body: serde_json::Value) -> Vec<String> {
    let out = handle(shared, "AmazonSSM.DescribeInstanceInformation", body.to_string().as_bytes(), "h").expect("ok");
    out["InstanceInformationList"]
        .as_array()
        .expect("list")
        .iter()
        .map(|i| i["InstanceId"].as_str().expect("id").to_string())
        .collect()
}

#[test]
fn tag_filters_and_ping_status_combine_as_the_service_does() {
    let s = shared();
    let f = |key: &str, values: &[&str]| json!({"Key": key, "Values": values});
    assert_eq!(
        ids(&s, json!({"Filters": [f("tag:Role", &["bastion"])]})),
        ["i-0000000000000000a", "i-0000000000000000b"]
    );
    assert_eq!(
        ids(&s, json!({"Filters": [f("tag:Role", &["bastion"]), f("PingStatus", &["Online"])]})),
        ["i-0000000000000000a"]
    );
    // Any value of one filter; every filter.
    assert_eq!(ids(&s, json!({"Filters": [f("tag:Role", &["db", "bastion"])]})).len(), 3);
    assert_eq!(
        ids(&s, json!({"Filters": [f("tag:Role", &["bastion"]), f("tag:Team", &["net"])]})),
        ["i-0000000000000000b"]
    );
    assert_eq!(ids(&s, json!({"Filters": [f("tag-key", &["Team"])]})), ["i-0000000000000000b"]);
    assert_eq!(ids(&s, json!({"Filters": [f("tag:Role", &["web"])]})), Vec::<String>::new());
    let bad =
        handle(&s, "AmazonSSM.DescribeInstanceInformation", br#"{"Filters":[{"Key":"tag:","Values":["x"]}]}"#, "h");
    assert_eq!(bad.expect_err("tag: without a key").code, "InvalidFilterKey");
}

#[test]
fn pages_follow_max_results_and_next_token() {
    let s = shared();
    let first = handle(&s, "AmazonSSM.DescribeInstanceInformation", br#"{"MaxResults":5}"#, "h").expect("ok");
    assert_eq!(first["InstanceInformationList"].as_array().expect("list").len(), 3);
    assert!(first.get("NextToken").is_none());

    let mut config = Config::default();
    for n in 0..12 {
        config = config.with_instance(&format!("i-{n:017x}"), "10.0.0.1");
    }
    let s = Arc::new(Shared::new(config));
    let mut token: Option<String> = None;
    let mut seen = Vec::new();
    loop {
        let mut body = json!({"MaxResults": 5});
        if let Some(t) = &token {
            body["NextToken"] = json!(t);
        }
        let page = handle(&s, "AmazonSSM.DescribeInstanceInformation", body.to_string().as_bytes(), "h").expect("ok");
        seen.extend(page["InstanceInformationList"].as_array().expect("list").iter().map(|i| i["InstanceId"].clone()));
        match page.get("NextToken").and_then(|t| t.as_str()) {
            Some(t) => token = Some(t.to_string()),
            None => break,
        }
    }
    assert_eq!(seen.len(), 12);
    let too_many = handle(&s, "AmazonSSM.DescribeInstanceInformation", br#"{"MaxResults":51}"#, "h");
    assert_eq!(too_many.expect_err("51").code, "ValidationException");
    let forged = handle(&s, "AmazonSSM.DescribeInstanceInformation", br#"{"NextToken":"x"}"#, "h");
    assert_eq!(forged.expect_err("bad token").code, "InvalidNextToken");
}
