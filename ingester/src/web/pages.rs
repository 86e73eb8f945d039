//! The dashboard's HTML, rendered on the server with maud (docs/web.md says why): every
//! string spliced into a page is escaped by the template engine unless wrapped in
//! `PreEscaped`, which only the chart data block uses, after [`json_for_script`]. No inline
//! script or style: charts are drawn by `static/app.js` from a JSON data block, bars and the
//! heatmap are SVG attributes and CSS classes, so the Content-Security-Policy can forbid both.

use maud::{html, Markup, PreEscaped, DOCTYPE};

use super::assets;
use super::data::{
    Comparison, Fleet, Incident, Incidents, Overview, Regions, State, TargetName, TargetPage,
    Window, WINDOWS,
};

/// What every page needs to know about the server.
pub struct Site<'a> {
    pub title: &'a str,
    pub public: bool,
}

fn layout(site: &Site, page: &str, heading: &str, body: Markup) -> Markup {
    let nav: &[(&str, &str, bool)] = &[
        ("overview", "/", true),
        ("regions", "/regions", true),
        ("fleet", "/fleet", !site.public),
        ("incidents", "/incidents", true),
    ];
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (heading) " · " (site.title) }
                link rel="icon" type="image/svg+xml" href=(assets::url("favicon.svg"));
                link rel="stylesheet" href=(assets::url("uPlot.min.css"));
                link rel="stylesheet" href=(assets::url("app.css"));
            }
            body data-page=(page) {
                header {
                    a.brand href="/" { (site.title) }
                    nav {
                        @for (name, href, shown) in nav {
                            @if *shown {
                                a.active[*name == page] href=(href) { (name) }
                            }
                        }
                    }
                }
                main {
                    h1 { (heading) }
                    (body)
                }
                footer {
                    "vantage · charts by "
                    a href=(assets::url("uPlot-LICENSE.txt")) { "uPlot (MIT)" }
                }
                script src=(assets::url("uPlot.iife.min.js")) {}
                script src=(assets::url("app.js")) {}
            }
        }
    }
}

/// `12.3%` with enough digits to tell 99.9 from 100, `–` without data.
pub fn pct(v: Option<f64>) -> String {
    match v {
        None => "–".into(),
        Some(v) if (99.995..100.0).contains(&v) => "99.99%".into(),
        Some(v) if v >= 99.0 => format!("{v:.2}%"),
        Some(v) => format!("{v:.1}%"),
    }
}

pub fn ms(v: Option<f64>) -> String {
    match v {
        None => "–".into(),
        Some(v) if v < 10.0 => format!("{v:.1} ms"),
        Some(v) => format!("{v:.0} ms"),
    }
}

/// `45 s ago`, `3 min ago`, `2 h ago`, `5 d ago`.
pub fn ago(secs: Option<f64>) -> String {
    match secs {
        None => "never".into(),
        Some(s) if s < 120.0 => format!("{:.0} s ago", s.max(0.0)),
        Some(s) if s < 7_200.0 => format!("{:.0} min ago", s / 60.0),
        Some(s) if s < 172_800.0 => format!("{:.0} h ago", s / 3_600.0),
        Some(s) => format!("{:.0} d ago", s / 86_400.0),
    }
}

/// Seconds since the epoch → `2024-10-04T12:00:00Z`.
pub fn time(epoch: f64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(epoch.max(0.0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

fn badge(state: State) -> Markup {
    html! { span class={ "badge st-" (state.as_str()) } { (state.label()) } }
}

fn target_link(t: &TargetName) -> Markup {
    html! { a.target-name href={ "/targets/" (t.id) } { (t.display()) } }
}

fn incidents_table(incidents: &[Incident], now: f64) -> Markup {
    html! {
        table.incidents {
            thead { tr { th { "rule" } th { "target / subject" } th { "severity" } th { "regions" } th { "summary" } th { "started" } th { "resolved" } } }
            tbody {
                @for i in incidents {
                    tr data-incident=(i.id) {
                        td { (i.rule) @if i.flapping { " " span.flapping { "flapping" } } }
                        td {
                            @if let Some(id) = i.target_id {
                                a.target-name href={ "/targets/" (id) } {
                                    (i.target_name.clone().unwrap_or_else(|| format!("target {id}")))
                                }
                            } @else if let Some(r) = &i.region {
                                (r)
                            } @else if let Some(a) = &i.agent {
                                (a)
                            }
                        }
                        td { span class={ "sev sev-" (i.severity) } { (i.severity) } }
                        td {
                            @for (k, v) in &i.regions {
                                span.region-outcome title=(v) { (k) } " "
                            }
                        }
                        td { (i.summary) }
                        td title=(time(i.started_at)) { (ago(Some(now - i.started_at))) }
                        td {
                            @match i.resolved_at {
                                Some(t) => span title=(time(t)) { (ago(Some(now - t))) },
                                None => span.open { "open" },
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Class of a day's uptime bar.
fn day_class(probes: i64, up: i64) -> &'static str {
    if probes == 0 {
        return "d-none";
    }
    let p = 100.0 * up as f64 / probes as f64;
    if p >= 99.9 {
        "d-ok"
    } else if p >= 99.0 {
        "d-warn"
    } else {
        "d-bad"
    }
}

/// The 90 daily bars of a target as one SVG path per class (a rect per day with its own
/// `<title>` made the status page of 200 targets 2 MB), titled with the days below 99.9 %.
fn day_bars(t: &super::data::OverviewTarget) -> Markup {
    let classes = ["d-ok", "d-warn", "d-bad", "d-none"];
    let mut paths = vec![String::new(); classes.len()];
    let mut notes = Vec::new();
    let mut none = 0;
    for (i, d) in t.days.iter().enumerate() {
        let class = day_class(d.probes, d.up);
        if let Some(k) = classes.iter().position(|c| *c == class) {
            paths[k].push_str(&format!("M{} 0h3v20h-3z", i * 4));
        }
        match class {
            "d-none" => none += 1,
            "d-ok" => {}
            _ => notes.push(format!(
                "{}: {}",
                d.day,
                pct(Some(100.0 * d.up as f64 / d.probes.max(1) as f64))
            )),
        }
    }
    let shown = notes.len().min(10);
    let mut title = if notes.is_empty() {
        "every day with data at 99.9% or more".to_owned()
    } else {
        format!("below 99.9%: {}", notes[..shown].join(", "))
    };
    if notes.len() > shown {
        title.push_str(&format!(" and {} more", notes.len() - shown));
    }
    if none > 0 {
        title.push_str(&format!("; {none} days without data"));
    }
    html! {
        svg.days width=(t.days.len() * 4) height="20" role="img"
            aria-label={ "daily uptime of " (t.target.display()) ", last " (t.days.len()) " days" } {
            title { (title) }
            @for (k, d) in paths.iter().enumerate() {
                @if !d.is_empty() { path class=(classes[k]) d=(d) {} }
            }
        }
    }
}

pub fn overview(site: &Site, o: &Overview) -> Markup {
    let body = html! {
        @if !o.open_incidents.is_empty() {
            section.open-incidents {
                h2 { "Open incidents" }
                (incidents_table(&o.open_incidents, o.generated_at))
            }
        } @else {
            p.all-quiet { "No open incidents." }
        }
        table.overview {
            thead {
                tr {
                    th { "target" }
                    @for r in &o.regions { th.region { (r) } }
                    th { "24 h" } th { "7 d" } th { "30 d" }
                    th { "last 90 days" }
                }
            }
            tbody {
                @for t in &o.targets {
                    tr data-target=(t.target.id) data-state=(t.state.as_str()) {
                        td {
                            (target_link(&t.target))
                            @if let Some(u) = &t.target.url { br; code.url { (u) } }
                        }
                        @for c in &t.cells {
                            td class={ "cell st-" (c.state.as_str()) }
                                data-target=(t.target.id) data-region=(c.region) data-state=(c.state.as_str())
                                title={ (c.region) ": " (c.outcome.as_deref().unwrap_or("no result")) ", " (ago(c.age_s)) } {
                                (badge(c.state))
                                span.p95 { "p95 " (ms(c.p95_ms_24h)) }
                                span.avail { (pct(c.availability_24h)) }
                            }
                        }
                        td.num { (pct(t.availability_24h)) }
                        td.num { (pct(t.availability_7d)) }
                        td.num { (pct(t.availability_30d)) }
                        td { (day_bars(t)) }
                    }
                }
            }
        }
        p.legend {
            (badge(State::Up)) " " (badge(State::Degraded)) " " (badge(State::Down)) " " (badge(State::NoData))
            " · availability over 24 h per region, p95 of the total time; generated " (time(o.generated_at))
        }
    };
    layout(site, "overview", "Status", body)
}

fn window_links(base: &str, current: Window, extra: &str) -> Markup {
    html! {
        nav.windows {
            @for w in WINDOWS {
                a.active[w.name == current.name] href={ (base) "?window=" (w.name) (extra) } { (w.name) }
            }
        }
    }
}

/// JSON for a `<script type="application/json">` block: `<`, `>` and `&` as `\u00XX` escapes,
/// so no string in the data (a target named `</script><script>...`) can end the element or
/// open a comment; JSON.parse reads them back unchanged. (The escape OWASP's XSS cheat sheet
/// gives for JSON in HTML.)
pub fn json_for_script(value: &impl serde::Serialize) -> String {
    let text = serde_json::to_string(value).unwrap_or_else(|_| "null".into());
    text.replace('<', "\\u003c")
        .replace('>', "\\u003e")
        .replace('&', "\\u0026")
        .replace('\u{2028}', "\\u2028")
        .replace('\u{2029}', "\\u2029")
}

const PHASES: [(&str, &str); 5] = [
    ("dns", "DNS"),
    ("connect", "connect"),
    ("tls", "TLS"),
    ("ttfb", "first byte"),
    ("transfer", "transfer"),
];

pub fn target(site: &Site, t: &TargetPage) -> Markup {
    let base = format!("/targets/{}", t.target.id);
    let chart = serde_json::json!({
        "latency": t.latency,
        "window": t.window.name,
        "from": t.generated_at - t.window.secs as f64,
        "to": t.generated_at,
    });
    let phases: Vec<(String, [f64; 5])> = t
        .regions
        .iter()
        .map(|r| {
            let v = |x: Option<f64>| x.unwrap_or(0.0).max(0.0);
            (
                r.region.clone(),
                [
                    v(r.dns_ms),
                    v(r.connect_ms),
                    v(r.tls_ms),
                    v(r.ttfb_ms),
                    v(r.transfer_ms),
                ],
            )
        })
        .collect();
    let widest = phases
        .iter()
        .map(|(_, p)| p.iter().sum::<f64>())
        .fold(0.0f64, f64::max)
        .max(0.001);
    const BAR_W: f64 = 600.0;
    let body = html! {
        @if let Some(u) = &t.target.url { p { code.url { (u) } } }
        section.now {
            @for r in &t.now {
                span.region-now data-region=(r.region) data-state=(r.state.as_str())
                    title={ (r.outcome.as_deref().unwrap_or("no result")) ", " (ago(r.age_s)) } {
                    (r.region) " " (badge(r.state))
                }
            }
        }
        (window_links(&base, t.window, ""))
        section {
            h2 { "Latency by region (" (t.window.name) ")" }
            p.hint { "p50 dashed, p95 solid; from " (match t.resolution { "raw" => "raw results", "1h" => "hourly rollups", _ => "daily rollups" }) }
            div #latency-chart .chart {}
            script #chart-data type="application/json" { (PreEscaped(json_for_script(&chart))) }
        }
        section {
            h2 { "Regions" }
            (comparison_table(&t.comparison))
        }
        section {
            h2 { "Where the time goes (median of each phase, " (t.window.name) ")" }
            svg #phases width=(BAR_W as u32 + 120) height=(phases.len() * 28 + 4) role="img" aria-label="phase breakdown per region" {
                @for (i, (region, p)) in phases.iter().enumerate() {
                    text x="0" y=(i * 28 + 17) class="ph-label" { (region) }
                    @for (k, (phase, label)) in PHASES.iter().enumerate() {
                        @let x = 110.0 + p[..k].iter().sum::<f64>() / widest * BAR_W;
                        @let w = p[k] / widest * BAR_W;
                        rect x=(format!("{x:.1}")) y=(i * 28 + 2) width=(format!("{w:.1}")) height="22"
                            class={ "ph ph-" (phase) } data-region=(region) data-phase=(phase) data-ms=(format!("{:.3}", p[k])) {
                            title { (region) " " (label) ": " (ms(Some(p[k]))) }
                        }
                    }
                }
            }
            p.legend {
                @for (phase, label) in PHASES { span class={ "key ph-" (phase) } {} " " (label) " " }
            }
            table.phases {
                thead { tr { th { "region" } @for (_, label) in PHASES { th { (label) } } } }
                tbody {
                    @for (region, p) in &phases {
                        tr { td { (region) } @for v in p { td.num { (ms(Some(*v))) } } }
                    }
                }
            }
        }
        section {
            h2 { "Outcomes (" (t.window.name) ")" }
            table.outcomes {
                thead { tr { th { "region" } th { "probes" } th { "outcomes" } } }
                tbody {
                    @for r in &t.regions {
                        tr data-region=(r.region) {
                            td { (r.region) }
                            td.num { (r.probes) }
                            td {
                                @for (k, n) in &r.outcomes {
                                    span class={ "outcome" @if k == "up" { " ok" } } { (k) " " (n) " (" (pct(Some(100.0 * *n as f64 / r.probes.max(1) as f64))) ")" } " "
                                }
                            }
                        }
                    }
                }
            }
        }
        section {
            h2 { "Recent failures (last 24 h)" }
            @if t.failures.is_empty() { p { "None." } } @else {
                table.failures {
                    thead { tr { th { "time" } th { "region" } @if !site.public { th { "agent" } } th { "outcome" } th { "failed phase" } th { "status" } @if !site.public { th { "remote IP" } } } }
                    tbody {
                        @for f in &t.failures {
                            tr {
                                td { (time(f.started_at)) }
                                td { (f.region) }
                                @if !site.public { td { (f.agent.as_deref().unwrap_or("")) } }
                                td { (f.outcome) }
                                td { (f.failed_phase.as_deref().unwrap_or("")) }
                                td { (f.status.map(|s| s.to_string()).unwrap_or_default()) }
                                @if !site.public { td { (f.remote_ip.as_deref().unwrap_or("")) } }
                            }
                        }
                    }
                }
            }
        }
        section {
            h2 { "Certificate expiry by region" }
            @if t.certificates.is_empty() { p { "No certificate seen (plain HTTP, or no TLS result yet)." } } @else {
                table.certs {
                    thead { tr { th { "region" } th { "not after" } th { "days left" } } }
                    tbody {
                        @for c in &t.certificates {
                            tr class=(if c.days_left < 14.0 { "soon" } else { "" }) {
                                td { (c.region) } td { (time(c.not_after)) } td.num { (format!("{:.1}", c.days_left)) }
                            }
                        }
                    }
                }
            }
        }
        section {
            h2 { "Incidents" }
            @if t.incidents.is_empty() { p { "None." } } @else { (incidents_table(&t.incidents, t.generated_at)) }
        }
    };
    layout(site, "target", &t.target.display(), body)
}

fn comparison_table(rows: &[Comparison]) -> Markup {
    html! {
        table.comparison {
            thead { tr { th { "region" } th { "probes" } th { "availability" } th { "p50" } th { "p95" } th { "p99" } th { "top error" } } }
            tbody {
                @for c in rows {
                    tr data-region=(c.region) {
                        td { (c.region) }
                        td.num { (c.probes) }
                        td.num { (pct(c.availability_pct)) }
                        td.num { (ms(c.p50_ms)) }
                        td.num data-p95=(c.p95_ms.unwrap_or(0.0)) { (ms(c.p95_ms)) }
                        td.num { (ms(c.p99_ms)) }
                        td { (c.top_error.as_deref().unwrap_or("")) }
                    }
                }
            }
        }
    }
}

/// Heat class of a p95 (ms) or an availability (%), 0 (good) to 5.
fn heat(metric: &str, c: &Comparison) -> usize {
    if metric == "availability" {
        let a = c.availability_pct.unwrap_or(0.0);
        [99.9, 99.5, 99.0, 95.0, 90.0]
            .iter()
            .position(|t| a >= *t)
            .unwrap_or(5)
    } else {
        let p = c.p95_ms.unwrap_or(f64::INFINITY);
        [100.0, 200.0, 400.0, 800.0, 1600.0]
            .iter()
            .position(|t| p < *t)
            .unwrap_or(5)
    }
}

pub fn regions(site: &Site, r: &Regions, metric: &str) -> Markup {
    let cells: std::collections::BTreeMap<(i32, &str), &Comparison> = r
        .cells
        .iter()
        .map(|c| ((c.target_id, c.region.as_str()), c))
        .collect();
    let body = html! {
        (window_links("/regions", r.window, &format!("&metric={metric}")))
        nav.windows {
            a.active[metric == "p95"] href={ "/regions?window=" (r.window.name) "&metric=p95" } { "p95" }
            a.active[metric == "availability"] href={ "/regions?window=" (r.window.name) "&metric=availability" } { "availability" }
        }
        table.heatmap {
            thead { tr { th { "target" } @for reg in &r.regions { th.region { (reg) } } } }
            tbody {
                @for t in &r.targets {
                    tr data-target=(t.id) {
                        td { (target_link(t)) }
                        @for reg in &r.regions {
                            @match cells.get(&(t.id, reg.as_str())) {
                                Some(c) => td class={ "heat h" (heat(metric, c)) } data-region=(reg)
                                    title={ (c.probes) " probes" } {
                                    @if metric == "availability" { (pct(c.availability_pct)) } @else { (ms(c.p95_ms)) }
                                },
                                None => td.heat.none data-region=(reg) { "–" },
                            }
                        }
                    }
                }
            }
        }
        p.legend { "From region_comparison over " (r.window.name) "; darker is worse." }
    };
    let heading = if metric == "availability" {
        "Availability by region"
    } else {
        "p95 by region"
    };
    layout(site, "regions", heading, body)
}

pub fn fleet(site: &Site, f: &Fleet) -> Markup {
    let body = html! {
        table.fleet {
            thead { tr { th { "agent" } th { "region" } th { "status" } th { "version" } th { "last seen" } th { "targets" } th { "pending results" } th { "set generation (region / agent)" } th { "clock" } th { "refused set" } } }
            tbody {
                @for a in &f.agents {
                    tr data-agent=(a.agent) data-status=(a.status) {
                        td { (a.agent) }
                        td { (a.region) }
                        td { span class={ "badge fs-" (a.status) } { (a.status) } }
                        td { (a.version.as_deref().unwrap_or("")) }
                        td { (ago(a.last_seen.map(|t| f.generated_at - t))) }
                        td.num { (a.targets.map(|n| n.to_string()).unwrap_or_default()) }
                        td.num { (a.pending_results.map(|n| n.to_string()).unwrap_or_default()) }
                        td.num {
                            (a.region_set_generation.map(|n| n.to_string()).unwrap_or("–".into()))
                            " / "
                            (a.agent_set_generation.map(|n| n.to_string()).unwrap_or("–".into()))
                        }
                        td.clock data-clock-flag=(a.clock_flag.as_deref().unwrap_or("")) { (a.clock_summary()) }
                        td {
                            @if let Some(scope) = &a.rejected_scope {
                                (scope) " #" (a.rejected_generation.unwrap_or(0)) ": " (a.rejection.as_deref().unwrap_or(""))
                            }
                        }
                    }
                }
            }
        }
    };
    layout(site, "fleet", "Fleet", body)
}

pub fn incidents(site: &Site, i: &Incidents) -> Markup {
    let body = html! {
        h2 { "Open" }
        @if i.open.is_empty() { p.all-quiet { "No open incidents." } } @else { (incidents_table(&i.open, i.generated_at)) }
        h2 { "Resolved in the last 30 days" }
        @if i.recent.is_empty() { p { "None." } } @else { (incidents_table(&i.recent, i.generated_at)) }
    };
    layout(site, "incidents", "Incidents", body)
}

/// A page for 404, 503 and the like.
pub fn message(site: &Site, heading: &str, text: &str) -> Markup {
    layout(site, "message", heading, html! { p { (text) } })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_in_a_script_block_cannot_close_it() {
        let s =
            json_for_script(&serde_json::json!({"name": "</script><script>alert(1)</script>&"}));
        assert!(
            !s.contains('<') && !s.contains('>') && !s.contains('&'),
            "{s}"
        );
        let back: serde_json::Value = serde_json::from_str(&s).unwrap();
        assert_eq!(back["name"], "</script><script>alert(1)</script>&");
    }

    #[test]
    fn names_are_escaped() {
        let site = Site {
            title: "<b>vantage</b>",
            public: false,
        };
        let page = message(&site, "<script>alert(1)</script>", "a & b").into_string();
        assert!(
            page.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
            "{page}"
        );
        assert!(page.contains("&lt;b&gt;vantage&lt;/b&gt;"), "{page}");
        assert!(!page.contains("<script>alert"), "{page}");
        // Only the two script elements of the layout, both external.
        assert_eq!(page.matches("<script").count(), 2, "{page}");
    }
}
