//! The status page (`GET /` on the admin API): `embassy status` for a browser.
//!
//! One self-contained HTML document (inline CSS, a few lines of inline script, nothing fetched
//! from elsewhere) rendered from the same JSON views the API serves. It reads fields by name,
//! as `embassy status` does, so a field added to a view cannot break it: scalar fields it does
//! not know are shown too, under their own names. Every value may come from discovery or from
//! a container's environment, so every value is escaped.
//!
//! The script fetches the page again every [`REFRESH_SECONDS`] and swaps the content in place,
//! which keeps the reader's scroll position; without script, a meta refresh does the same
//! less smoothly. When Embassy stops answering, the last state stays with a warning above it.

use std::{
    fmt::Write as _,
    time::{SystemTime, UNIX_EPOCH},
};

use serde_json::{Map, Value};

/// How often the page refreshes itself.
pub const REFRESH_SECONDS: u32 = 5;

/// Fields of a service view the page shows in their own place (or, for the descriptor's
/// parts, within the descriptor).
const SERVICE_FIELDS: &[&str] = &[
    "id",
    "descriptor",
    "service",
    "tags",
    "protocol",
    "address",
    "namespace",
    "owners",
    "balancer",
    "discovery",
    "endpoints",
    "open_connections",
    "max_connections",
    "excluded",
];

/// The endpoint table's known columns: field and heading.
const ENDPOINT_COLUMNS: &[(&str, &str)] = &[
    ("address", "endpoint"),
    ("state", "state"),
    ("weight", "weight"),
    ("active", "active"),
    ("consecutive_failures", "failing"),
];

/// The page for `services` (as `GET /v1/services/{id}` shows each, with `excluded`), read from
/// `discovery_uri`, as of `now`.
pub fn render(services: &[Value], discovery_uri: &str, now: SystemTime) -> String {
    let mut out = String::with_capacity(8 * 1024 + services.len() * 2048);
    let _ = write!(
        out,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <noscript><meta http-equiv=\"refresh\" content=\"{REFRESH_SECONDS}\"></noscript>\
         <title>{title}</title><style>{STYLE}</style></head>\n<body>\
         <div id=\"stale\" hidden></div>\n<main id=\"content\">",
        title = title(services),
    );
    let _ = writeln!(
        out,
        "<header><h1>Embassy</h1><p>{count} · discovery <code>{uri}</code> · \
         as of <time>{clock}</time> UTC, refreshed every {REFRESH_SECONDS}s</p></header>",
        count = plural(services.len(), "service"),
        uri = escape(discovery_uri),
        clock = clock(now),
    );
    if services.is_empty() {
        out.push_str("<p class=\"empty\">Serving nothing yet.</p>\n");
    }
    for service in services {
        render_service(&mut out, service);
    }
    out.push_str("</main>\n<script>");
    out.push_str(&SCRIPT.replace("REFRESH_MS", &(REFRESH_SECONDS * 1000).to_string()));
    out.push_str("</script>\n</body></html>\n");
    out
}

/// The title says at a glance whether something needs a look.
fn title(services: &[Value]) -> String {
    let unwell = services.iter().filter(|s| !healthy(s)).count();
    if unwell == 0 {
        format!("Embassy: {}", plural(services.len(), "service"))
    } else {
        format!("Embassy: {unwell} of {} need a look", services.len())
    }
}

/// Discovery reachable and at least one endpoint serving.
fn healthy(service: &Value) -> bool {
    service["discovery"]["state"] == "reachable"
        && service["endpoints"]
            .as_array()
            .is_some_and(|e| e.iter().any(|e| e["state"] == "serving"))
}

fn render_service(out: &mut String, service: &Value) {
    let class = if healthy(service) { "ok" } else { "bad" };
    let _ = write!(
        out,
        "<section class=\"service {class}\" id=\"{id}\"><h2><span class=\"id\">{id}</span> \
         <code>{descriptor}</code></h2>\n<dl>",
        id = text(&service["id"]),
        descriptor = text(&service["descriptor"]),
    );
    let mut fact = |name: &str, value: String| {
        let _ = write!(out, "<div><dt>{name}</dt><dd>{value}</dd></div>");
    };
    fact(
        "listening on",
        format!("<code>{}</code>", text(&service["address"])),
    );
    if !service["namespace"].is_null() {
        fact("namespace", text(&service["namespace"]));
    }
    fact("balancer", text(&service["balancer"]));
    fact(
        "connections",
        format!(
            "{} open of {} max",
            text(&service["open_connections"]),
            text(&service["max_connections"])
        ),
    );
    fact("discovery", discovery(&service["discovery"]));
    let owners = list(&service["owners"]);
    fact(
        "for",
        if owners.is_empty() {
            "-".to_string()
        } else {
            owners.join(", ")
        },
    );
    if let Some(fields) = service.as_object() {
        for (key, value) in extra_scalars(fields, SERVICE_FIELDS) {
            fact(&escape(&key.replace('_', " ")), text(value));
        }
    }
    out.push_str("</dl>\n");
    if let Some(detail) = service["discovery"]["detail"]
        .as_str()
        .filter(|d| !d.is_empty())
    {
        let class = if service["discovery"]["state"] == "reachable" {
            "detail"
        } else {
            "detail bad"
        };
        let _ = writeln!(
            out,
            "<p class=\"{class}\">discovery says: {}</p>",
            escape(detail)
        );
    }
    endpoints(out, &service["endpoints"]);
    excluded(out, &service["excluded"]);
    out.push_str("</section>\n");
}

/// `reachable, set 12s old (3 sets)` with the state marked for its colour.
fn discovery(discovery: &Value) -> String {
    let state = text(&discovery["state"]);
    let class = if discovery["state"] == "reachable" {
        "ok"
    } else {
        "bad"
    };
    let set = match discovery["set_age_seconds"].as_f64() {
        Some(age) => format!(
            "set {} old ({} received)",
            duration(age),
            text(&discovery["updates"])
        ),
        None => format!(
            "<span class=\"bad\">no set yet</span> (waiting {})",
            duration(discovery["waiting_seconds"].as_f64().unwrap_or(0.0))
        ),
    };
    format!("<span class=\"badge {class}\">{state}</span> {set}")
}

fn endpoints(out: &mut String, endpoints: &Value) {
    let rows = endpoints.as_array().map_or(&[][..], Vec::as_slice);
    if rows.is_empty() {
        out.push_str("<p class=\"empty bad\">No endpoints: connections are refused.</p>\n");
        return;
    }
    // Columns the views carry beyond the known ones, in the order the first row has them.
    let known: Vec<&str> = ENDPOINT_COLUMNS.iter().map(|(field, _)| *field).collect();
    let extra: Vec<String> = rows[0]
        .as_object()
        .map(|first| {
            extra_scalars(first, &known)
                .map(|(key, _)| key.clone())
                .collect()
        })
        .unwrap_or_default();
    out.push_str("<table class=\"endpoints\"><thead><tr>");
    for (field, heading) in ENDPOINT_COLUMNS {
        let class = if *field == "address" || *field == "state" {
            ""
        } else {
            " class=\"n\""
        };
        let _ = write!(out, "<th{class}>{heading}</th>");
    }
    for key in &extra {
        let _ = write!(
            out,
            "<th class=\"n\">{}</th>",
            escape(&key.replace('_', " "))
        );
    }
    out.push_str("</tr></thead><tbody>\n");
    for row in rows {
        let state_class = if row["state"] == "serving" {
            "ok"
        } else {
            "bad"
        };
        let failing = row["consecutive_failures"].as_u64().unwrap_or(0) > 0;
        let _ = write!(
            out,
            "<tr><td><code>{address}</code></td><td><span class=\"badge {state_class}\">{state}\
             </span></td><td class=\"n\">{weight}</td><td class=\"n\">{active}</td>\
             <td class=\"n{failing}\">{failures}</td>",
            address = text(&row["address"]),
            state = text(&row["state"]),
            weight = text(&row["weight"]),
            active = text(&row["active"]),
            failing = if failing { " bad" } else { "" },
            failures = text(&row["consecutive_failures"]),
        );
        for key in &extra {
            let _ = write!(out, "<td class=\"n\">{}</td>", text(&row[key.as_str()]));
        }
        out.push_str("</tr>\n");
    }
    out.push_str("</tbody></table>\n");
}

fn excluded(out: &mut String, excluded: &Value) {
    let Some(rows) = excluded.as_array() else {
        return;
    };
    if rows.is_empty() {
        out.push_str("<p class=\"quiet\">Discovery left nothing out.</p>\n");
        return;
    }
    let _ = writeln!(
        out,
        "<details open><summary>Left out by discovery: {}</summary>\
         <table class=\"excluded\"><thead><tr><th>instance</th><th>reason</th><th>why</th>\
         </tr></thead><tbody>",
        plural(rows.len(), "instance"),
    );
    for row in rows {
        let _ = writeln!(
            out,
            "<tr><td><code>{}</code></td><td>{}</td><td>{}</td></tr>",
            text(&row["instance"]),
            text(&row["reason"]),
            text(&row["detail"]),
        );
    }
    out.push_str("</tbody></table></details>\n");
}

/// The scalar fields of `fields` (and objects of numbers) not in `known`, in their order.
fn extra_scalars<'a>(
    fields: &'a Map<String, Value>,
    known: &'a [&str],
) -> impl Iterator<Item = (&'a String, &'a Value)> {
    fields.iter().filter(|(key, value)| {
        !known.contains(&key.as_str())
            && match value {
                Value::String(_) | Value::Number(_) | Value::Bool(_) => true,
                // Counts by reason and the like: `no_endpoint 2, connect_refused 1`.
                Value::Object(counts) => counts.values().all(Value::is_number),
                _ => false,
            }
    })
}

/// A value as escaped text: strings bare, `null` as `-`, an object as `key value, ...`,
/// anything else as JSON.
fn text(value: &Value) -> String {
    match value {
        Value::String(s) => escape(s),
        Value::Null => "-".to_string(),
        Value::Number(n) => n.to_string(),
        Value::Object(fields) if fields.is_empty() => "-".to_string(),
        Value::Object(fields) => fields
            .iter()
            .map(|(key, value)| format!("{} {}", escape(key), text(value)))
            .collect::<Vec<_>>()
            .join(", "),
        other => escape(&other.to_string()),
    }
}

/// The strings of a JSON list, escaped.
fn list(value: &Value) -> Vec<String> {
    value
        .as_array()
        .map(|items| items.iter().map(text).collect())
        .unwrap_or_default()
}

/// `text` made safe to place in HTML content and in quoted attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn plural(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

/// An age the way an operator reads it: `12s`, `4m 05s`, `3h 20m`, `2d 4h`.
fn duration(seconds: f64) -> String {
    let s = seconds.max(0.0).round() as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m {:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h {:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d {}h", s / 86400, s % 86400 / 3600),
    }
}

/// `HH:MM:SS` of `now` in UTC.
fn clock(now: SystemTime) -> String {
    let s = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()) % 86400;
    format!("{:02}:{:02}:{:02}", s / 3600, s % 3600 / 60, s % 60)
}

const STYLE: &str = "\
:root{color-scheme:light dark;--fg:#1d2125;--muted:#5f6b76;--bg:#f4f5f7;--card:#fff;\
--line:#dde1e6;--ok:#1a7f37;--okbg:#dcf5e3;--bad:#b42318;--badbg:#fde4e1}\
@media (prefers-color-scheme:dark){:root{--fg:#e6e8eb;--muted:#9aa5b1;--bg:#16191d;\
--card:#1f2328;--line:#343a41;--ok:#5fd37a;--okbg:#173a22;--bad:#ff8a7a;--badbg:#4a1d18}}\
*{box-sizing:border-box}\
body{margin:0;background:var(--bg);color:var(--fg);\
font:14px/1.45 system-ui,-apple-system,'Segoe UI',Roboto,sans-serif}\
main{max-width:1280px;margin:0 auto;padding:12px 20px 32px}\
header{display:flex;align-items:baseline;gap:16px;flex-wrap:wrap}\
h1{font-size:20px;margin:4px 0}header p{margin:0;color:var(--muted)}\
code{font:13px/1.4 ui-monospace,'DejaVu Sans Mono',Menlo,Consolas,monospace;\
overflow-wrap:anywhere}\
.service{background:var(--card);border:1px solid var(--line);border-left:4px solid var(--ok);\
border-radius:6px;padding:10px 16px 12px;margin:12px 0}\
.service.bad{border-left-color:var(--bad)}\
h2{font-size:16px;margin:0 0 6px;display:flex;gap:12px;align-items:baseline;flex-wrap:wrap}\
h2 .id{font-weight:700}h2 code{font-size:14px;color:var(--muted)}\
dl{display:flex;flex-wrap:wrap;gap:4px 28px;margin:0 0 8px}dl div{display:flex;gap:6px}\
dt{color:var(--muted)}dd{margin:0}\
table{border-collapse:collapse;width:100%;margin:4px 0}\
th{text-align:left;font-weight:600;color:var(--muted);font-size:12px;text-transform:uppercase;\
letter-spacing:.03em;border-bottom:1px solid var(--line);padding:4px 10px}\
td{padding:3px 10px;border-bottom:1px solid var(--line);vertical-align:top}\
tbody tr:last-child td{border-bottom:0}\
.n{text-align:right;font-variant-numeric:tabular-nums;width:7em}\
.endpoints td:first-child,.excluded td:first-child{width:32%}\
.badge{display:inline-block;padding:0 8px;border-radius:10px;font-size:12px;font-weight:600;\
background:var(--okbg);color:var(--ok)}.badge.bad{background:var(--badbg);color:var(--bad)}\
td.bad,span.bad,p.bad,p.detail.bad{color:var(--bad);font-weight:600}\
.detail{margin:0 0 6px;color:var(--muted)}.empty,.quiet{margin:6px 0;color:var(--muted)}\
details{margin-top:8px}summary{cursor:pointer;color:var(--muted);font-weight:600}\
#stale{position:sticky;top:0;z-index:1;background:var(--bad);color:#fff;padding:6px 20px;\
font-weight:600}";

/// Fetches the page again and swaps `#content` in place (the scroll stays); on failure the
/// banner says since when the page is stale. Pauses while the tab is hidden.
const SCRIPT: &str = r#"(function () {
  var failedSince = null;
  function stale(error) {
    var banner = document.getElementById("stale");
    if (!error) { failedSince = null; banner.hidden = true; return; }
    failedSince = failedSince || new Date();
    banner.textContent = "No answer from Embassy since " + failedSince.toLocaleTimeString() +
      " (" + error.message + "); this is what it said last.";
    banner.hidden = false;
  }
  function refresh() {
    if (document.hidden) { return setTimeout(refresh, REFRESH_MS); }
    fetch(location.href, { cache: "no-store" }).then(function (response) {
      if (!response.ok) { throw new Error("HTTP " + response.status); }
      return response.text();
    }).then(function (html) {
      var next = new DOMParser().parseFromString(html, "text/html");
      var content = next.getElementById("content");
      if (!content) { throw new Error("not a status page"); }
      document.getElementById("content").replaceWith(document.adoptNode(content));
      document.title = next.title;
      stale(null);
    }).catch(stale).then(function () { setTimeout(refresh, REFRESH_MS); });
  }
  setTimeout(refresh, REFRESH_MS);
})();"#;

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::time::Duration;

    fn check(raw: &str, escaped: &str) {
        assert_eq!(escape(raw), escaped, "{raw:?}");
    }

    #[test]
    fn escaping() {
        check("web-1", "web-1");
        check(
            "<script>alert(1)</script>",
            "&lt;script&gt;alert(1)&lt;/script&gt;",
        );
        check("a&b", "a&amp;b");
        check(
            "\"><img src=x onerror=alert(1)>",
            "&quot;&gt;&lt;img src=x onerror=alert(1)&gt;",
        );
        check("it's", "it&#39;s");
        check("&lt;", "&amp;lt;");
        check("ünïcødé ✓", "ünïcødé ✓");
    }

    fn at(seconds: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(seconds)
    }

    fn service() -> Value {
        json!({
            "id": "tcp-8080",
            "descriptor": "web[prod];8080/tcp",
            "service": "web",
            "tags": ["prod"],
            "protocol": "tcp",
            "address": "127.0.0.1:8080",
            "namespace": null,
            "owners": ["container shop (0123abcd):WEB"],
            "balancer": "round-robin",
            "discovery": {
                "state": "reachable", "detail": "", "state_since": 1.0, "updates": 3,
                "last_update": 2.0, "set_age_seconds": 75.4, "waiting_seconds": null
            },
            "endpoints": [
                { "address": "10.0.0.1:80", "state": "serving", "weight": 1, "active": 2,
                  "consecutive_failures": 0 },
                { "address": "10.0.0.2:80", "state": "serving", "weight": 3, "active": 0,
                  "consecutive_failures": 4 }
            ],
            "open_connections": 2,
            "max_connections": 10000,
            "excluded": [
                { "instance": "127.0.0.1:10", "reason": "tag", "detail": "no tag prod" }
            ]
        })
    }

    #[test]
    fn a_service_shows_what_embassy_status_shows() {
        let page = render(&[service()], "file:///etc/embassy/services.json", at(3723));
        for expected in [
            "<span class=\"id\">tcp-8080</span>",
            "<code>web[prod];8080/tcp</code>",
            "<code>127.0.0.1:8080</code>",
            "round-robin",
            "2 open of 10000 max",
            "container shop (0123abcd):WEB",
            "set 1m 15s old (3 received)",
            "<code>10.0.0.1:80</code>",
            "<td class=\"n bad\">4</td>",
            "Left out by discovery: 1 instance",
            "<td><code>127.0.0.1:10</code></td><td>tag</td><td>no tag prod</td>",
            "file:///etc/embassy/services.json",
            "as of <time>01:02:03</time> UTC",
            "<title>Embassy: 1 service</title>",
        ] {
            assert!(
                page.contains(expected),
                "{expected:?} missing from:\n{page}"
            );
        }
        assert!(page.contains("<section class=\"service ok\""));
        assert!(
            !page.contains("<link") && !page.contains(" src="),
            "self-contained"
        );
    }

    #[test]
    fn values_from_discovery_and_containers_are_escaped() {
        let mut evil = service();
        evil["id"] = json!("tcp-1\"><b>");
        evil["owners"] = json!(["container <script>alert('owner')</script>"]);
        evil["endpoints"][0]["address"] = json!("<img src=x onerror=alert(1)>");
        evil["excluded"][0]["instance"] = json!("<script>alert(1)</script>");
        evil["excluded"][0]["detail"] = json!("value \"</td></table><h1>x\" unreadable");
        evil["discovery"]["detail"] = json!("<iframe>");
        let page = render(&[evil], "file:///<x>", at(0));
        // The page's own script is the only one, and no markup came from the values.
        assert_eq!(page.matches("<script").count(), 1, "{page}");
        for absent in ["<img", "<b>", "<iframe>", "<h1>x", "<x>"] {
            assert!(!page.contains(absent), "{absent:?} unescaped in:\n{page}");
        }
        for shown in [
            "&lt;script&gt;alert(1)&lt;/script&gt;",
            "container &lt;script&gt;alert(&#39;owner&#39;)&lt;/script&gt;",
            "&lt;img src=x onerror=alert(1)&gt;",
            "id=\"tcp-1&quot;&gt;&lt;b&gt;\"",
            "discovery says: &lt;iframe&gt;",
        ] {
            assert!(page.contains(shown), "{shown:?} missing from:\n{page}");
        }
    }

    #[test]
    fn fields_it_does_not_know_are_shown_by_name() {
        let mut grown = service();
        grown["endpoints"][0]["connections_total"] = json!(17);
        grown["endpoints"][1]["connections_total"] = json!(5);
        grown["endpoints"][0]["<bytes>"] = json!(1);
        grown["endpoints"][1]["<bytes>"] = json!(2);
        grown["accepted_total"] = json!(22);
        grown["failed"] = json!({ "no_endpoint": 2, "<x>": 1 });
        grown["consumers"] = json!([{ "name": "shop", "id": "0123" }]);
        let page = render(&[grown], "file:///x", at(0));
        assert!(
            page.contains("<th class=\"n\">connections total</th>"),
            "{page}"
        );
        assert!(page.contains("<td class=\"n\">17</td>"), "{page}");
        assert!(
            page.contains("<th class=\"n\">&lt;bytes&gt;</th>"),
            "{page}"
        );
        assert!(
            page.contains("<dt>accepted total</dt><dd>22</dd>"),
            "{page}"
        );
        assert!(
            page.contains("<dt>failed</dt><dd>&lt;x&gt; 1, no_endpoint 2</dd>"),
            "{page}"
        );
        assert!(
            !page.contains("<dt>consumers</dt>"),
            "lists are not scalars: {page}"
        );
    }

    #[test]
    fn trouble_shows() {
        let mut waiting = service();
        waiting["discovery"] = json!({
            "state": "unreachable", "detail": "etcd 127.0.0.1:2379: connection refused",
            "updates": 0, "set_age_seconds": null, "waiting_seconds": 12.2
        });
        waiting["endpoints"] = json!([]);
        waiting["excluded"] = json!([]);
        let page = render(&[waiting, service()], "etcd://127.0.0.1:2379", at(0));
        for expected in [
            "<section class=\"service bad\"",
            "<span class=\"badge bad\">unreachable</span>",
            "no set yet</span> (waiting 12s)",
            "discovery says: etcd 127.0.0.1:2379: connection refused",
            "No endpoints: connections are refused.",
            "Discovery left nothing out.",
            "<title>Embassy: 1 of 2 need a look</title>",
        ] {
            assert!(
                page.contains(expected),
                "{expected:?} missing from:\n{page}"
            );
        }
        let empty = render(&[], "file:///x", at(0));
        assert!(empty.contains("Serving nothing yet."), "{empty}");
        assert!(
            empty.contains("<title>Embassy: 0 services</title>"),
            "{empty}"
        );
    }

    #[test]
    fn durations() {
        for (seconds, shown) in [
            (0.0, "0s"),
            (59.4, "59s"),
            (60.0, "1m 00s"),
            (3599.0, "59m 59s"),
            (3600.0, "1h 00m"),
            (86400.0 + 7200.0, "1d 2h"),
            (-3.0, "0s"),
        ] {
            assert_eq!(duration(seconds), shown, "{seconds}");
        }
    }
}
