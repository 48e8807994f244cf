//! The shipped monitoring: the Prometheus alert rules (`deploy/prometheus`) pass `promtool
//! check rules` and their unit tests, and every dsrlb metric the rules and the Grafana dashboard
//! (`deploy/grafana`) query is one a live controller in the lab exports.

use std::{collections::BTreeSet, path::PathBuf, process::Command};

use tests::{
    balancer::Balancer,
    client::MqttConn,
    lab::{self, LabGuard},
    netns::in_netns,
    require_root, wait,
};

fn deploy() -> PathBuf {
    lab::deploy_dir()
}

/// Runs `promtool ARGS` in `deploy/prometheus`; its output.
fn promtool(args: &[&str]) -> String {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(deploy().join("prometheus"))
        .output()
        .unwrap_or_else(|e| panic!("promtool: {e} (cargo xtask setup installs Debian's prometheus package, which ships it)"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "promtool {} failed:\n{text}", args.join(" "));
    text
}

#[test]
fn alert_rules_pass_promtool_and_their_unit_tests() {
    let checked = promtool(&["check", "rules", "dsrlb-alerts.yml"]);
    assert!(checked.contains("SUCCESS: 9 rules found"), "{checked}");
    let tested = promtool(&["test", "rules", "dsrlb-alerts.test.yml"]);
    assert!(tested.contains("SUCCESS"), "{tested}");
}

/// The `dsrlb_*` names in a PromQL expression.
fn metric_names(expr: &str, into: &mut BTreeSet<String>) {
    let mut rest = expr;
    while let Some(at) = rest.find("dsrlb_") {
        let name: String = rest[at..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
        rest = &rest[at + name.len()..];
        into.insert(name);
    }
}

/// Every PromQL expression of the dashboard's panels.
fn dashboard_exprs() -> Vec<String> {
    let text = std::fs::read_to_string(deploy().join("grafana/dsrlb-dashboard.json")).expect("the dashboard");
    let dash: serde_json::Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let panels = dash["panels"].as_array().expect("panels");
    assert!(panels.len() >= 13, "a dashboard of {} panels", panels.len());
    let mut exprs = Vec::new();
    for p in panels {
        let targets = p["targets"].as_array().unwrap_or_else(|| panic!("panel {} has no targets", p["title"]));
        assert!(!targets.is_empty(), "panel {} queries nothing", p["title"]);
        for t in targets {
            exprs.push(t["expr"].as_str().expect("an expr").to_owned());
        }
    }
    exprs
}

/// The `expr:` of every rule.
fn rule_exprs() -> Vec<String> {
    let text = std::fs::read_to_string(deploy().join("prometheus/dsrlb-alerts.yml")).expect("the rules");
    text.lines().filter_map(|l| l.trim().strip_prefix("expr:")).map(|e| e.trim().to_owned()).collect()
}

#[test]
fn every_metric_of_the_dashboard_and_the_rules_is_exported() {
    require_root!();
    let mut names = BTreeSet::new();
    for e in dashboard_exprs().iter().chain(&rule_exprs()) {
        metric_names(e, &mut names);
    }
    for expected in [
        "dsrlb_backend_status",
        "dsrlb_backend_state",
        "dsrlb_backend_check_duration_seconds",
        "dsrlb_flow_table_events_total",
        "dsrlb_listener_conn_rate_dropped_total",
    ] {
        assert!(names.contains(expected), "{expected} is queried nowhere: {names:?}");
    }
    let lab = LabGuard::up(2);
    let _lb = Balancer::start(&lab, &lab.config_dual("check = \"tcp\"\ninter = \"300ms\"\ntimeout = \"250ms\""));
    // Some traffic, so every family has its series.
    in_netns(&lab.ns("client"), || {
        MqttConn::connect(None, std::net::SocketAddrV4::new(lab::VIP, 1883), "monitoring", std::time::Duration::from_secs(5))
            .expect("a session")
            .disconnect();
    })
    .expect("client namespace");
    // The check round times appear with the first rounds (within an `inter`).
    let scrape = || {
        let text = lab.scrape_metrics();
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        let missing: Vec<String> =
            names.iter().filter(|n| !text.lines().any(|l| l.split(['{', ' ']).next() == Some(n.as_str()))).cloned().collect();
        (text, missing)
    };
    let (text, missing) = wait::within(std::time::Duration::from_secs(5), std::time::Duration::from_millis(100), || {
        Some(scrape()).filter(|(_, m)| m.is_empty())
    })
    .unwrap_or_else(scrape);
    let exported: BTreeSet<&str> = text.lines().filter(|l| l.starts_with("dsrlb_")).filter_map(|l| l.split(['{', ' ']).next()).collect();
    assert!(missing.is_empty(), "queried by the dashboard or the rules but not exported: {missing:?}\nexported: {exported:?}");
    assert!(
        text.lines().any(|l| l.starts_with("dsrlb_backend_state{listener=\"mqtt6\",backend=\"b1\",state=\"")),
        "no state series of an IPv6 listener's backend:\n{text}"
    );
}
