use super::*;

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write config");
    p
}

const GOOD: &str = r#"# two tunnels
[tunnel.prod]
instance_id = "i-0abc123def4567890"
region = "eu-west-1"
profile = "prod"
cidrs = ["10.0.0.0/16", "10.1.0.0/16"]
dns_domains = ["Corp.Internal"]
dns_auto = true
agent_port = 7302

[tunnel.staging]
instance_id = "mi-0123456789abcdef0"
cidrs = ["172.20.0.0/16"]

[tunnel.fleet]
instance_id = "i-0abc123def4567890"
instance_ids = ["i-0abc123def4567891", "i-0abc123def4567890"]
instance_tags = { Role = "ssm-proxy", Env = "prod" }
cidrs = ["10.8.0.0/16"]
rotate_after = "55m"
sessions = 8
reason = "on-call: INC-1234"
"#;

#[test]
fn a_good_file_gives_validated_tunnels() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = write(dir.path(), "config.toml", GOOD);
    let all = load(std::slice::from_ref(&p)).expect("load");
    assert_eq!(all.len(), 3);
    let prod = find(std::slice::from_ref(&p), "prod").expect("prod");
    assert_eq!(prod.instance_ids, ["i-0abc123def4567890"]);
    assert_eq!((prod.instance_tags.len(), prod.rotate_after), (0, None));
    assert_eq!(prod.region.as_deref(), Some("eu-west-1"));
    assert_eq!(prod.cidrs.len(), 2);
    assert_eq!(prod.dns_domains, vec![Domain::parse("corp.internal").expect("domain")]);
    assert!(prod.dns_auto);
    assert_eq!(prod.agent_port, Some(7302));
    assert!(prod.source.ends_with("config.toml line 2"), "{}", prod.source);
    let fleet = find(std::slice::from_ref(&p), "fleet").expect("fleet");
    // instance_id first, then instance_ids, each once; tags sorted by key.
    assert_eq!(fleet.instance_ids, ["i-0abc123def4567890", "i-0abc123def4567891"]);
    assert_eq!(fleet.instance_tags, [("Env".into(), "prod".into()), ("Role".into(), "ssm-proxy".into())]);
    assert_eq!(fleet.rotate_after, Some(std::time::Duration::from_secs(55 * 60)));
    assert_eq!((fleet.sessions, prod.sessions), (Some(8), None));
    assert_eq!((fleet.reason.as_deref(), prod.reason.as_deref()), (Some("on-call: INC-1234"), None));
    let staging = find(&[p], "staging").expect("staging");
    assert_eq!((staging.region, staging.agent_port, staging.dns_auto), (None, None, false));
}

#[test]
fn missing_files_are_skipped_and_an_unknown_name_lists_the_known_ones() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = write(dir.path(), "config.toml", GOOD);
    let none = dir.path().join("absent.toml");
    assert_eq!(load(&[none.clone(), p.clone()]).expect("load").len(), 3);
    let e = find(&[none.clone(), p], "qa").expect_err("unknown").to_string();
    assert!(e.contains("no tunnel named \"qa\"") && e.contains("fleet, prod, staging"), "{e}");
    let e = find(&[none], "qa").expect_err("nothing").to_string();
    assert!(e.contains("no tunnels are defined"), "{e}");
}

/// Each bad file and the words its error must contain (file name and line included).
#[test]
fn errors_name_the_file_the_line_and_the_problem() {
    let cases: &[(&str, &[&str])] = &[
        (
            "[tunnel.prod]\ninstance_id = \"i-0abc123def4567890\"\ncidrs = [\"10.0.0.0/16\"]\nregoin = \"eu-west-1\"\n",
            &["line 4", "unknown field `regoin`"],
        ),
        ("[tunnel.prod]\ninstance_id = \"i-0abc123def4567890\"\ncidrs = [\"10.0.0.0/33\"]\n", &["line 3"]),
        ("[tunnel.prod]\ncidrs = [\"10.0.0.0/16\"]\n", &["line 1", "say which instance"]),
        ("[tunnel.prod]\ninstance_tags = { Role = \"\" }\ncidrs = [\"10.0.0.0/16\"]\n", &["instance_tags", "KEY=VALUE"]),
        (
            "[tunnel.prod]\ninstance_id = \"i-0abc123def4567890\"\ncidrs = [\"10.0.0.0/16\"]\nrotate_after = \"soon\"\n",
            &["rotate_after", "55m"],
        ),
        ("\n[tunnel.prod]\ninstance_id = \"i-xyz\"\ncidrs = [\"10.0.0.0/16\"]\n", &["line 2", "[tunnel.prod]", "instance_id"]),
        ("[tunnel.prod]\ninstance_id = \"i-0abc123def4567890\"\ncidrs = []\n", &["line 1", "at least one range"]),
        (
            "[tunnel.prod]\ninstance_id = \"i-0abc123def4567890\"\ncidrs = [\"10.0.0.0/16\"]\ndns_domains = [\"bad domain\"]\n",
            &["dns_domains", "not a domain name"],
        ),
        ("[tunnel.\"a b\"]\ninstance_id = \"i-0abc123def4567890\"\ncidrs = [\"10.0.0.0/16\"]\n", &["the name must be"]),
        (
            "[tunnel.prod]\ninstance_id = \"i-0abc123def4567890\"\ncidrs = [\"10.0.0.0/16\"]\n[tunnel.prod]\n",
            &["line 4", "duplicate"],
        ),
        ("[tunnels.prod]\n", &["line 1", "unknown field `tunnels`"]),
        ("[tunnel.prod]\ninstance_id = \"i-0abc123def4567890\"\ncidrs = [\"10.0.0.0/16\"]\nagent_port = 70000\n", &["line 4"]),
        (
            "[tunnel.prod]\ninstance_id = \"i-0abc123def4567890\"\ncidrs = [\"10.0.0.0/16\"]\nsessions = 0\n",
            &["sessions: between 1 and 16"],
        ),
        (
            "[tunnel.prod]\ninstance_id = \"i-0abc123def4567890\"\ncidrs = [\"10.0.0.0/16\"]\nreason = \"\"\n",
            &["reason: a reason is 1 to 256 characters"],
        ),
    ];
    let dir = tempfile::tempdir().expect("tempdir");
    for (i, (text, words)) in cases.iter().enumerate() {
        let p = write(dir.path(), &format!("bad{i}.toml"), text);
        let e = format!("{:#}", load(&[p]).expect_err(text));
        assert!(e.contains(&format!("bad{i}.toml")), "case {i}: {e}");
        for w in *words {
            assert!(e.contains(w), "case {i}: {e:?} lacks {w:?}");
        }
    }
}

#[test]
fn a_name_in_two_files_is_an_error_naming_both() {
    let dir = tempfile::tempdir().expect("tempdir");
    let system = write(dir.path(), "system.toml", GOOD);
    let user = write(
        dir.path(),
        "user.toml",
        "\n\n[tunnel.prod]\ninstance_id = \"i-0abc123def4567891\"\ncidrs = [\"10.9.0.0/16\"]\n",
    );
    let e = load(&[system, user]).expect_err("duplicate").to_string();
    assert!(e.contains("defined twice") && e.contains("system.toml line 2") && e.contains("user.toml line 3"), "{e}");
}

#[test]
fn ssm_proxy_config_overrides_the_search_path() {
    // Read through the environment as the binary does; restored afterwards.
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("only.toml");
    let old = std::env::var_os("SSM_PROXY_CONFIG");
    // SAFETY: this is the only test in this binary that touches the environment.
    unsafe { std::env::set_var("SSM_PROXY_CONFIG", &p) };
    let paths = default_paths();
    match old {
        // SAFETY: as above.
        Some(v) => unsafe { std::env::set_var("SSM_PROXY_CONFIG", v) },
        None => unsafe { std::env::remove_var("SSM_PROXY_CONFIG") },
    }
    assert_eq!(paths, vec![p]);
}
