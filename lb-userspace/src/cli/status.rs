//! `dsrlb status` and `dsrlb stats` as a table.

use serde_json::Value;

/// `VIP:PORT`, an IPv6 VIP in brackets.
fn endpoint(vip: &str, port: &Value) -> String {
    if vip.contains(':') { format!("[{vip}]:{port}") } else { format!("{vip}:{port}") }
}

pub fn table(v: &Value) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let empty = Vec::new();
    for l in v["listeners"].as_array().unwrap_or(&empty) {
        let _ = writeln!(
            out,
            "listener {} {} hash={}  packets {}  new flows {}  idle timeout {}",
            l["name"].as_str().unwrap_or(""),
            endpoint(l["vip"].as_str().unwrap_or(""), &l["port"]),
            l["hash"].as_str().unwrap_or(""),
            l["packets"],
            l["new_flows"],
            l["flow_idle_timeout"].as_str().unwrap_or("")
        );
        if l["fail_open"].as_bool() == Some(true) {
            let _ = writeln!(out, "  FAILING OPEN: every backend is marked down; new flows go to all of them (all_down = \"forward\")");
        }
        if let Some(rate) = l["max_conn_rate"].as_u64() {
            let _ = writeln!(out, "  max_conn_rate {rate}/s (burst {}): {} SYNs dropped", l["max_conn_burst"], l["conn_rate_dropped"]);
        }
        if l["icmp_too_big"].as_u64().is_some_and(|n| n > 0) {
            let _ = writeln!(out, "  ICMP frag-needed forwarded: {}", l["icmp_too_big"]);
        }
        let _ = writeln!(
            out,
            "  {:<12} {:<15} {:<18} {:>6} {:>8} {:>8} {:>10} {:>10}  last check",
            "backend", "address", "state", "weight", "flows", "pkts/s", "new/s", "packets"
        );
        for b in l["backends"].as_array().unwrap_or(&empty) {
            let mut state = b["state"].as_str().unwrap_or("?").to_owned();
            if b["drained"].as_bool() == Some(true) {
                state += ",drained";
            }
            if b["resetting_flows"].as_bool() == Some(true) {
                state += ",reset";
            }
            if b["unchecked"].is_string() {
                state += ",unchecked";
            }
            let _ = writeln!(
                out,
                "  {:<12} {:<15} {:<18} {:>6} {:>8} {:>8.0} {:>10.1} {:>10}  {}",
                b["name"].as_str().unwrap_or(""),
                b["address"].as_str().unwrap_or(""),
                state,
                b["weight"].as_u64().unwrap_or(0),
                b["flows"].as_u64().unwrap_or(0),
                b["packets_per_sec"].as_f64().unwrap_or(0.0),
                b["new_flows_per_sec"].as_f64().unwrap_or(0.0),
                b["packets"].as_u64().unwrap_or(0),
                b["last_check"].as_str().unwrap_or("")
            );
            if let Some(why) = b["unchecked"].as_str() {
                let _ = writeln!(
                    out,
                    "    UNCHECKED: {why} (this host's fault, not the broker's: its state is kept; {} such rounds)",
                    b["local_errors"]
                );
            }
        }
    }
    let _ = writeln!(out, "flow table entries (live): {}", v["flow_table_entries"]);
    if let Some(id) = v["next_program"]["id"].as_u64() {
        let _ = writeln!(
            out,
            "next program: {id} ({}) at {}: every frame the balancer passes",
            v["next_program"]["name"].as_str().unwrap_or(""),
            v["next_program"]["path"].as_str().unwrap_or("")
        );
    }
    if let Some(events) = v["flow_table"].as_object() {
        let line: Vec<String> = events.iter().map(|(k, n)| format!("{k} {n}")).collect();
        let _ = writeln!(out, "flow table events: {}", line.join("  "));
    }
    if let Some(n) = v["verdicts"]["pass/not_our_mac"].as_u64().filter(|n| *n > 0) {
        let _ = writeln!(out, "frames for another MAC passed: {n}");
    }
    ha_table(v, &mut out);
    out
}

/// The announcement and cluster lines of `dsrlb status`.
fn ha_table(v: &Value, out: &mut String) {
    use std::fmt::Write as _;
    let empty = Vec::new();
    if let Some(a) = v["announce"].as_object() {
        let vips: Vec<String> = a["vips"]
            .as_array()
            .unwrap_or(&empty)
            .iter()
            .map(|x| {
                let state = if x["announced"].as_bool() == Some(true) { "announced" } else { "withdrawn" };
                format!("{} {state} ({})", x["vip"].as_str().unwrap_or(""), x["why"].as_str().unwrap_or(""))
            })
            .collect();
        let _ = writeln!(out, "announce (table {}): {}", a["table"], vips.join("; "));
        if let Some(e) = a["error"].as_str() {
            let _ = writeln!(out, "  ANNOUNCE FAILED: {e}");
        }
    }
    if let Some(c) = v["cluster"].as_object() {
        let joined = if c["joined"].as_bool() == Some(true) {
            format!("joined ({})", c["joined_how"].as_str().unwrap_or("without waiting"))
        } else {
            "JOINING (not announcing, ping fails)".to_owned()
        };
        let walk = c["last_walk"].as_object().map_or_else(
            || "no walk yet".to_owned(),
            |w| format!("{} exceptions at the last walk ({} s ago)", w["exceptions"], w["ago_s"]),
        );
        let m = &c["merged"];
        let auth = if c["insecure"].as_bool() == Some(true) {
            "INSECURE (no key_file: peers are not authenticated)"
        } else {
            "authenticated (key_file)"
        };
        let _ = writeln!(
            out,
            "cluster: node {} {auth} {joined}; {walk}; received flows inserted {} refreshed {} kept {} full {} unknown {}",
            c["me"].as_str().unwrap_or(""),
            m["inserted"],
            m["refreshed"],
            m["kept"],
            m["full"],
            m["unknown"]
        );
        for p in c["peers"].as_array().unwrap_or(&empty) {
            let dir = |up: &Value, err: &Value| match (up.as_bool(), err.as_str()) {
                (Some(true), _) => "up".to_owned(),
                (_, Some(e)) => format!("down ({e})"),
                _ => "down".to_owned(),
            };
            let _ = writeln!(
                out,
                "  peer {:<21} out {}  in {}{}  config {}  flows sent {} received {}",
                p["node"].as_str().unwrap_or(""),
                dir(&p["out_connected"], &p["out_error"]),
                dir(&p["in_connected"], &p["in_error"]),
                if p["synced"].as_bool() == Some(true) { " synced" } else { "" },
                p["config"].as_str().unwrap_or(""),
                p["flows_sent"],
                p["flows_received"]
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `dsrlb status` says whether the cluster sync authenticates its peers.
    #[test]
    fn the_status_says_when_the_cluster_sync_is_insecure() {
        let status = |insecure: bool| {
            let v = serde_json::json!({ "cluster": {
                "me": "192.0.2.2:9878", "insecure": insecure, "joined": true, "joined_how": "with every running node's exceptions",
                "last_walk": null, "merged": {}, "peers": [],
            }});
            let mut out = String::new();
            ha_table(&v, &mut out);
            out
        };
        let out = status(true);
        assert!(out.starts_with("cluster: node 192.0.2.2:9878 INSECURE (no key_file: peers are not authenticated) joined"), "{out}");
        let out = status(false);
        assert!(out.starts_with("cluster: node 192.0.2.2:9878 authenticated (key_file) joined"), "{out}");
    }
}
