//! Self-contained HTML (and markdown) reports of research sessions: one page per session
//! (`report.html`, rendered from `session.json` alone: its plots are embedded in it as SVG
//! and inlined here), and a comparison of the super weights of several sessions.

use serde_json::Value;

/// Escape text for HTML.
pub fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            _ => o.push(c),
        }
    }
    o
}

/// A JSON value as a short table cell: numbers with 4 significant digits, strings as they
/// are, null as "-", arrays and objects as compact JSON.
pub fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => i.to_string(),
            (None, Some(f)) => fmt_f64(f),
            _ => n.to_string(),
        },
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// `f` with about 4 significant digits (scientific when very large or small).
pub fn fmt_f64(f: f64) -> String {
    let a = f.abs();
    if f == 0.0 {
        "0".into()
    } else if !(1e-3..1e6).contains(&a) {
        format!("{f:.3e}")
    } else {
        let decimals = (3 - a.log10().floor() as i32).clamp(0, 6) as usize;
        format!("{f:.decimals$}")
    }
}

/// An HTML table: `header` cells, then rows of already-escaped-or-plain cells (escaped here).
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut h = String::from("<table>\n<thead><tr>");
    for c in header {
        h += &format!("<th>{}</th>", esc(c));
    }
    h += "</tr></thead>\n<tbody>\n";
    for r in rows {
        h += "<tr>";
        for c in r {
            h += &format!("<td>{}</td>", esc(c));
        }
        h += "</tr>\n";
    }
    h + "</tbody>\n</table>\n"
}

/// `v[key]` as a table cell.
fn get(v: &Value, key: &str) -> String {
    cell(v.get(key).unwrap_or(&Value::Null))
}

fn arr(v: &Value) -> &[Value] {
    v.as_array().map(Vec::as_slice).unwrap_or_default()
}

fn section(id: &str, title: &str, body: &str) -> String {
    format!("<section id=\"{id}\">\n<h2>{}</h2>\n{body}</section>\n", esc(title))
}

fn plot(session: &Value, name: &str) -> String {
    match session.get("plots").and_then(|p| p.get(name)).and_then(Value::as_str) {
        Some(svg) if svg.trim_start().starts_with("<svg") => {
            format!("<figure class=\"plot\">{svg}</figure>\n")
        }
        _ => String::new(),
    }
}

const STYLE: &str = "body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;\
color:#222}table{border-collapse:collapse;margin:0.5em 0 1.5em;font-size:0.9em}\
th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f0f0f0}\
td:first-child,th:first-child{text-align:left}section{margin-bottom:2em}\
figure.plot svg{max-width:100%;height:auto}.note{color:#666}pre{white-space:pre-wrap}";

/// Super weights (confirmed or rejected) as table rows.
pub fn weight_rows(list: &Value) -> Vec<Vec<String>> {
    arr(list)
        .iter()
        .map(|s| {
            [
                "layer",
                "row",
                "col",
                "value",
                "input_activation",
                "output_activation",
                "token_position",
                "iteration",
                "perplexity_ratio",
                "catalog",
            ]
            .iter()
            .map(|k| get(s, k))
            .collect()
        })
        .collect()
}

const WEIGHT_HEADER: [&str; 10] =
    ["layer", "row", "col", "weight", "input", "output", "pos", "iter", "ppl x", "catalog"];

fn detect_section(s: &Value) -> String {
    let d = s.get("detect").unwrap_or(&Value::Null);
    let mut b = format!(
        "<p>Threshold {}, prompts: {}. Confirmation: baseline perplexity {} over {} tokens.</p>\n",
        get(d, "threshold"),
        esc(&arr(&d["prompts"]).iter().map(cell).collect::<Vec<_>>().join(" | ")),
        get(d, "baseline_perplexity"),
        get(d, "confirm_tokens")
    );
    b += &format!("<h3>Confirmed super weights ({})</h3>\n", arr(&d["super_weights"]).len());
    b += &table(&WEIGHT_HEADER, &weight_rows(&d["super_weights"]));
    b += &format!(
        "<h3>Rejected spikes: zeroing did not matter ({})</h3>\n",
        arr(&d["rejected"]).len()
    );
    b += &table(&WEIGHT_HEADER, &weight_rows(&d["rejected"]));
    let layers: Vec<Vec<String>> = arr(&d["layers"])
        .iter()
        .map(|l| {
            let mut row: Vec<String> = ["layer", "input", "input_col", "output", "output_row"]
                .iter()
                .map(|k| get(l, k))
                .collect();
            // A sparse layer's input maximum is an expert's (or the shared experts').
            if l.get("input_shared").and_then(Value::as_bool) == Some(true) {
                row[2] = format!("{} (shared experts)", row[2]);
            } else if let Some(e) = l.get("input_expert").and_then(Value::as_u64) {
                row[2] = format!("{} (expert {e})", row[2]);
            }
            row
        })
        .collect();
    let studied: Vec<String> = arr(&s["studied_edits"])
        .iter()
        .map(|e| {
            let op = e["op"].as_object().map(|o| {
                o.iter().map(|(k, v)| format!("{k} {}", cell(v))).collect::<Vec<_>>().join(", ")
            });
            format!("{} ({})", edit_label(e), op.unwrap_or_default())
        })
        .collect();
    b += &format!(
        "<p>The analyses below study these edits: {}.</p>\n",
        esc(&if studied.is_empty() { "nothing".to_string() } else { studied.join(", ") })
    );
    b += "<details><summary>Per-layer maxima (first pass)</summary>\n";
    b += &table(&["layer", "max input", "col", "max output", "row"], &layers);
    b += "</details>\n";
    section("detect", "Super weights", &b)
}

fn edit_label(e: &Value) -> String {
    let idx: Vec<String> = arr(&e["index"]).iter().map(cell).collect();
    format!("{}[{}]", cell(&e["tensor"]), idx.join(","))
}

fn screen_section(r: &Value) -> String {
    let rows: Vec<Vec<String>> = arr(&r["entries"])
        .iter()
        .map(|e| {
            vec![
                get(e, "rank"),
                edit_label(&e["edit"]),
                get(e, "value"),
                get(e, "source"),
                get(e, "perplexity"),
                get(e, "ratio"),
            ]
        })
        .collect();
    let b = format!(
        "<p>Baseline perplexity {} over {} tokens; each weight zeroed alone.</p>\n{}",
        get(r, "baseline_perplexity"),
        get(r, "tokens_scored"),
        table(&["rank", "weight", "value", "source", "perplexity", "ratio"], &rows)
    );
    section("screen", "Screening", &b)
}

fn vocab_section(s: &Value, r: &Value) -> String {
    let summary = vec![
        vec!["mean KL(base ‖ edited)".into(), get(r, "mean_kl")],
        vec!["max KL".into(), get(r, "max_kl")],
        vec!["top-1 agreement".into(), get(r, "top1_agreement")],
        vec!["perplexity base".into(), get(r, "base_perplexity")],
        vec!["perplexity edited".into(), get(r, "edited_perplexity")],
        vec!["positions".into(), get(r, "positions")],
    ];
    let shifts = |list: &Value| -> Vec<Vec<String>> {
        arr(list)
            .iter()
            .map(|t| {
                vec![
                    get(t, "token"),
                    get(t, "id"),
                    get(t, "mean_prob_base"),
                    get(t, "mean_prob_edited"),
                    get(t, "mean_logprob_change"),
                ]
            })
            .collect()
    };
    let h = ["token", "id", "p base", "p edited", "Δ log p"];
    let b = format!(
        "{}<h3>Gaining the most probability</h3>\n{}<h3>Losing the most probability</h3>\n{}{}",
        table(&["measure", "value"], &summary),
        table(&h, &shifts(&r["prob_gainers"])),
        table(&h, &shifts(&r["prob_losers"])),
        plot(s, "vocab")
    );
    section("vocab", "Vocabulary effects", &b)
}

fn cascade_section(s: &Value, r: &Value) -> String {
    let rows: Vec<Vec<String>> = arr(&r["summary"])
        .iter()
        .map(|x| {
            vec![
                get(x, "row"),
                get(x, "peak_base"),
                get(x, "peak_edited"),
                get(x, "massive_layers_base"),
                get(x, "massive_layers_edited"),
            ]
        })
        .collect();
    let b = format!(
        "<p>Prompt tokens: {}</p>\n{}{}",
        esc(&arr(&r["tokens"]).iter().map(cell).collect::<Vec<_>>().join(" ")),
        table(
            &["dim", "peak |a| base", "peak |a| edited", "massive layers", "massive edited"],
            &rows
        ),
        plot(s, "cascade")
    );
    section("cascade", "Massive-activation cascade", &b)
}

fn trace_section(r: &Value) -> String {
    let a = &r["amplification"];
    let rows = vec![
        vec![
            "weight (layer, row, col)".into(),
            format!(
                "{} ({}, {}, {})",
                get(r, "weight"),
                get(r, "layer"),
                get(r, "row"),
                get(r, "col")
            ),
        ],
        vec![
            "spike token".into(),
            format!("{} at {}", get(r, "spike_token"), get(r, "spike_position")),
        ],
        vec!["w · x".into(), get(r, "product")],
        vec!["rest of the row".into(), get(r, "rest_of_row")],
        vec!["share of the row output".into(), get(r, "product_share")],
        vec![
            "residual before → after".into(),
            format!("{} → {}", get(r, "resid_before"), get(r, "resid_after")),
        ],
        vec!["ratio to other positions".into(), get(a, "ratio_to_other_positions")],
        vec!["top attention-sink layers".into(), get(r, "top_sink_layers")],
    ];
    let sinks: Vec<Vec<String>> = arr(&r["attention"])
        .iter()
        .map(|x| {
            ["layer", "mean_weight", "max_head", "max_head_weight", "argmax_fraction"]
                .iter()
                .map(|k| get(x, k))
                .collect()
        })
        .collect();
    let b = format!(
        "{}<h3>Attention to the spike token</h3>\n{}",
        table(&["quantity", "value"], &rows),
        table(&["layer", "mean weight", "max head", "max head weight", "argmax fraction"], &sinks)
    );
    section("trace", "Trace of the strongest super weight", &b)
}

fn compare_section(r: &Value) -> String {
    let mut b = String::new();
    for p in arr(&r["prompts"]) {
        b += &format!("<h3>Prompt: {}</h3>\n", esc(&get(p, "prompt")));
        let rows: Vec<Vec<String>> = arr(&p["continuations"])
            .iter()
            .map(|c| {
                vec![
                    get(c, "label"),
                    get(c, "text"),
                    get(c, "first_token_prob"),
                    get(c, "mean_logprob"),
                ]
            })
            .collect();
        b += &table(&["variant", "continuation", "p(first token)", "mean log p"], &rows);
    }
    section("compare-generate", "Generation with the super weights scaled", &b)
}

fn quantize_section(s: &Value, r: &Value) -> String {
    let mut names: Vec<String> = Vec::new();
    for row in arr(&r["rows"]) {
        for v in arr(&row["variants"]) {
            let n = cell(&v["name"]);
            if !names.contains(&n) {
                names.push(n);
            }
        }
    }
    let rows: Vec<Vec<String>> = arr(&r["rows"])
        .iter()
        .map(|row| {
            let mut cells = vec![get(row, "block_size")];
            for n in &names {
                let v = arr(&row["variants"]).iter().find(|v| cell(&v["name"]) == *n);
                cells.push(v.map_or("-".into(), |v| {
                    format!("{} (KL {})", get(v, "perplexity"), get(v, "mean_kl"))
                }));
            }
            cells
        })
        .collect();
    let mut header = vec!["block size"];
    header.extend(names.iter().map(String::as_str));
    let b = format!(
        "<p>{}-bit round-to-nearest; baseline perplexity {}. Cells: perplexity (mean KL to the \
         unquantized model).</p>\n{}{}",
        get(&r["config"], "bits"),
        get(r, "baseline_perplexity"),
        table(&header, &rows),
        plot(s, "quantize-study")
    );
    section("quantize-study", "Quantization with and without holding out", &b)
}

fn mc_section(r: &Value) -> String {
    let row = |label: &str, m: &Value| {
        vec![
            label.to_string(),
            get(m, "n"),
            get(m, "acc"),
            get(m, "acc_stderr"),
            get(m, "acc_norm"),
            get(m, "acc_norm_stderr"),
        ]
    };
    let mut rows = vec![row("baseline", &r["baseline"])];
    if !r["edited"].is_null() {
        rows.push(row("edited", &r["edited"]));
    }
    let b = format!(
        "<p>{}: zero-shot, lm-eval's log-likelihood protocol.</p>\n{}",
        esc(&get(r, "task")),
        table(&["run", "items", "acc", "stderr", "acc_norm", "stderr"], &rows)
    );
    section("mc", "Multiple-choice accuracy", &b)
}

/// The HTML page of one session (see [`crate::analysis::research`]).
pub fn session_html(s: &Value) -> String {
    let model = get(s, "model");
    let mut body = format!("<h1>swk research: {}</h1>\n", esc(&model));
    body += &format!(
        "<p class=\"note\">swk {} (commit {}), {:.1} s in all.</p>\n",
        esc(&get(s, "swk_version")),
        esc(&get(s, "git_commit")),
        s["total_seconds"].as_f64().unwrap_or(0.0)
    );
    // Where the analyses ran, grouped by device (sessions before devices were recorded have
    // no `device`).
    if let Some(d) = s["device"].as_object() {
        let mut groups: Vec<(String, Vec<String>)> = Vec::new();
        for (analysis, on) in d {
            let on = on.as_str().unwrap_or("cpu").to_string();
            match groups.iter_mut().find(|(g, _)| *g == on) {
                Some((_, list)) => list.push(analysis.clone()),
                None => groups.push((on, vec![analysis.clone()])),
            }
        }
        let parts: Vec<String> = groups
            .iter()
            .map(|(on, list)| format!("on {}: {}", esc(on), list.join(", ")))
            .collect();
        body += &format!("<p class=\"note\">Ran {}.</p>\n", parts.join("; "));
    }
    let info = &s["model_info"];
    let rows: Vec<Vec<String>> = info
        .as_object()
        .map(|o| o.iter().map(|(k, v)| vec![k.clone(), cell(v)]).collect())
        .unwrap_or_default();
    body += &section("model", "Model", &table(&["property", "value"], &rows));
    body += &detect_section(s);
    let present = |k: &str| s.get(k).filter(|v| !v.is_null());
    if let Some(r) = present("screen") {
        body += &screen_section(r);
    }
    if let Some(r) = present("vocab") {
        body += &vocab_section(s, r);
    }
    if let Some(r) = present("cascade") {
        body += &cascade_section(s, r);
    }
    if let Some(r) = present("trace") {
        body += &trace_section(r);
    }
    if let Some(r) = present("compare_generate") {
        body += &compare_section(r);
    }
    if let Some(r) = present("quantize_study") {
        body += &quantize_section(s, r);
    }
    if let Some(r) = present("mc") {
        body += &mc_section(r);
    }
    let notes = |key: &str| -> Vec<Vec<String>> {
        s.get(key)
            .and_then(Value::as_object)
            .map(|o| o.iter().map(|(k, v)| vec![k.clone(), cell(v)]).collect())
            .unwrap_or_default()
    };
    let (errors, skipped) = (notes("errors"), notes("skipped"));
    if !errors.is_empty() || !skipped.is_empty() {
        let b = format!(
            "{}{}",
            table(&["analysis", "error"], &errors),
            table(&["analysis", "skipped because"], &skipped)
        );
        body += &section("notes", "Errors and skipped analyses", &b);
    }
    body +=
        &section("timings", "Timings (seconds)", &table(&["stage", "seconds"], &notes("timings")));
    body += &format!(
        "<details><summary>Inputs</summary><pre>{}</pre></details>\n",
        esc(&serde_json::to_string_pretty(&s["inputs"]).unwrap_or_default())
    );
    page(&format!("swk research: {model}"), &body)
}

fn page(title: &str, body: &str) -> String {
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>{}</title>\n\
         <style>{STYLE}</style>\n</head>\n<body>\n{body}</body>\n</html>\n",
        esc(title)
    )
}

/// One row per confirmed super weight of each session (a session without one gets a row of
/// dashes): model, layer, row, col, value, input, output, perplexity ratio, catalog.
pub fn comparison_rows(sessions: &[Value]) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    for s in sessions {
        let model = get(s, "model");
        let list = arr(&s["super_weights"]);
        if list.is_empty() {
            rows.push(vec![model.clone()].into_iter().chain(vec!["-".to_string(); 8]).collect());
        }
        for sw in list {
            let mut r = vec![model.clone()];
            for k in [
                "layer",
                "row",
                "col",
                "value",
                "input_activation",
                "output_activation",
                "perplexity_ratio",
                "catalog",
            ] {
                r.push(get(sw, k));
            }
            rows.push(r);
        }
    }
    rows
}

/// Header of [`comparison_rows`].
pub const COMPARISON_HEADER: [&str; 9] =
    ["model", "layer", "row", "col", "weight", "input", "output", "ppl x", "catalog"];

/// Header of [`summary_rows`].
pub const SUMMARY_HEADER: [&str; 8] = [
    "model",
    "architecture",
    "parameters",
    "confirmed",
    "rejected",
    "confirm ppl",
    "top screen ratio",
    "seconds",
];

/// One row per session: architecture, size, how many spikes were confirmed and rejected, the
/// confirmation text's baseline perplexity, the largest screening ratio, the session's time.
pub fn summary_rows(sessions: &[Value]) -> Vec<Vec<String>> {
    sessions
        .iter()
        .map(|s| {
            let d = &s["detect"];
            vec![
                get(s, "model"),
                get(&s["model_info"], "architecture"),
                get(&s["model_info"], "parameters"),
                arr(&d["super_weights"]).len().to_string(),
                arr(&d["rejected"]).len().to_string(),
                get(d, "baseline_perplexity"),
                cell(&s["screen"]["entries"][0]["ratio"]),
                get(s, "total_seconds"),
            ]
        })
        .collect()
}

fn md_table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut m = String::from("|");
    for h in header {
        m += &format!(" {h} |");
    }
    m += "\n|";
    m += &"---|".repeat(header.len());
    m += "\n";
    for r in rows {
        m += "|";
        for c in r {
            m += &format!(" {} |", c.replace('|', "\\|").replace('\n', " "));
        }
        m += "\n";
    }
    m
}

/// The comparison as markdown: super weights per model, a summary per model, and the models
/// whose session failed (`failed`: model, error).
pub fn comparison_markdown(sessions: &[Value], failed: &[(String, String)]) -> String {
    let mut m = String::from("# Super weights per model\n\n");
    m += &md_table(&COMPARISON_HEADER, &comparison_rows(sessions));
    m += "\n## Models\n\n";
    m += &md_table(&SUMMARY_HEADER, &summary_rows(sessions));
    if !failed.is_empty() {
        m += "\n## Failed\n\n";
        let rows: Vec<Vec<String>> =
            failed.iter().map(|(a, b)| vec![a.clone(), b.clone()]).collect();
        m += &md_table(&["model", "error"], &rows);
    }
    m
}

/// The comparison page: the tables of [`comparison_markdown`], then a link to each model's
/// report (`links`, relative paths, one per session).
pub fn comparison_html(
    sessions: &[Value],
    links: &[String],
    failed: &[(String, String)],
) -> String {
    let mut body = String::from("<h1>swk research: super weights per model</h1>\n");
    body += &section(
        "comparison",
        "Super weights per model",
        &table(&COMPARISON_HEADER, &comparison_rows(sessions)),
    );
    body += &section("models", "Models", &table(&SUMMARY_HEADER, &summary_rows(sessions)));
    if !failed.is_empty() {
        let rows: Vec<Vec<String>> =
            failed.iter().map(|(a, b)| vec![a.clone(), b.clone()]).collect();
        body += &section("failed", "Failed", &table(&["model", "error"], &rows));
    }
    let mut list = String::from("<ul>\n");
    for (s, l) in sessions.iter().zip(links) {
        list += &format!("<li><a href=\"{}\">{}</a></li>\n", esc(l), esc(&get(s, "model")));
    }
    list += "</ul>\n";
    body += &section("reports", "Reports", &list);
    page("swk research: comparison", &body)
}
