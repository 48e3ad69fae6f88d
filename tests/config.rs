//! Facts about the configuration loader and the Azure ML preset.

use egress_proxy::config::{Config, Origin};
use egress_proxy::load::load;

#[test]
fn the_preset_leaves_out_azure_front_door_frontend_on_purpose() {
    // AzureFrontDoor.Frontend fronts every customer's Front Door endpoint: allowing it would let the
    // compute reach an attacker's endpoint. Only AzureFrontDoor.FirstParty is in the preset.
    let loaded = load(None, &[]).unwrap();
    let tags: Vec<&str> =
        loaded.compiled.policy.rules().iter().flat_map(|r| r.tags.iter().map(|(t, _)| t.as_str())).collect();
    assert!(tags.contains(&"AzureFrontDoor.FirstParty"));
    assert!(!tags.iter().any(|t| t.eq_ignore_ascii_case("AzureFrontDoor.Frontend")), "{tags:?}");
    assert!(!egress_proxy::config::EMBEDDED_CONFIG
        .lines()
        .any(|l| !l.trim_start().starts_with('#') && l.contains("AzureFrontDoor.Frontend")));
}

#[test]
fn the_preset_names_the_microsoft_guidance_service_tags_for_each_region() {
    let loaded = load(None, &["westus2".into(), "FranceCentral".into()]).unwrap();
    let mut tags: Vec<String> = loaded
        .compiled
        .policy
        .rules()
        .iter()
        .filter(|r| r.protocol == egress_proxy::config::Protocol::Tcp)
        .flat_map(|r| r.tags.iter().map(|(t, _)| t.clone()))
        .collect();
    tags.sort();
    assert_eq!(
        tags,
        [
            "AzureFrontDoor.FirstParty",
            "AzureMachineLearning",
            "BatchNodeManagement.FranceCentral",
            "BatchNodeManagement.WestUS2",
            "MicrosoftContainerRegistry.FranceCentral",
            "MicrosoftContainerRegistry.WestUS2",
            "Storage.FranceCentral",
            "Storage.WestUS2",
        ]
    );
    assert!(loaded
        .compiled
        .policy
        .rules()
        .iter()
        .all(|r| r.ports.iter().all(|p| *p == (443..=443) || r.name.as_ref() == "azureml-udp")));
}

#[test]
fn storage_accounts_restrict_the_storage_rule_to_those_accounts() {
    let text =
        egress_proxy::config::EMBEDDED_CONFIG.replace("storage_accounts = []", "storage_accounts = [\"mlstore123\"]");
    let config = Config::from_str(&text, Origin::Embedded).unwrap();
    let tags = egress_proxy::service_tags::TagTable::parse(egress_proxy::config::EMBEDDED_TAGS).unwrap();
    let compiled = egress_proxy::policy::compile(&config, &tags).unwrap();
    let storage = compiled.policy.rules().iter().find(|r| r.name.as_ref() == "storage").unwrap();
    assert_eq!(storage.patterns.len(), 5);
    assert!(storage.patterns.iter().all(|p| p.to_string().starts_with("mlstore123.")));
    assert!(compiled.warnings.is_empty(), "{:?}", compiled.warnings);
}

#[test]
fn a_tag_missing_from_the_file_is_an_error_naming_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("p.toml");
    let tags = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/ServiceTags_Public_20251020.azureml-subset.json");
    std::fs::write(&cfg, format!("[service_tags]\nfile = {tags:?}\n\n[[rule]]\nname = \"s\"\naction = \"allow\"\nservice_tags = [\"Storage\"]\n")).unwrap();
    let err = load(Some(&cfg), &[]).unwrap_err();
    assert_eq!(err.0.len(), 1);
    let e = &err.0[0];
    assert_eq!((e.line, e.field.as_str()), (7, "rule[0] \"s\".service_tags[0]"));
    assert_eq!(e.msg, "service tag \"Storage\" is not in the service-tag file (changeNumber 374)");
}

#[test]
fn a_missing_or_broken_tag_file_is_an_error_on_its_field() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("p.toml");
    std::fs::write(&cfg, "[service_tags]\nfile = \"missing.json\"\n").unwrap();
    let e = &load(Some(&cfg), &[]).unwrap_err().0[0];
    assert_eq!((e.line, e.field.as_str()), (2, "service_tags.file"));
    assert!(e.msg.starts_with("cannot read"), "{}", e.msg);
    std::fs::write(dir.path().join("missing.json"), "{\"values\": 1}").unwrap();
    let e = &load(Some(&cfg), &[]).unwrap_err().0[0];
    assert!(e.msg.starts_with("not a Service Tags file"), "{}", e.msg);
}

#[test]
fn limits_and_resolve_pins_are_checked() {
    let bad = "[limits]\nmax_request_head_bytes = 100\n[resolve.static]\n\"ML.azure.com\" = [\"127.0.0.1\"]\n";
    let config = Config::from_str(bad, Origin::File("p.toml".into())).unwrap();
    let errs = egress_proxy::policy::compile(&config, &Default::default()).unwrap_err().0;
    let fields: Vec<(usize, &str)> = errs.iter().map(|e| (e.line, e.field.as_str())).collect();
    assert_eq!(fields, [(4, "resolve.static.\"ML.azure.com\""), (2, "limits.max_request_head_bytes")]);
}

#[test]
fn absurd_durations_are_refused_on_their_line() {
    let text = "[limits]\nmax_connections = 10\nconnect_timeout = \"400000000000y\"\n";
    let config = Config::from_str(text, Origin::File("p.toml".into())).unwrap();
    let errs = egress_proxy::policy::compile(&config, &Default::default()).unwrap_err().0;
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert_eq!((errs[0].line, errs[0].field.as_str()), (3, "limits.connect_timeout"));
}

#[test]
fn upload_limits_of_zero_are_refused_on_their_field() {
    let text = "[[rule]]\nname = \"u\"\naction = \"allow\"\nhosts = [\"a.example\"]\nmax_upload_bytes = 0\n\
                upload_budget = { bytes = 0, per = \"1h\" }\n";
    let config = Config::from_str(text, Origin::File("p.toml".into())).unwrap();
    let errs = egress_proxy::policy::compile(&config, &Default::default()).unwrap_err().0;
    let fields: Vec<(usize, &str)> = errs.iter().map(|e| (e.line, e.field.as_str())).collect();
    assert_eq!(fields, [(5, "rule[0] \"u\".max_upload_bytes"), (6, "rule[0] \"u\".upload_budget")]);
    let ok = "[[rule]]\nname = \"u\"\naction = \"allow\"\nhosts = [\"a.example\"]\nmax_upload_bytes = 10\n\
              upload_budget = { bytes = 100, per = \"1h\" }\n";
    let compiled = egress_proxy::policy::compile(
        &Config::from_str(ok, Origin::File("p.toml".into())).unwrap(),
        &Default::default(),
    )
    .unwrap();
    let rule = &compiled.policy.rules()[0];
    assert_eq!(rule.max_upload, Some(10));
    assert_eq!(rule.upload_budget.map(|b| (b.bytes, b.per.as_secs())), Some((100, 3600)));
}
